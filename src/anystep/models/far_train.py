"""Training the causal (FAR) student on any device: a dense-mask attention fallback and the
teacher-forcing forward.

Why this module exists
----------------------
The causal AnyFlow student is diffusers' ``AnyFlowFARTransformer3DModel`` (paper Sec. 4.3, "AnyFlow
for Causal Video Diffusion": the FAR training pipeline, context compression, chunk partition
``[1, 3, 3, ...]``). Its self-attention processor (``AnyFlowCausalAttnProcessor``) only speaks
FlexAttention with a ``BlockMask``. FlexAttention has no backward pass on CPU
(``NotImplementedError: FlexAttention does not support backward on CPU``), so neither Stage 1
(forward flow-map training) nor the differentiable causal rollouts of Stage 2 (chunk by chunk over
the KV cache, "each chunk's three segments with gradient") can run on a laptop. docs/design.md section 1
names the bridge: materialise the block mask's ``mask_mod`` into a dense boolean mask and run
``torch.nn.functional.scaled_dot_product_attention`` with it; keep flex on CUDA. This module is
that bridge, plus the one training-time network call the causal method needs
(:func:`far_flow_map_velocity`, the clean-copy teacher-forcing layout of docs/design.md section 3).

Attention processors
--------------------
:func:`anystep.models.far_attention.use_dense_far_attention` installs :class:`DenseFARAttnProcessor` on every block's ``attn1``;
:func:`use_flex_far_attention` puts back the processor that was there before (the stock flex one,
or the padding-masked one of :func:`anystep.models.students.mask_far_inference_padding`);
:func:`far_attention_for_device` is the default policy (dense on CPU, flex elsewhere).

The dense processor computes q/k/v, writes / reads the KV cache and applies RoPE exactly like
``AnyFlowCausalAttnProcessor``; only the attention kernel differs, and it needs none of the stock
processor's alignment tricks:

* Sequence padding. The stock processor zero-pads q/k/v to a multiple of 128 tokens (the BlockMask
  block size) and trims the output. The dense path attends over the *real* tokens only, with the
  mask restricted to ``[:L_q, :L_kv]``; in the training / cache-prefill masks padding rows and
  columns are all-False anyway, so nothing is lost -- and SDPA must not see padded query rows
  (an all-False row is NaN in SDPA, zero in flex).
* Head-dim padding. Flex needs head_dim >= 16, so tiny models get zero-padded heads and an explicit
  ``scale = 1/sqrt(head_dim)``. SDPA takes any head_dim with that default scale: same scores.
* Layout. The stock processor builds (B, H, L, D) for cache slicing and RoPE, then hands
  (B, L, H, D) to ``dispatch_attention_fn``. SDPA takes (B, H, L, D) directly; the result is
  transposed back to (B, L, H*D) before ``to_out``.

Masks the dense processor accepts as ``attention_mask``: a ``BlockMask`` (densified once per mask
object and reused by all layers of the forward), a boolean tensor broadcastable to
(B, H, L_q, L_kv) (larger tensors are cropped to the real lengths; :func:`far_flow_map_velocity`
passes one, cached per layout, so no BlockMask is built per step), or ``None`` -- the KV-cache
inference step, which attends to every real key (cache + current chunk).

KV-cache inference and ``mask_far_inference_padding``: the stock inference step calls flex with
*no* mask over zero-padded keys; ``mask_far_inference_padding`` (anystep.models.students) masks
that padding so sampling sees the attention the model was trained with. The dense processor never
pads, so its inference step has exactly the padding-masked semantics (tested to ~1e-6 against the
padding-masked flex processor) and it subclasses that processor. It is dense on the KV-cache paths
too by default, because the Stage-2 causal rollout backpropagates through the inference step and
flex cannot on CPU; ``dense_kv_cache=False`` delegates both KV-cache paths (prefill and step) to
the padding-masked flex processor instead. Note: ``mask_far_inference_padding`` (called by
``anystep.sampling.generate_latents``) replaces any processor whose class is not exactly its own,
so it swaps the dense processor back to flex; results are unchanged (same semantics), but call
:func:`far_attention_for_device` again before training the same transformer object.

Clean-copy teacher forcing (what ``_forward_train`` of diffusers 0.42.1 does)
-----------------------------------------------------------------------------
With ``n = len(chunk_partition)`` chunks and ``L = full_chunk_limit`` (3 in the reference), the
first ``max(0, n - L)`` chunks are *compressed context*: patchified with the larger
``far_patch_embedding`` kernel, (1, 4, 4). The last ``min(n, L)`` chunks are *full-resolution*:
the noisy chunks that are trained. With ``clean_hidden_states`` the token sequence is

    [ compressed context | noisy full chunks | clean copy of the full chunks ]  (+ padding to 128)

* ``hidden_states`` is the *whole* clip (context frames included, in front); the context frames
  are read from it, so for teacher forcing they must hold clean latents and their ``timestep`` /
  ``r_timestep`` entries must be 0.
* ``clean_hidden_states`` holds only the clean copy of the *full* frames, ``(B, F_full, C, h, w)``;
  it gets the full-resolution patch embedding and the same RoPE positions as the noisy frames.
* ``clean_timestep`` is ``(B, F_full)`` in model units and is used for *both* the t and the r
  embedding of the clean copy (``forward_timestep(clean_timestep, clean_timestep)``), whatever
  ``deltatime_type`` says; 0 is the t = r = 0 of docs/design.md.
* Attention (``mask_mod`` of ``_build_far_block_mask_from_far_cfg``): context tokens see context
  chunks <= their own; a noisy chunk sees all context, *itself* (bidirectionally) and the clean
  copies of *earlier* chunks -- never another noisy chunk; a clean chunk sees all context and clean
  chunks <= its own. Without a clean copy the mask is plain chunk-causal (each chunk sees itself
  and all earlier tokens, context and noisy alike).
* The output holds only the noisy full-resolution frames, ``(B, F_full, C, h, w)``: the clean copy
  and the compressed context are cut off before ``proj_out``.

So with teacher forcing a noisy chunk ``k`` is computed exactly as if the chunks before it were
clean latents at t = r = 0 in a plain causal forward (tested), which is also what the KV-cache
sampler computes when it generates chunk ``k`` after prefilling the clean chunks before it
(tested) -- for the *last* chunk of a training clip always, and for every chunk when
``n <= full_chunk_limit``. (For earlier full chunks of a longer clip, training sees fewer
full-resolution context chunks than sampling will; that is FAR's design, and why docs/design.md samples
the number of training chunks.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS
from anystep.models.students import as_partition
from anystep.models.velocity import compute_dtype, per_frame_sigma

__all__ = ["dense_mask_from_block_mask", "far_attention_mask", "far_flow_map_velocity", "far_layout", "tokens_per_frame"]


# -- masks --------------------------------------------------------------------------------------


def dense_mask_from_block_mask(block_mask, q_len: int | None = None, kv_len: int | None = None) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)`` mask (True = may attend) from a flex ``BlockMask``'s ``mask_mod``.

    Evaluated on an index grid ``mask_mod(0, 0, q[:, None], kv[None, :])`` (the FAR ``mask_mod`` is
    built from tensor indexing and comparisons, so it broadcasts); if a ``mask_mod`` does not
    broadcast, falls back to ``torch.nn.attention.flex_attention.create_mask``. Lengths default to
    the BlockMask's (padded) lengths; pass the real lengths to drop the 128-alignment padding.
    Batch / head-independent masks only (the FAR masks are: ``B=None, H=None``).
    """
    full_q, full_kv = block_mask.seq_lengths
    q_len = int(full_q if q_len is None else q_len)
    kv_len = int(full_kv if kv_len is None else kv_len)
    if q_len > full_q or kv_len > full_kv:
        raise ValueError(
            f"requested a ({q_len}, {kv_len}) mask from a BlockMask of size {tuple(block_mask.seq_lengths)}"
        )
    device = block_mask.kv_num_blocks.device
    q = torch.arange(q_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        mask = block_mask.mask_mod(zero, zero, q, kv)
        mask = torch.as_tensor(mask, device=device).to(torch.bool).expand(q_len, kv_len)
    except Exception:  # a mask_mod that only works under vmap
        from torch.nn.attention.flex_attention import create_mask

        mask = create_mask(block_mask.mask_mod, None, None, q_len, kv_len, device=device)[0, 0]
    return mask.contiguous()


def far_layout(chunk_partition: Sequence[int], full_chunk_limit: int = 3, mode: str = "train") -> dict:
    """How the FAR training forward splits a clip (see the module docstring).

    Returns ``n_context_chunks``, ``n_context_frames`` (compressed, in front, no output) and
    ``n_full_chunks``, ``n_full_frames`` (the trained noisy frames = the output). ``mode="cache"``
    is the KV-cache prefill split (threshold ``full_chunk_limit - 1``: the chunk about to be
    generated is the extra full one).
    """
    part = as_partition(chunk_partition)
    threshold = int(full_chunk_limit) - (1 if mode == "cache" else 0)
    if mode not in ("train", "cache"):
        raise ValueError(f"mode must be 'train' or 'cache', got {mode!r}")
    n_ctx = max(0, len(part) - threshold)
    return {
        "n_context_chunks": n_ctx,
        "n_context_frames": sum(part[:n_ctx]),
        "n_full_chunks": len(part) - n_ctx,
        "n_full_frames": sum(part[n_ctx:]),
    }


def tokens_per_frame(config, height: int, width: int) -> tuple[int, int]:
    p, cp = config.patch_size, config.compressed_patch_size
    return (height // p[1]) * (width // p[2]), (height // cp[1]) * (width // cp[2])


_MASK_CACHE: dict = {}
_MASK_CACHE_MAX = 64


def far_attention_mask(
    transformer,
    chunk_partition: Sequence[int],
    height: int,
    width: int,
    has_clean_context: bool,
    mode: str = "train",
    dense: bool | None = None,
    device=None,
):
    """The FAR self-attention mask for one layout, cached per layout.

    ``dense=False``: diffusers' ``BlockMask`` (``transformer.build_attention_mask``), what the
    flex processors need. ``dense=True``: that mask densified to the real sequence length, a
    ``(L, L)`` bool tensor only :class:`DenseFARAttnProcessor` accepts. ``dense=None`` picks what
    the installed processors take. Building a BlockMask costs a ``create_block_mask`` per call,
    which the forward would otherwise pay every step.
    """
    cfg = transformer.config
    part = as_partition(chunk_partition)
    if dense is None:
        # The dense processor (anystep.models.far_attention) names its kernel; the flex ones have none.
        dense = all(getattr(b.attn1.processor, "kernel", None) == "sdpa" for b in transformer.blocks)
    if device is None:
        device = next(transformer.parameters()).device
    device = torch.device(device)
    key = (
        tuple(cfg.patch_size),
        tuple(cfg.compressed_patch_size),
        int(cfg.full_chunk_limit),
        part,
        int(height),
        int(width),
        bool(has_clean_context),
        mode,
        str(device),
    )
    bm = _MASK_CACHE.get(("block",) + key)
    if bm is None:
        bm = transformer.build_attention_mask(
            chunk_partition=list(part),
            height=int(height),
            width=int(width),
            has_clean_context=bool(has_clean_context),
            device=device,
            mode=mode,
        )
        if len(_MASK_CACHE) >= _MASK_CACHE_MAX:
            _MASK_CACHE.clear()
        _MASK_CACHE[("block",) + key] = bm
    if not dense:
        return bm
    m = _MASK_CACHE.get(("dense",) + key)
    if m is None:
        lay = far_layout(part, cfg.full_chunk_limit, mode)
        full_tpf, comp_tpf = tokens_per_frame(cfg, height, width)
        n_full = lay["n_full_frames"] * full_tpf
        real = lay["n_context_frames"] * comp_tpf + n_full * (2 if has_clean_context else 1)
        m = dense_mask_from_block_mask(bm, real, real)
        _MASK_CACHE[("dense",) + key] = m
    return m


def check_far(transformer):
    from diffusers import AnyFlowFARTransformer3DModel

    if not isinstance(transformer, AnyFlowFARTransformer3DModel):
        raise TypeError(f"expected an AnyFlowFARTransformer3DModel, got {type(transformer).__name__}")


# -- the training-time network call -----------------------------------------------------------------


def far_flow_map_velocity(
    model,
    z: torch.Tensor,
    t_sigma,
    r_sigma,
    prompt_embeds: torch.Tensor,
    chunk_partition: Sequence[int],
    clean_latents: torch.Tensor | None = None,
    attention_mask=None,
) -> torch.Tensor:
    """Average velocity ``u(z_t, t, r)`` of the causal FAR student over a whole clip, teacher-forced.

    ``z``: noisy latents ``(B, F, C, h, w)``; ``t_sigma``, ``r_sigma``: sigmas in [0, 1] as a
    scalar, ``(B,)`` or per frame ``(B, F)`` (scaled by 1000 to model timesteps, kept fp32 as in
    :func:`anystep.models.velocity.flow_map_velocity`); ``chunk_partition`` sums to ``F``.

    With ``clean_latents`` (``(B, F, C, h, w)``, the clean clip): the clean-copy teacher-forcing
    layout of FAR (docs/design.md section 3, "clean context chunks at t = r = 0"), see the module
    docstring. Concretely this calls the diffusers training forward with

    * ``hidden_states`` = ``clean_latents`` on the compressed-context frames, ``z`` on the rest, and
      ``timestep`` / ``r_timestep`` = 0 on the context frames, 1000 t / 1000 r on the rest -- so
      ``z``, ``t``, ``r`` on context frames are ignored;
    * ``clean_hidden_states`` = ``clean_latents`` on the full-resolution frames;
    * ``clean_timestep`` = 0 of shape ``(B, F_full)`` (the model uses it as both t and r).

    Without ``clean_latents``: a plain chunk-causal forward of ``z`` at the given per-frame times
    (each chunk sees itself and everything before it); ``chunk_partition=(F,)`` makes it one
    bidirectional chunk (the "extra plain flow-matching pass over the whole clip" of docs/design.md).

    Returns u for the noisy *full-resolution* frames only, ``(B, F_full, C, h, w)`` with
    ``F_full = far_layout(chunk_partition, full_chunk_limit)["n_full_frames"]`` -- the last
    ``min(n_chunks, full_chunk_limit)`` chunks. That is all of ``F`` when
    ``len(chunk_partition) <= full_chunk_limit``; otherwise the first ``F - F_full`` frames are
    compressed context, which the diffusers forward does not predict; align targets with
    ``target[:, F - F_full:]``.

    ``attention_mask``: ``None`` uses a cached mask of the kind the installed attention takes
    (:func:`far_attention_mask`). On CPU with gradient, install the dense attention first
    (:func:`far_attention_for_device`). Differentiable.
    """
    check_far(model)
    if z.ndim != 5:
        raise ValueError(f"z must be (B, F, C, h, w), got shape {tuple(z.shape)}")
    b, f, _, h, w = z.shape
    part = as_partition(chunk_partition)
    if sum(part) != f:
        raise ValueError(f"chunk_partition {list(part)} covers {sum(part)} frames, but z has {f}")
    lay = far_layout(part, model.config.full_chunk_limit)
    n_ctx = lay["n_context_frames"]
    t = per_frame_sigma(t_sigma, b, f, "t_sigma").to(z.device) * NUM_TRAIN_TIMESTEPS
    r = per_frame_sigma(r_sigma, b, f, "r_sigma").to(z.device) * NUM_TRAIN_TIMESTEPS
    dtype = compute_dtype(model)
    kw = {}
    hidden = z
    if clean_latents is not None:
        if tuple(clean_latents.shape) != tuple(z.shape):
            raise ValueError(
                f"clean_latents must have the shape of z {tuple(z.shape)}, got {tuple(clean_latents.shape)}"
            )
        clean_latents = clean_latents.to(z.device)
        if n_ctx:
            hidden = torch.cat([clean_latents[:, :n_ctx].to(z.dtype), z[:, n_ctx:]], dim=1)
            zero = torch.zeros(b, n_ctx, device=z.device)
            t = torch.cat([zero, t[:, n_ctx:]], dim=1)
            r = torch.cat([zero, r[:, n_ctx:]], dim=1)
        kw = dict(
            clean_hidden_states=clean_latents[:, n_ctx:].to(dtype),
            clean_timestep=torch.zeros(b, f - n_ctx, device=z.device),
        )
    if attention_mask is None:
        attention_mask = far_attention_mask(model, part, h, w, clean_latents is not None, device=z.device)
    out = model(
        hidden_states=hidden.to(dtype),
        timestep=t,
        r_timestep=r,
        encoder_hidden_states=prompt_embeds.to(device=z.device, dtype=dtype),
        chunk_partition=list(part),
        attention_mask=attention_mask,
        return_dict=False,
        **kw,
    )[0]
    return out
