"""Architecture of the shipped toy teacher: a tiny ``WanTransformer3DModel``."""

from __future__ import annotations

import warnings

import torch
from diffusers import WanTransformer3DModel

TOY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    # The projected codec's channels (codec.py): a token of 28 x 4 = 112 values, within the 128 the
    # output layer can span (output_span).
    in_channels=28,
    out_channels=28,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


def build_toy_transformer(**overrides) -> WanTransformer3DModel:
    """A toy Wan transformer that attends to compact text rows as to Wan's 512 padded ones."""
    from anystep.models.padded_text import use_padded_text

    model = WanTransformer3DModel(**{**TOY_TRANSFORMER, **overrides})
    warn_if_narrow(model, "this toy transformer", stacklevel=3)
    return use_padded_text(model)


def warn_if_narrow(transformer, what: str, stacklevel: int = 2) -> None:
    """Warn when ``transformer``'s output cannot span its tokens (:func:`output_span`)."""
    span, token = output_span(transformer)
    if span < token:
        warnings.warn(f"{what}: its output spans {span} of a token's {token} values; its velocity is a constant in "
                      f"the other {token - span} directions, so every sampler passes that part of the initial "
                      f"noise through to the sample at any step count (docs/toy-world.md, the codec)",
                      stacklevel=stacklevel + 1)


def output_span(transformer) -> tuple[int, int]:
    """(directions one token's output can span, values in a token): ``proj_out`` maps ``inner_dim``
    hidden values to ``out_channels * prod(patch_size)``. Where the first is the smaller, the
    velocity is a constant in the rest, and every sampler passes that part of the noise through."""
    cfg = transformer.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    token = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    return min(inner, token), token


def project_transformer(transformer, basis: torch.Tensor):
    """A toy transformer for a projected codec (latent ``y = basis @ x`` per position), carried over
    from one trained on the exact codec's latents ``x``: the patch embedding reads ``basis.T @ y``
    (so it sees what the old one saw of the projection) and the output is projected onto the basis
    (the old velocity's coordinates). Everything between is shared; ``in_channels`` and
    ``out_channels`` become ``basis``'s rows."""
    k, c = basis.shape
    cfg = dict(transformer.config)
    if cfg["in_channels"] != c or cfg["out_channels"] != c:
        raise ValueError(f"basis of {c}-channel blocks for a transformer with {cfg['in_channels']} channels")
    new = build_toy_transformer(**{**{n: cfg[n] for n in TOY_TRANSFORMER}, "in_channels": k, "out_channels": k})
    state = transformer.state_dict()
    basis = basis.to(torch.float64)
    w = state["patch_embedding.weight"].double()  # (inner, c, pt, ph, pw)
    state["patch_embedding.weight"] = torch.einsum("ocxyz,kc->okxyz", w, basis).float()
    inner = state["proj_out.weight"].shape[1]
    pt, ph, pw = cfg["patch_size"]
    # Wan's proj_out rows run over (pt, ph, pw, channel), the channel fastest.
    wo = state["proj_out.weight"].double().reshape(pt * ph * pw, c, inner)
    state["proj_out.weight"] = torch.einsum("kc,pci->pki", basis, wo).reshape(-1, inner).float()
    bo = state["proj_out.bias"].double().reshape(pt * ph * pw, c)
    state["proj_out.bias"] = torch.einsum("kc,pc->pk", basis, bo).reshape(-1).float()
    new.load_state_dict(state)
    return new
