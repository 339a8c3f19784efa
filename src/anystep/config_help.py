"""What `anystep train <method> --help` lists: every config key with its type, default and the
one-line note written beside the field in the config class."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")

# Keys every training method shares, described once; a field's own comment wins.
COMMON_NOTES = {
    "out": "the run folder: checkpoint, metrics.jsonl, tensorboard/ and, at the end, model/",
    "teacher": "the teacher folder (a WanPipeline)",
    "data": "moving_digits, or a folder of shards (`anystep synth` / `anystep encode`)",
    "num_frames": "frames of a training clip, in pixels",
    "causal": "train an AnyFlow-FAR (chunk-by-chunk, KV-cache) student",
    "chunk_partition": "causal: latent frames per chunk, summing to the clip's latent frames",
    "steps": "optimiser steps of the whole run (a resumed run continues to this count)",
    "batch_size": "clips per micro-batch on each rank",
    "grad_accum": "micro-batches per optimiser step",
    "lr": "AdamW learning rate, after the warm-up",
    "betas": "AdamW betas",
    "weight_decay": "AdamW weight decay",
    "warmup": "steps of linear learning-rate warm-up from 0",
    "grad_clip": "the gradient norm is clipped to this",
    "ema_decay": "EMA decay of the weights the final folder holds",
    "ema_start": "steps before the EMA starts averaging (until then it copies the weights)",
    "shift": "time shift of the sigma schedule, sigma' = s sigma / (1 + (s - 1) sigma)",
    "gate_value": "gate on the r-embedding of a student converted from the teacher (docs/design.md)",
    "lora_rank": "student LoRA rank; 0 = full fine-tune",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / rank; 0: alpha = rank)",
    "lora_targets": "module names the LoRA adapts (the reference's list)",
    "seed": "seed of the data order, noise and times",
    "log_every": "steps per logging window (metrics.jsonl, the log line, the loggers)",
    "ckpt_every": "steps between checkpoints (atomic; a run resumes from the last one)",
    "threads": "CPU threads for torch; 0: torch's default",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, more time",
    "real_score_clips": "empirical: training clips per prompt in the exact flow's clip set",
}


def field_notes(cls) -> dict[str, str]:
    """name -> the comment on the field's line, else the comment block right above the field, else
    the shared note of :data:`COMMON_NOTES` (empty when there is none)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in src.splitlines()[1:]:
            c = _COMMENT.match(line)
            if c:
                above.append(c.group(1).strip())
                continue
            m = _FIELD.match(line)
            if m and not line.lstrip().startswith(("def ", "@")):
                note = (m.group(2) or "").strip() or _first_sentence(" ".join(above))
                notes[m.group(1)] = note or COMMON_NOTES.get(m.group(1), "")
            above = []
    return notes


def _first_sentence(text: str) -> str:
    head = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return head if len(head) <= 110 else head[:107].rsplit(" ", 1)[0] + "..."


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def config_keys_help(cls) -> str:
    notes = field_notes(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference that does not resolve: fall back to the written annotation
        hints = {}
    rows = [(f.name, _type_name(hints.get(f.name, f.type)), _default(f), notes.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    w_name = max(len(r[0]) for r in rows)
    w_type = max(len(r[1]) for r in rows)
    lines = [f"config keys of {cls.__name__} (set as key=value, or in the --config YAML):"]
    for name, tp, default, note in rows:
        lines.append(f"  {name:<{w_name}}  {tp:<{w_type}}  default {default}" + (f"  -- {note}" if note else ""))
    return "\n".join(lines)
