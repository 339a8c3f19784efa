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
:func:`use_dense_far_attention` installs :class:`DenseFARAttnProcessor` on every block's ``attn1``;
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

import functools
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS
from anystep.models.flex_kernel import flex_attend
from anystep.models.students import as_partition, _padding_masked_processor_cls
from anystep.models.velocity import compute_dtype, per_frame_sigma

__all__ = [
    "DenseFARAttnProcessor",
    "dense_mask_from_block_mask",
    "far_attention_for_device",
    "far_attention_kind",
    "far_attention_mask",
    "far_flow_map_velocity",
    "far_layout",
    "use_compiled_flex_far_attention",
    "use_dense_far_attention",
    "use_flex_far_attention",
]


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
        dense = far_attention_kind(transformer) == "dense"
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


# -- the dense processor ---------------------------------------------------------------------------

# One forward hands the same BlockMask to every layer: densify it once. Keyed by the mask object
# (weakly, so a dropped BlockMask frees its dense copy) and the requested lengths.
_DENSE_OF_BLOCK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _is_block_mask(mask) -> bool:
    from torch.nn.attention.flex_attention import BlockMask

    return isinstance(mask, BlockMask)


def _dense_for(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor):
        m = attention_mask
        if m.shape[-2] < q_len or m.shape[-1] < kv_len:
            raise ValueError(f"attention_mask of shape {tuple(m.shape)} is smaller than ({q_len}, {kv_len})")
        m = m[..., :q_len, :kv_len]
        if m.dtype != torch.bool:
            raise TypeError(f"dense FAR attention needs a boolean mask, got {m.dtype}")
        return m.to(device)
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        raise TypeError(f"unsupported attention_mask type {type(attention_mask).__name__}")
    per_mask = _DENSE_OF_BLOCK.setdefault(attention_mask, {})
    m = per_mask.get((q_len, kv_len))
    if m is None:
        m = per_mask[(q_len, kv_len)] = dense_mask_from_block_mask(attention_mask, q_len, kv_len)
    return m.to(device)


@functools.lru_cache(maxsize=None)
def _dense_processor_cls():
    from diffusers.models.transformers.transformer_anyflow_far import apply_rotary_emb

    base = _padding_masked_processor_cls()

    class DenseFARAttnProcessor(base):
        """FAR causal self-attention with a dense boolean mask and SDPA; differentiable on CPU.

        Same q/k/v, RMSNorm, KV-cache write/read and RoPE as ``AnyFlowCausalAttnProcessor``; the
        attention is ``scaled_dot_product_attention`` over the real tokens with the dense form of
        the FAR mask (see the module docstring for why no 128- or head-dim padding is needed).
        Subclasses the padding-masked processor of ``anystep.models.students``, whose KV-cache
        semantics it shares (and delegates to when ``dense_kv_cache=False``).

        ``flex_processor`` is the processor this one replaced; :func:`use_flex_far_attention`
        restores it.
        """

        def __init__(self, dense_kv_cache: bool = True, flex_processor=None, kernel: str = "sdpa"):
            super().__init__()
            if kernel not in ("sdpa", "flex"):
                raise ValueError(f"kernel must be 'sdpa' or 'flex', got {kernel!r}")
            self.dense_kv_cache = bool(dense_kv_cache)
            self.flex_processor = flex_processor
            self.kernel = kernel

        def __call__(
            self,
            attn,
            hidden_states,
            encoder_hidden_states=None,
            attention_mask=None,
            rotary_emb=None,
            kv_cache=None,
            kv_cache_flag=None,
        ):
            if kv_cache is not None and not self.dense_kv_cache:
                return super().__call__(
                    attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache, kv_cache_flag
                )
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            dtype = hidden_states.dtype

            query = attn.to_q(hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            query, key = query.to(dtype), key.to(dtype)  # RMSNorm upcasts

            # (B, H, L, D): the cache layout and what SDPA takes.
            query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
            value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)

            if kv_cache is not None:
                if kv_cache_flag["is_cache_step"]:  # prefill: store this forward's K/V
                    n_c, n_f = kv_cache_flag["num_compressed_tokens"], kv_cache_flag["num_full_tokens"]
                    kv_cache["compressed_cache"][0, :, :, :n_c] = key[:, :, :n_c]
                    kv_cache["compressed_cache"][1, :, :, :n_c] = value[:, :, :n_c]
                    kv_cache["full_cache"][0, :, :, :n_f] = key[:, :, n_c:]
                    kv_cache["full_cache"][1, :, :, :n_f] = value[:, :, n_c:]
                else:  # step: attend to [compressed cache | full cache | this chunk]
                    n_c = kv_cache_flag["num_cached_compressed_tokens"]
                    n_f = kv_cache_flag["num_cached_full_tokens"]
                    comp, full = kv_cache["compressed_cache"], kv_cache["full_cache"]
                    key = torch.cat([comp[0, :, :, :n_c], full[0, :, :, :n_f], key], dim=2)
                    value = torch.cat([comp[1, :, :, :n_c], full[1, :, :, :n_f], value], dim=2)

            if rotary_emb is not None:
                query = apply_rotary_emb(query, rotary_emb["query"])
                key = apply_rotary_emb(key, rotary_emb["key"])

            if self.kernel == "flex" and _is_block_mask(attention_mask):
                out = flex_attend(query, key, value, attention_mask)
            else:
                mask = _dense_for(attention_mask, query.shape[2], key.shape[2], query.device)
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).flatten(2, 3).type_as(query)
            out = attn.to_out[0](out)
            return attn.to_out[1](out)

    DenseFARAttnProcessor.__qualname__ = "DenseFARAttnProcessor"
    return DenseFARAttnProcessor


