"""``anystep export``: a training run's checkpoint -> a diffusers folder, LoRA merged or separate.

Only the student is built (:func:`anystep.train.student.build_student`, from the run's config
through :mod:`anystep.train.registry`): exporting a Stage-2 run loads no teacher and no critic.

Training already writes ``<run>/model`` (EMA weights, LoRA merged) when it finishes; export
serves the other cases: any intermediate checkpoint, the raw (non-EMA) weights, or the LoRA as a
separate file for ``pipe.load_lora_weights``.

* merged (default): the adapters are fused into the base weights and removed; the folder loads with
  plain diffusers, no peft needed.
* ``lora_file=True``: the folder holds the base weights *including* everything trained in full
  (the time and delta embedders of the reference recipe), and ``pytorch_lora_weights.safetensors``
  holds the adapters with their rank / alpha metadata, so ``AnyFlowPipeline.from_pretrained(dest)``
  followed by ``pipe.load_lora_weights(dest)`` gives the merged model's outputs.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
from peft import get_peft_model_state_dict

from anystep.config import ConfigError, build_config_from_dict
from anystep.errors import UserError
from anystep.models.folders import read_model_index, save_anyflow_folder, save_teacher_folder
from anystep.models.lora import ADAPTER
from anystep.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    has_checkpoint,
    missing_piece,
    read_meta,
    recover_interrupted_swap,
)
from anystep.train.registry import method_info
from anystep.train.student import is_wan, load_trained_student, save_student


class ExportError(UserError, ValueError):
    """A run folder that cannot be exported (one-line message)."""


def _run_config(meta: dict, where: Path):
    """(method info, config) of the run that wrote the checkpoint."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ExportError(f"{where} holds no training config")
    try:
        info = method_info(meta.get("name", ""))
    except KeyError:
        info = None
    if info is None or info.student_spec is None:
        raise ExportError(f"{where} was written by {meta.get('name')!r}, which has no student to export")
    # Keys an older anystep wrote and this one retired shape nothing export builds.
    known = set(info.config.__dataclass_fields__)
    try:
        return info, build_config_from_dict(info.config, {k: v for k, v in cfg.items() if k in known})
    except ConfigError as e:
        raise ExportError(f"{where}: {e}") from None


def export_run(run_dir, dest, lora_file: bool = False, use_ema: bool = True) -> Path:
    """Write a diffusers folder from ``<run>/checkpoint`` (written by any number of ranks), on one process."""
    run_dir = Path(run_dir)
    where = checkpoint_dir(run_dir)
    recover_interrupted_swap(run_dir)
    if not has_checkpoint(run_dir):
        raise ExportError(f"{run_dir} is not a training run folder (no {where.name}/ checkpoint)")
    missing = missing_piece(where)
    if missing is not None:
        raise ExportError(f"the checkpoint in {where} is incomplete or damaged ({missing}); export another run")
    try:
        info, cfg = _run_config(read_meta(run_dir), where)
        module, pipe = load_trained_student(run_dir, info.student_spec(cfg), info.method.weights, use_ema)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    has_lora = getattr(cfg, "lora_rank", 0) > 0
    sampler, wan = info.method.sampler(cfg), is_wan(module, pipe)
    if not lora_file:
        return Path(save_student(dest, module, pipe, shift=cfg.shift, sampler=sampler, wan=wan, lora=has_lora))
    if not has_lora:
        raise ExportError(f"{run_dir} was trained without LoRA (lora_rank=0): there is no adapter to write separately")
    module.eval()
    lora_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
    meta = {"r": int(cfg.lora_rank), "lora_alpha": int(cfg.lora_alpha or cfg.lora_rank), "target_modules": list(cfg.lora_targets)}
    module.unload_lora()  # drop the adapters unmerged: the base keeps the fully trained embedders
    for p in module.parameters():
        p.requires_grad_(False)
    parts = (pipe.text_encoder, pipe.tokenizer, pipe.vae)
    if wan:
        out = save_teacher_folder(dest, module, *parts, shift=cfg.shift)
    else:
        out = save_anyflow_folder(dest, module, *parts, shift=cfg.shift, sampler=sampler)
    cls = getattr(diffusers, read_model_index(out)["_class_name"])
    cls.save_lora_weights(out, transformer_lora_layers=lora_sd, transformer_lora_adapter_metadata=meta)
    return Path(out)
