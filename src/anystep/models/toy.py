"""Architecture of the shipped toy teacher: a tiny ``WanTransformer3DModel``."""

from __future__ import annotations

from diffusers import WanTransformer3DModel

TOY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=48,
    out_channels=48,
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

    return use_padded_text(WanTransformer3DModel(**{**TOY_TRANSFORMER, **overrides}))
