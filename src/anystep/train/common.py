"""Pieces every training method shares: EMA, JSONL metrics, LR schedules."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch



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
