"""FAR attention kernels: which processor a FAR student's self-attention runs, per device.

The stock ``AnyFlowCausalAttnProcessor`` calls flex attention, which has no CPU backward; the
dense processor here runs SDPA with the dense form of the FAR mask
(:func:`anystep.models.far_train.far_attention_mask`), differentiable on CPU, or the compiled flex
kernel on CUDA. :func:`far_attention_for_device` is the default policy (docs/design.md section 1).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from anystep.models.far_train import check_far, dense_mask_from_block_mask
from anystep.models.flex_kernel import flex_attend
from anystep.models.students import _padding_masked_processor_cls

__all__ = [
    "DenseFARAttnProcessor",
    "far_attention_for_device",
    "far_attention_kind",
    "use_compiled_flex_far_attention",
    "use_dense_far_attention",
    "use_flex_far_attention",
]


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


def use_dense_far_attention(transformer, dense_kv_cache: bool = True, kernel: str = "sdpa"):
    """Install :class:`DenseFARAttnProcessor` on every block's ``attn1``; in place, idempotent
    (an installed one only gets ``dense_kv_cache`` and ``kernel`` updated); returns the model.
    ``kernel="flex"``: see :func:`use_compiled_flex_far_attention`."""
    check_far(transformer)
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

    check_far(transformer)
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
