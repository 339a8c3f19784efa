"""``anystep export``: a training run's checkpoint -> a diffusers folder, LoRA merged or separate.

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

from anystep.errors import UserError

from pathlib import Path

import torch


class ExportError(UserError, ValueError):
    """A run folder that cannot be exported (one-line message)."""


def _rebuild(meta: dict, where: Path):
    """(student module with LoRA if trained with it, pipe, checkpoint keys of its trainable tensors
    and of their EMA, config, sampler, is_wan)."""
    from anystep.config import build_config_from_dict

    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ExportError(f"{where} holds no training config")
    if meta.get("name") == "stage2":
        from anystep.train.stage2 import Stage2Config, Stage2Trainer

        c = build_config_from_dict(Stage2Config, cfg)
        tr = Stage2Trainer(c)
        sampler = "consistency" if c.rollout == "consistency" else "flowmap"
        return tr.student, tr.pipe, "student", "ema_g", c, sampler, False
    if "grid_steps" in cfg:  # consistency ODE-init
        from anystep.train.baselines import ConsistencyInitConfig, ConsistencyInitMethod

        c = build_config_from_dict(ConsistencyInitConfig, cfg)
        m = ConsistencyInitMethod(c)
        return m.student, m.pipe, "model", "ema", c, "consistency", False
    from anystep.train.stage1 import Stage1Config, Stage1Method

    c = build_config_from_dict(Stage1Config, cfg)
    m = Stage1Method(c)
    sampler = "euler_cfg" if c.method == "flow_matching" else "flowmap"
    return m.student, m.pipe, "model", "ema", c, sampler, m.wan


def export_run(run_dir, dest, lora_file: bool = False, use_ema: bool = True) -> Path:
    """Write a diffusers folder from ``<run>/checkpoint`` (written by any number of ranks); runs on
    one process, also inside a torchrun job (rank 0 after the final checkpoint)."""
    from anystep.models.folders import save_anyflow_folder, save_teacher_folder
    from anystep.models.lora import ADAPTER, merge_student_lora
    from anystep.train.checkpoint import (
        CheckpointError,
        checkpoint_dir,
        has_checkpoint,
        load_checkpoint,
        missing_piece,
        read_meta,
        recover_interrupted_swap,
    )

    run_dir = Path(run_dir)
    where = checkpoint_dir(run_dir)
    recover_interrupted_swap(run_dir)
    if not has_checkpoint(run_dir):
        raise ExportError(f"{run_dir} is not a training run folder (no {where.name}/ checkpoint)")
    missing = missing_piece(where)
    if missing is not None:
        raise ExportError(f"the checkpoint in {where} is incomplete or damaged ({missing}); export another run")
    try:
        meta = read_meta(run_dir)
        module, pipe, key, ema_key, cfg, sampler, is_wan = _rebuild(meta, where)
        trained = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        ema = {n: torch.empty_like(p) for n, p in trained.items()}
        load_checkpoint(run_dir, {key: trained, ema_key: ema}, single_process=True)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    if use_ema:
        with torch.no_grad():
            for n, v in ema.items():
                trained[n].copy_(v)
    module.eval()
    has_lora = getattr(cfg, "lora_rank", 0) > 0
    if lora_file and not has_lora:
        raise ExportError(f"{run_dir} was trained without LoRA (lora_rank=0): there is no adapter to write separately")
    lora_sd = None
    if has_lora:
        if lora_file:
            from peft import get_peft_model_state_dict

            lora_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
            meta = {"r": int(cfg.lora_rank), "lora_alpha": int(cfg.lora_alpha or cfg.lora_rank),
                    "target_modules": list(cfg.lora_targets)}
            module.unload_lora()  # drop the adapters unmerged: the base keeps the fully trained embedders
            for p in module.parameters():
                p.requires_grad_(False)
        else:
            module = merge_student_lora(module)
    if is_wan:
        out = save_teacher_folder(dest, module, pipe.text_encoder, pipe.tokenizer, pipe.vae, shift=cfg.shift)
    else:
        out = save_anyflow_folder(dest, module, pipe.text_encoder, pipe.tokenizer, pipe.vae, shift=cfg.shift, sampler=sampler)
    if lora_sd is not None:
        import diffusers

        from anystep.models.folders import read_model_index

        cls = getattr(diffusers, read_model_index(out)["_class_name"])
        cls.save_lora_weights(out, transformer_lora_layers=lora_sd, transformer_lora_adapter_metadata=meta)
    return Path(out)
