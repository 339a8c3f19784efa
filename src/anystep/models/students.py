"""Flow-map students initialised from a Wan teacher, and the two network calls the method makes.

Why this module exists (docs/design.md section 1, paper Sec. 4.2.1 "Interpolated Timestep Conditioning"):
a flow map ``u(z_t, t, r)`` is the teacher's network plus a second timestep embedding ``emb'``
for the target time ``r``. diffusers ships that network (``AnyFlowTransformer3DModel`` and the causal
``AnyFlowFARTransformer3DModel``) but no way to start it from a Wan checkpoint:
``from_pretrained`` on a Wan folder leaves ``delta_embedder`` (= ``emb'``) on the meta device.
So we build the student from a translated config, load the Wan weights non-strictly, check that
exactly the expected keys were missing, and initialise the new parts ourselves:

* ``emb'`` starts as a copy of the pretrained time embedder (paper: "emb' is initialized from the
  pretrained emb"). With the mixture ``(1 - gate) emb(t) + gate emb'(r)`` (gate 0.25 in the
  reference code) the student then equals the teacher exactly on the boundary ``r = t``, which is
  what makes Stage 1 a post-training rather than a cold start -- and what the tests check.
* For the causal student, the compressed-context patchify (FAR, paper Sec. 4.3: kernel 4 for
  context chunks beyond the 3 full-resolution ones) is warm-started by trilinear interpolation of
  the *loaded* full-resolution patch embedding, as the FAR class does in ``__init__`` for its own
  random weights.

Latent layout everywhere in ``anystep`` is the AnyFlow one, ``(B, F, C, h, w)``; times are sigmas in
``[0, 1]`` (1 = noise) and become model timesteps as ``1000 * sigma`` (docs/design.md section 3).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from anystep.models.folders import ModelFolderError, is_toy_folder, load_pipeline, read_model_index, save_anyflow_folder
from anystep.models.padded_text import text_length, use_padded_text


#: Reference causal chunk partition (docs/design.md section 3: 81 frames = 21 latents = 1 + 6*3 + 2).
REFERENCE_CHUNK_PARTITION = (1, 3, 3, 3, 3, 3, 3, 2)
#: FAR context patchify and number of full-resolution chunks of the reference recipe.
REFERENCE_COMPRESSED_PATCH = (1, 4, 4)
REFERENCE_FULL_CHUNK_LIMIT = 3

# WanTransformer3DModel.__init__ arguments that carry straight over to the AnyFlow classes.
_SHARED_KEYS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "eps",
    "image_dim",
    "rope_max_seq_len",
)
# Wan arguments that have no AnyFlow counterpart; only their "feature off" value is accepted.
_WAN_ONLY_KEYS = ("qk_norm", "added_kv_proj_dim", "pos_embed_seq_len")

_DELTA_PREFIX = "condition_embedder.delta_embedder."
_FAR_PATCH_PREFIX = "far_patch_embedding."


def _plain_config(wan_config) -> dict:
    if hasattr(wan_config, "config") and not isinstance(wan_config, Mapping):
        wan_config = wan_config.config  # a model was passed
    if not isinstance(wan_config, Mapping):
        raise TypeError(f"expected a WanTransformer3DModel config mapping, got {type(wan_config).__name__}")
    cfg = {k: v for k, v in dict(wan_config).items() if not k.startswith("_")}
    cls = dict(wan_config).get("_class_name")
    if cls is not None and cls != "WanTransformer3DModel":
        raise ValueError(f"expected a WanTransformer3DModel config, got one for {cls}")
    return cfg


def as_partition(chunk_partition) -> tuple[int, ...]:
    if isinstance(chunk_partition, (str, bytes)) or not isinstance(chunk_partition, Sequence):
        raise ValueError(f"chunk_partition must be a sequence of positive ints, got {chunk_partition!r}")
    part = tuple(int(c) for c in chunk_partition)
    if not part or any(c < 1 or c != o for c, o in zip(part, chunk_partition)):
        raise ValueError(f"chunk_partition must be a non-empty sequence of positive ints, got {list(chunk_partition)}")
    return part


def anyflow_config_from_wan(
    wan_config,
    causal: bool = False,
    chunk_partition: Sequence[int] | None = None,
    gate_value: float = 0.25,
    deltatime_type: str = "r",
    compressed_patch_size: Sequence[int] = REFERENCE_COMPRESSED_PATCH,
    full_chunk_limit: int = REFERENCE_FULL_CHUNK_LIMIT,
) -> dict:
    """Translate a ``WanTransformer3DModel`` config into ``AnyFlow[FAR]Transformer3DModel`` kwargs.

    ``gate_value`` 0.25 is the weight of ``emb'(r)`` (0.75 on ``emb(t)``), the reference code's value
    (docs/design.md section 3; the paper's text writes the mixture the other way round).
    ``deltatime_type="r"`` feeds ``r`` itself to ``emb'`` (the reference); ``"t-r"`` is MeanFlow's
    interval variant. ``chunk_partition`` (causal only) defaults to the reference 21-latent-frame
    partition; it must sum to the latent frame count the student will generate.

    Raises ``ValueError`` for Wan features the AnyFlow networks do not implement: image
    cross-attention K/V (``added_kv_proj_dim``, Wan I2V), image position embeddings
    (``pos_embed_seq_len``, Wan FLF2V), a q/k norm other than RMSNorm across heads, temporal or
    non-square patches (AnyFlow's unpatchify assumes ``(1, p, p)``), and unknown config keys.
    """
    cfg = _plain_config(wan_config)
    unknown = sorted(set(cfg) - set(_SHARED_KEYS) - set(_WAN_ONLY_KEYS))
    if unknown:
        raise ValueError(f"Wan config has keys the AnyFlow networks do not know: {unknown}")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise ValueError(
            f"Wan qk_norm={cfg['qk_norm']!r} is not supported: AnyFlow attention always applies RMSNorm "
            "across heads to q and k ('rms_norm_across_heads')"
        )
    if cfg.get("added_kv_proj_dim") is not None:
        raise ValueError(
            f"Wan added_kv_proj_dim={cfg['added_kv_proj_dim']} (image cross-attention of Wan I2V) is not supported: "
            "AnyFlow attention has no add_k_proj/add_v_proj; AnyFlow does I2V through the causal chunk partition"
        )
    if cfg.get("pos_embed_seq_len") is not None:
        raise ValueError(
            f"Wan pos_embed_seq_len={cfg['pos_embed_seq_len']} (FLF2V image position embedding) is not supported "
            "by AnyFlow's image embedder"
        )
    patch = tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2)))
    if len(patch) != 3 or patch[0] != 1 or patch[1] != patch[2]:
        raise ValueError(
            f"Wan patch_size={list(patch)} is not supported: AnyFlow's unpatchify assumes (1, p, p) patches"
        )
    if deltatime_type not in ("r", "t-r"):
        raise ValueError(f"deltatime_type must be 'r' or 't-r', got {deltatime_type!r}")
    if not 0.0 <= float(gate_value) <= 1.0:
        raise ValueError(f"gate_value must lie in [0, 1], got {gate_value}")

    out = {k: (list(cfg[k]) if k == "patch_size" else cfg[k]) for k in _SHARED_KEYS if k in cfg}
    out.update(gate_value=float(gate_value), deltatime_type=deltatime_type)
    if not causal:
        if chunk_partition is not None:
            raise ValueError("chunk_partition only applies to the causal (FAR) student; pass causal=True")
        return out

    part = as_partition(REFERENCE_CHUNK_PARTITION if chunk_partition is None else chunk_partition)
    cps = tuple(int(p) for p in compressed_patch_size)
    if len(cps) != 3 or any(c < p or c % p for c, p in zip(cps, patch)) or cps[0] != 1 or cps[1] != cps[2]:
        raise ValueError(
            f"compressed_patch_size={list(cps)} must be (1, q, q) with q a multiple of the patch {patch[1]}"
        )
    if int(full_chunk_limit) < 1:
        raise ValueError(f"full_chunk_limit must be >= 1, got {full_chunk_limit}")
    if len(part) < int(full_chunk_limit) - 1:
        # AnyFlowFARPipeline sizes its compressed KV cache by (n_chunks - full_chunk_limit + 1).
        raise ValueError(
            f"chunk_partition {list(part)} has {len(part)} chunk(s); diffusers' FAR pipeline needs at least "
            f"full_chunk_limit - 1 = {int(full_chunk_limit) - 1}"
        )
    out.update(
        chunk_partition=list(part),
        compressed_patch_size=list(cps),
        full_chunk_limit=int(full_chunk_limit),
    )
    return out


def far_patch_init(
    patch_weight: torch.Tensor, patch_bias: torch.Tensor, compressed_patch_size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed-context patchify weights warm-started from the full-resolution ones.

    Trilinear interpolation of each (out, in) kernel to the larger kernel, the same rule
    ``AnyFlowFARTransformer3DModel.__init__`` applies to its freshly initialised weights (FAR's
    ``setup_far_model``); done here on the *teacher's* patch embedding. Computed in fp32.
    """
    inner, cin = patch_weight.shape[:2]
    w = patch_weight.detach().float().reshape(inner * cin, 1, *patch_weight.shape[2:])
    w = F.interpolate(w, size=tuple(compressed_patch_size), mode="trilinear", align_corners=False)
    w = w.reshape(inner, cin, *compressed_patch_size).to(patch_weight.dtype)
    return w, patch_bias.detach().clone()


def _load_wan_transformer(teacher):
    from diffusers import WanTransformer3DModel

    if isinstance(teacher, WanTransformer3DModel):
        return teacher
    if isinstance(teacher, torch.nn.Module):
        raise TypeError(f"expected a WanTransformer3DModel, got {type(teacher).__name__}")
    folder = Path(teacher)
    if (folder / "model_index.json").exists():
        index = read_model_index(folder)
        if index["_class_name"] != "WanPipeline":
            raise ValueError(f"{folder} is a {index['_class_name']} folder, not a Wan teacher (WanPipeline)")
        transformer = WanTransformer3DModel.from_pretrained(str(folder), subfolder="transformer")
        return use_padded_text(transformer) if is_toy_folder(folder) else transformer
    if (folder / "config.json").exists():
        cls = json.loads((folder / "config.json").read_text()).get("_class_name")
        if cls != "WanTransformer3DModel":
            raise ValueError(f"{folder} holds a {cls}, not a WanTransformer3DModel")
        return WanTransformer3DModel.from_pretrained(str(folder))
    raise ValueError(f"{folder} is neither a WanPipeline folder nor a WanTransformer3DModel folder")


def student_from_teacher(
    teacher_transformer_or_folder,
    causal: bool = False,
    chunk_partition: Sequence[int] | None = None,
    **kw,
):
    """A flow-map student holding the teacher's weights: ``AnyFlowTransformer3DModel`` or, with
    ``causal=True``, ``AnyFlowFARTransformer3DModel``.

    ``teacher_transformer_or_folder`` is a ``WanTransformer3DModel``, a ``WanPipeline`` folder or a
    transformer folder. ``kw`` goes to :func:`anyflow_config_from_wan` (``gate_value``,
    ``deltatime_type``, ``compressed_patch_size``, ``full_chunk_limit``).

    Wan and AnyFlow share every parameter name, so no key mapping is needed; the only keys the
    teacher lacks are ``delta_embedder.*`` (and ``far_patch_embedding.*`` for FAR), which are
    initialised as described in the module docstring. Anything else missing or unexpected raises.
    The student is built on the meta device and takes clones of the teacher's tensors, so it costs
    one copy of the weights, keeps the teacher's per-tensor dtypes (e.g. bf16 with fp32 embedders)
    and device, and never aliases the teacher.
    """
    from accelerate import init_empty_weights
    from diffusers import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    teacher = _load_wan_transformer(teacher_transformer_or_folder)
    config = anyflow_config_from_wan(teacher.config, causal=causal, chunk_partition=chunk_partition, **kw)
    cls = AnyFlowFARTransformer3DModel if causal else AnyFlowTransformer3DModel
    with init_empty_weights(include_buffers=False):
        student = cls(**config)

    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    result = student.load_state_dict(state, strict=False, assign=True)
    expected_prefixes = (_DELTA_PREFIX, _FAR_PATCH_PREFIX) if causal else (_DELTA_PREFIX,)
    wrong_missing = [k for k in result.missing_keys if not k.startswith(expected_prefixes)]
    if wrong_missing or result.unexpected_keys:
        raise ValueError(
            "the Wan teacher's weights do not fit the AnyFlow student: "
            f"missing {wrong_missing[:8]}{'...' if len(wrong_missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )

    new = {}
    emb = student.condition_embedder
    for k, v in emb.time_embedder.state_dict().items():
        new[_DELTA_PREFIX + k] = v.detach().clone()
    if causal:
        w, b = far_patch_init(
            student.patch_embedding.weight, student.patch_embedding.bias, config["compressed_patch_size"]
        )
        new[_FAR_PATCH_PREFIX + "weight"], new[_FAR_PATCH_PREFIX + "bias"] = w, b
    missing_after = set(result.missing_keys) - set(new)
    if missing_after:
        raise ValueError(f"student keys left uninitialised: {sorted(missing_after)}")
    student.load_state_dict(new, strict=False, assign=True)

    meta = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"student tensors left on the meta device: {meta}")
    device = next(teacher.parameters()).device
    student.to(device)  # non-persistent buffers (e.g. the gate) were built on the CPU
    student.train(teacher.training)
    if text_length(teacher) is not None:
        use_padded_text(student, text_length(teacher))
    return student


def student_folder_from_teacher(
    teacher_folder,
    dest,
    causal: bool = False,
    chunk_partition: Sequence[int] | None = None,
    num_frames: int | None = None,
    **kw,
) -> Path:
    """Write an ``AnyFlowPipeline`` (``causal=True``: ``AnyFlowFARPipeline``) folder initialised from
    a ``WanPipeline`` teacher folder.

    Models in, models out (docs/design.md section 2): the student folder reuses the teacher's tokenizer,
    text encoder, codec and scheduler shift, so stock diffusers pipelines load and sample it.
    ``num_frames`` (pixel frames), when given, is checked against ``chunk_partition``: a causal
    student can only generate clips whose latent frame count equals the partition's sum.
    """
    pipe = load_pipeline(teacher_folder)
    if type(pipe).__name__ != "WanPipeline":
        raise ModelFolderError(f"{teacher_folder}: expected a teacher (WanPipeline) folder, got {type(pipe).__name__}")
    student = student_from_teacher(pipe.transformer, causal=causal, chunk_partition=chunk_partition, **kw)
    if causal and num_frames is not None:
        check_chunk_partition(student.config.chunk_partition, num_frames, int(pipe.vae.config.scale_factor_temporal))
    shift = float(getattr(pipe.scheduler.config, "shift", 5.0))
    return save_anyflow_folder(dest, student.eval(), pipe.text_encoder, pipe.tokenizer, pipe.vae, shift=shift)


def check_chunk_partition(chunk_partition: Sequence[int], num_frames: int, temporal_factor: int = 1) -> int:
    """Raise ``ValueError`` unless ``chunk_partition`` sums to the latent frame count of ``num_frames``
    pixel frames (``(num_frames - 1) // temporal_factor + 1``, the Wan VAE rule); return that count."""
    latent_frames = (int(num_frames) - 1) // int(temporal_factor) + 1
    part = as_partition(chunk_partition)
    if sum(part) != latent_frames:
        raise ValueError(
            f"chunk_partition {list(part)} covers {sum(part)} latent frames, but {num_frames} frames make "
            f"{latent_frames} latent frames (temporal factor {temporal_factor}); pick a partition that sums to "
            f"{latent_frames}"
        )
    return latent_frames


# -- FAR KV-cache inference: mask the alignment padding ---------------------------------------------


@functools.lru_cache(maxsize=128)
def _kv_padding_mask(q_len: int, kv_real: int, kv_len: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < kv_real

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device, _compile=False)


@functools.lru_cache(maxsize=None)
def _padding_masked_processor_cls():
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowCausalAttnProcessor

    class PaddingMaskedCausalAttnProcessor(AnyFlowCausalAttnProcessor):
        """``AnyFlowCausalAttnProcessor`` whose KV-cache inference step masks the zero padding.

        The stock processor pads q/k/v with zeros to a multiple of 128 tokens (the BlockMask block
        size) and, on the autoregressive step, calls flex attention *without* a mask, so every query
        also attends to up to 127 all-zero keys (score 0, value 0). The training and cache-prefill
        paths mask that padding, so the stock pipeline samples with a different attention than the
        one the model is trained with. Measured on the toy student (16 tokens per frame, where a
        1-frame chunk is 16 real keys among 128): max |difference| ~0.13 in u for the first chunk;
        0 when the chunk length is a multiple of 128. Here the same padded call gets a BlockMask that
        admits exactly the real keys, which makes the KV-cache step equal the training forward.
        """

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
            if kv_cache is not None and not kv_cache_flag["is_cache_step"] and attention_mask is None:
                q_len = hidden_states.shape[1]
                pad = math.ceil(q_len / 128) * 128 - q_len
                if pad:
                    kv_real = (
                        q_len + kv_cache_flag["num_cached_compressed_tokens"] + kv_cache_flag["num_cached_full_tokens"]
                    )
                    attention_mask = _kv_padding_mask(q_len + pad, kv_real, kv_real + pad, str(hidden_states.device))
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, kv_cache, kv_cache_flag
            )

    return PaddingMaskedCausalAttnProcessor


def mask_far_inference_padding(transformer):
    """Make a FAR student's KV-cache inference attend only to real tokens (see
    ``PaddingMaskedCausalAttnProcessor``); in place, idempotent, returns the model. The training and
    cache-prefill forwards are unchanged (they already mask the padding)."""
    from diffusers import AnyFlowFARTransformer3DModel

    if not isinstance(transformer, AnyFlowFARTransformer3DModel):
        raise TypeError(f"expected an AnyFlowFARTransformer3DModel, got {type(transformer).__name__}")
    cls = _padding_masked_processor_cls()
    for block in transformer.blocks:
        proc = block.attn1.processor
        if isinstance(proc, cls):  # already masked, or the dense CPU processor (a subclass)
            continue
        new = cls()
        # Keep whatever backend the caller configured on the instance (the class default is flex).
        if "_attention_backend" in vars(proc):
            new._attention_backend = proc._attention_backend
        block.attn1.set_processor(new)
    return transformer
