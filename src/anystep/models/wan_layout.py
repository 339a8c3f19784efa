"""Wan2.1 model shapes, and tiny random-weight folders in exactly the released layouts.

No checkpoint can be downloaded on these machines, so every real-scale code path is exercised on a
folder that has the real *structure* (``WanPipeline`` / ``AnyFlowPipeline`` / ``AnyFlowFARPipeline``
with ``AutoencoderKLWan``, ``UMT5EncoderModel`` and a tokenizer) at toy width. The full-size
transformer configs below are the published Wan2.1 T2V shapes; build them on the meta device to
size a recipe without allocating it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from anystep.models.folders import save_anyflow_folder, save_teacher_folder
from anystep.models.students import student_from_teacher
from anystep.models.text import build_tiny_umt5, build_word_tokenizer

# Published Wan2.1 T2V transformer shapes (diffusers config keys).
WAN_TRANSFORMERS: dict[str, dict] = {
    "wan1.3b": dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    "wan14b": dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
}
# The tiny stand-in keeps every structural choice of the real one (patch, qk-norm, cross-attn norm,
# 16 latent channels from an AutoencoderKLWan) and shrinks only widths and depth.
TINY_TRANSFORMER = dict(
    WAN_TRANSFORMERS["wan1.3b"], num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32,
    ffn_dim=48, num_layers=2, rope_max_seq_len=64,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def parameter_count(name: str) -> int:
    """Parameters of a published Wan transformer, counted on the meta device (nothing allocated)."""
    from diffusers import WanTransformer3DModel

    if name not in WAN_TRANSFORMERS:
        raise ValueError(f"unknown Wan shape {name!r}; known: {sorted(WAN_TRANSFORMERS)}")
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_TRANSFORMERS[name])
    return sum(p.numel() for p in model.parameters())


def build_tiny_wan_folder(dest, kind: str = "teacher", seed: int = 0, chunk_partition=(1, 1, 1, 1)) -> Path:
    """Write a random-weight folder of a released layout: ``teacher`` (WanPipeline), ``anyflow``
    (AnyFlowPipeline) or ``anyflow_far`` (AnyFlowFARPipeline). Pixel clips of 1 + 4k frames, sides a
    multiple of 16 (VAE x8, patch x2)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel


    if kind not in ("teacher", "anyflow", "anyflow_far"):
        raise ValueError(f"kind must be teacher, anyflow or anyflow_far, got {kind!r}")
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    tokenizer = build_word_tokenizer()
    text_encoder = build_tiny_umt5(len(tokenizer), d_model=TINY_TRANSFORMER["text_dim"], seed=seed).eval()
    if kind == "teacher":
        return save_teacher_folder(dest, transformer, text_encoder, tokenizer, vae)
    student = student_from_teacher(
        transformer, causal=kind == "anyflow_far",
        chunk_partition=tuple(chunk_partition) if kind == "anyflow_far" else None,
    )
    return save_anyflow_folder(dest, student.eval(), text_encoder, tokenizer, vae)
