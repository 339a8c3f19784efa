"""Wan's text padding at the toy's cost: cross-attention that counts the zero-padding it was not given.

Wan and AnyFlow pipelines cut the prompt embedding at its true length and zero-pad it to
``max_sequence_length`` (512 by default), and the transformer attends to every row, pads
included. The toy's models are trained under that same convention, so that the stock
``pipe(prompt, ...)`` call with its default 512 gives the right video. Attending to 512 rows of
which ~507 are identical would double the toy's training cost, though; the rows are identical
after the text projection, so attention over ``n`` copies of one key equals attention over a single
copy whose logit is raised by ``log n``. Our own code therefore encodes the toy's prompts to a few
compact rows (``anystep.models.text.TOY_TEXT_ROWS``, the last always a pad) and this processor adds
that log-multiplicity to the pad rows: the same function as the 512-row input, exactly up to
rounding. Given 512 rows (the stock pipeline) it adds nothing.
"""

from __future__ import annotations

import torch

# diffusers' Wan / AnyFlow pipelines pad prompt embeddings to this many rows by default.
WAN_TEXT_LENGTH = 512
_FLAG = "_anystep_text_length"


def pad_logit_bias(text: torch.Tensor, logical_length: int = WAN_TEXT_LENGTH, dtype=None) -> torch.Tensor | None:
    """Additive attention bias (B, 1, 1, L) that makes ``text`` (B, L, D) act as if zero-padded to
    ``logical_length`` rows, or None when it already has that many.

    The pad rows are the ones equal to the last row (the compact encoding always ends with a pad);
    each carries ``log((logical_length - real) / pads)``, so the pads' total weight in the softmax
    is that of ``logical_length - real`` copies.
    """
    b, n, _ = text.shape
    if n >= logical_length:
        return None
    last = text[:, -1:, :].float()
    diff = (text.float() - last).abs().amax(-1)
    is_pad = diff <= 1e-5 * (last.abs().amax(-1) + 1.0)
    pads = is_pad.sum(-1, keepdim=True)  # >= 1: the last row is always counted
    real = n - pads
    per_row = torch.log((logical_length - real).double() / pads.double())
    bias = torch.where(is_pad, per_row, torch.zeros((), dtype=torch.float64, device=text.device))
    return bias.to(dtype or text.dtype)[:, None, None, :]


class PaddedTextAttention:
    """Wraps a block's stock cross-attention processor and hands it :func:`pad_logit_bias` as the
    attention mask (the blocks call cross-attention without one)."""

    def __init__(self, inner, logical_length: int = WAN_TEXT_LENGTH):
        self.inner = inner
        self.logical_length = logical_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None and attention_mask is None:
            attention_mask = pad_logit_bias(encoder_hidden_states, self.logical_length, _query_dtype(hidden_states))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

    # diffusers sets and reads backend attributes on processors (``set_attention_backend``):
    # they belong to the stock one, which does the attention.
    _OWN = ("inner", "logical_length")

    def __getattr__(self, name):
        if name in self._OWN:
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)


def _query_dtype(hidden_states: torch.Tensor) -> torch.dtype:
    # SDPA wants a float mask in the query's dtype, which autocast decides, not the input's.
    dev = hidden_states.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return hidden_states.dtype


def use_padded_text(transformer, logical_length: int = WAN_TEXT_LENGTH):
    """Install :class:`PaddedTextAttention` on every block's cross-attention; in place, idempotent,
    returns the model."""
    if getattr(transformer, _FLAG, None) == logical_length:
        return transformer
    for block in getattr(transformer, "blocks", []):
        attn = getattr(block, "attn2", None)
        if attn is None:
            continue
        proc = attn.processor
        if isinstance(proc, PaddedTextAttention):
            proc.logical_length = logical_length
        else:
            attn.set_processor(PaddedTextAttention(proc, logical_length))
    setattr(transformer, _FLAG, logical_length)
    return transformer


def text_length(transformer) -> int | None:
    """The padded text length a transformer's cross-attention acts on, None for the stock one."""
    return getattr(transformer, _FLAG, None)
