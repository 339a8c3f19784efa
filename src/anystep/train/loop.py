"""The shared training loop: AdamW + warm-up, clipping, gradient accumulation, EMA, JSONL metrics,
a progress bar, and atomic checkpoints whose resume continues with the same next loss.

Randomness is drawn from a generator seeded by (seed, step), so a resumed run draws exactly the
numbers an uninterrupted one would have, without replaying any RNG state. The data position is
the step counter itself (clip indices are a function of the step).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from anystep.train.common import EMA, JsonlLogger, atomic_torch_save, load_trainable, warmup_lambda


def step_generator(seed: int, step: int, micro: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (micro-)step: identical on every rank and after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 97 + stream) % (2**63 - 1))


class TrainLoop:
    """Owns optimiser, scheduler, EMA and checkpoints for one trainable module.

    ``loss_fn(step, micro) -> (loss, metrics)`` computes one micro-batch's loss; the loop scales it
    for accumulation, clips, steps, updates EMA, logs, and checkpoints.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        out: str | Path,
        cfg,
        *,
        name: str = "train",
    ):
        self.module = module
        self.cfg = cfg
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires grad")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_lambda(cfg.warmup))
        self.ema = EMA(module, cfg.ema_decay, cfg.ema_start)
        self.step = 0
        self.logger = JsonlLogger(self.out / "metrics.jsonl")
        self.ckpt_path = self.out / "checkpoint.pt"

    # -- checkpoints ---------------------------------------------------------------------------
    def trainable_state(self) -> dict:
        names = {id(p): n for n, p in self.module.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.params}

    def save(self) -> None:
        atomic_torch_save(
            {
                "step": self.step,
                "trainable": self.trainable_state(),
                "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(),
                "ema": self.ema.state_dict(),
                "config": asdict(self.cfg),
            },
            self.ckpt_path,
        )

    def maybe_resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, weights_only=False, map_location="cpu")
        load_trainable(self.module, state["trainable"], self.ckpt_path)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        return True

    # -- the loop ------------------------------------------------------------------------------
    def run(self, loss_fn: Callable[[int, int], tuple[torch.Tensor, dict]], steps: int, on_step=None) -> None:
        cfg = self.cfg
        accum = max(1, int(getattr(cfg, "grad_accum", 1)))
        t0 = time.time()
        bar = tqdm(total=steps, initial=self.step, desc=self.name, dynamic_ncols=True, mininterval=2.0)
        while self.step < steps:
            self.opt.zero_grad(set_to_none=True)
            metrics: dict[str, float] = {}
            total = 0.0
            for micro in range(accum):
                loss, m = loss_fn(self.step, micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
                (loss / accum).backward()
                total += loss.item() / accum
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v) / accum
            gn = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.ema.update(self.module, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            rec = {"step": self.step, "loss": total, "grad_norm": float(gn), "lr": self.sched.get_last_lr()[0],
                   "time": time.time() - t0, **metrics}
            if on_step is not None:
                rec.update(on_step(self.step) or {})
            if self.step % cfg.log_every == 0 or self.step == steps or self.step == 1:
                self.logger.log(rec)
            if self.step % cfg.ckpt_every == 0 or self.step == steps:
                self.save()
        bar.close()

    def ema_module(self) -> torch.nn.Module:
        return self.ema.ema_copy(self.module)


def write_resolved_config(out: Path, cfg) -> None:
    (Path(out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
