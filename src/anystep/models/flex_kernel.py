"""FlexAttention over a FAR ``BlockMask``, compiled on CUDA.

Why: called eagerly, ``flex_attention`` runs an unfused reference implementation that materialises
the whole score matrix (torch says so in a warning). For the FAR training forward at the reference
layout (21 latent frames, about 30k tokens with the clean copy) that is a 12 x 30k x 30k matrix per
layer, which the GPU check (``benchmarks/gpu_check.py``) flagged. Compiled, flex generates one fused
kernel that skips the masked blocks. The diffusers processor calls the eager function and offers no
hook, so the FAR processor of :mod:`anystep.models.far_train` calls :func:`flex_attend` instead.

CPU keeps the eager function: inductor has no flex backward there, and the CPU training path uses
the dense SDPA fallback anyway. ``ANYSTEP_FLEX_COMPILE=0`` keeps the eager function on CUDA too.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

#: flex_attention's smallest head dimension; tiny test models have fewer channels per head.
MIN_HEAD_DIM = 16


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one specialised kernel per layout, batch size and grad mode. Causal Stage 1
    # alone meets a few chunk counts x (gradient forward, batched no-grad forwards, checkpoint
    # recompute); past dynamo's default limit of 8 per function it silently runs flex eagerly again,
    # which is what the limit raised here avoids (seen on an H200: the eager fallback asked for
    # 162 GiB at the reference layout).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def flex_function(device: torch.device):
    """The flex_attention to call on ``device``: compiled on CUDA unless ``ANYSTEP_FLEX_COMPILE=0``."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.device(device).type == "cuda" and os.environ.get("ANYSTEP_FLEX_COMPILE", "1") != "0":
        return _compiled_flex()
    return flex_attention


def flex_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask) -> torch.Tensor:
    """Attention of (B, H, Lq, D) queries over (B, H, Lkv, D) keys/values under ``block_mask``.

    The mask's lengths are the 128-aligned ones diffusers builds; q/k/v are zero-padded up to them
    (the mask excludes padded keys, and padded query rows are cut off again) and heads below 16
    channels are zero-padded with the scale of the real head size, so the result equals SDPA with
    the dense form of the mask on the real tokens.
    """
    q_len, kv_len = (int(n) for n in block_mask.seq_lengths)
    lq, lkv, d = query.shape[2], key.shape[2], query.shape[3]
    if lq > q_len or lkv > kv_len:
        raise ValueError(f"({lq}, {lkv}) tokens do not fit a BlockMask of lengths ({q_len}, {kv_len})")
    head_pad = max(0, MIN_HEAD_DIM - d)
    query = F.pad(query, (0, head_pad, 0, q_len - lq))
    key = F.pad(key, (0, head_pad, 0, kv_len - lkv))
    value = F.pad(value, (0, head_pad, 0, kv_len - lkv))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex_function(query.device)(query, key, value, block_mask=block_mask, scale=d**-0.5)
    return out[:, :, :lq, :d]
