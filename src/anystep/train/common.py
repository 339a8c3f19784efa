"""Pieces every training method shares: EMA, JSONL metrics, LR schedules, atomic files and folders."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from anystep.errors import UserError
from anystep.fsutil import atomic_file, read_marker, swap_folder_in, temp_folder_beside, write_marker


class EMA:
    """Exponential moving average of a module's parameters, switched on after ``start`` updates."""

    def __init__(self, module: torch.nn.Module, decay: float, start: int = 0):
        self.decay, self.start = decay, start
        self.shadow = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = 0.0 if step < self.start else self.decay
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k])

    def ema_copy(self, module: torch.nn.Module) -> torch.nn.Module:
        m = copy.deepcopy(module)
        self.copy_to(m)
        return m

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start": self.start, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.start = state["decay"], state["start"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def warmup_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


def warmup_cooldown_lambda(warmup: int, total: int, cooldown: int):
    """Learning-rate multiplier: linear warm-up, constant, then a linear decay to zero over the
    last ``cooldown`` of ``total`` steps (warm-up / stable / decay). The multiplier is a function
    of the step alone, so a run resumed with a longer ``total`` is the run that had that total
    from the start, as long as its cooldown had not begun."""
    warm = warmup_lambda(warmup)
    start = total - cooldown

    def factor(step: int) -> float:
        if cooldown <= 0 or step < start:
            return warm(step)
        return min(warm(step), max(0.0, (total - step) / cooldown))

    return factor


def atomic_write(path: str | os.PathLike, write, binary: bool = True) -> Path:
    """Write through ``write(file_object)``; the file appears only complete (``fsutil.atomic_file``:
    written beside, fsynced, renamed), so a reader or a crash never sees half of it."""

    def through_file(tmp):
        with open(tmp, "wb" if binary else "w") as f:
            write(f)

    return atomic_file(path, through_file)


def atomic_save_folder(write_fn, dest: str | os.PathLike, kind: str | None = None) -> None:
    """Build a folder with ``write_fn(tmpdir)`` next to ``dest`` and swap it in by rename.

    A crash leaves either the old folder or the new one, never a mix. ``kind`` marks the folder
    as ours (:mod:`anystep.fsutil`); an existing ``dest`` is replaced only when it is empty, ours,
    or a model folder (``model_index.json``) -- never a file or a foreign folder.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} exists and is not a folder; it is left as it is: choose another destination")
    if dest.is_dir() and any(dest.iterdir()) and read_marker(dest) is None and not (dest / "model_index.json").is_file():
        raise UserError(f"{dest} is a non-empty folder not written by anystep; it is left as it is: choose another destination")
    tmp = temp_folder_beside(dest)
    try:
        write_fn(tmp)
        if kind is not None:
            write_marker(tmp, kind)
        swap_folder_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class JsonlLogger:
    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.path:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