def __getattr__(name):  # lazy: importing anystep.models must not import diffusers' FAR module
    if name == "DenseFARAttnProcessor":
        return _dense_processor_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_far(transformer):
    from diffusers import AnyFlowFARTransformer3DModel

    if not isinstance(transformer, AnyFlowFARTransformer3DModel):
        raise TypeError(f"expected an AnyFlowFARTransformer3DModel, got {type(transformer).__name__}")


def use_dense_far_attention(transformer, dense_kv_cache: bool = True, kernel: str = "sdpa"):
    """Install :class:`DenseFARAttnProcessor` on every block's ``attn1``; in place, idempotent
    (an installed one only gets ``dense_kv_cache`` and ``kernel`` updated); returns the model.
    ``kernel="flex"``: see :func:`use_compiled_flex_far_attention`."""
    _check_far(transformer)
    cls = _dense_processor_cls()
    for block in transformer.blocks:
        proc = block.attn1.processor
        if isinstance(proc, cls):
            proc.dense_kv_cache = bool(dense_kv_cache)
            proc.kernel = kernel
            continue
        new = cls(dense_kv_cache=dense_kv_cache, flex_processor=proc, kernel=kernel)
        if "_attention_backend" in vars(proc):  # the delegate path keeps the caller's flex backend
            new._attention_backend = proc._attention_backend
        block.attn1.set_processor(new)
    return transformer


def use_compiled_flex_far_attention(transformer):
    """The CUDA training attention: the training forward (a ``BlockMask``) runs flex through
    :func:`anystep.models.flex_kernel.flex_attend` (compiled on CUDA, so no full score matrix), and
    the KV-cache paths go to the padding-masked flex processor as in sampling. In place, idempotent."""
    return use_dense_far_attention(transformer, dense_kv_cache=False, kernel="flex")


def use_flex_far_attention(transformer):
    """Undo :func:`use_dense_far_attention`: put back the processor each dense one replaced (the
    stock ``AnyFlowCausalAttnProcessor`` if it does not know); in place, idempotent."""
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor

    _check_far(transformer)
    cls = _dense_processor_cls()
    for block in transformer.blocks:
        proc = block.attn1.processor
        if isinstance(proc, cls):
            block.attn1.set_processor(proc.flex_processor or AnyFlowCausalAttnProcessor())
    return transformer


def far_attention_kind(transformer) -> str:
    """``"dense"`` if every block's ``attn1`` runs :class:`DenseFARAttnProcessor` with SDPA,
    ``"flex_compiled"`` if every one runs it with the flex kernel, ``"flex"`` if none does (the
    stock or padding-masked processors), ``"mixed"`` otherwise."""
    cls = _dense_processor_cls()
    kinds = {getattr(b.attn1.processor, "kernel", None) if isinstance(b.attn1.processor, cls) else "stock"
             for b in transformer.blocks}
    return {frozenset({"sdpa"}): "dense", frozenset({"flex"}): "flex_compiled",
            frozenset({"stock"}): "flex"}.get(frozenset(kinds), "mixed")


def far_attention_for_device(transformer, device=None):
    """Default policy (docs/design.md section 1): dense SDPA on CPU (flex has no CPU backward), flex
    elsewhere, compiled for the training forward (:func:`use_compiled_flex_far_attention`: the
    fused kernel is the memory-light choice at real sizes, where a dense mask of the reference
    layout would be ~(2 x 21 x 1560)^2 booleans and eager flex a full score matrix per layer).
    ``device`` defaults to the model's. Returns the model."""
    if device is None:
        device = next(transformer.parameters()).device
    if torch.device(device).type == "cpu":
        return use_dense_far_attention(transformer)
    return use_compiled_flex_far_attention(transformer)


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
    :func:`anystep.models.students.flow_map_velocity`); ``chunk_partition`` sums to ``F``.

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
    _check_far(model)
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
