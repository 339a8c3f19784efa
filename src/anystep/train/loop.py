"""The shared training loop: AdamW + warm-up, clipping, gradient accumulation, EMA, JSONL metrics,
a progress bar, and atomic DCP checkpoints (:mod:`anystep.train.checkpoint`) whose resume continues
with the same next loss, at the same or another world size.

Randomness is drawn from a generator seeded by (seed, step), so a resumed run draws exactly the
numbers an uninterrupted one would have, without replaying any RNG state. The data position is
the step counter itself (clip indices are a function of the step).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from anystep.distributed import DistEnv, all_sum, autocast, current, global_mean, is_sharded, local_value
from anystep.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
    trainable_tensors,
)
from anystep.train.common import EMA, JsonlLogger, warmup_lambda
from anystep.train.progress import Progress
from anystep.train.runfolder import apply_resumed_hyperparams


def step_generator(seed: int, step: int, micro: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator for one (micro-)step: identical on every rank and after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 97 + stream) % (2**63 - 1))


@dataclass(frozen=True)
class RankSlice:
    """This rank's rows of the global batch.

    Per-sample random numbers are drawn for the *whole* global batch from a generator every rank
    shares, then sliced: N ranks then train on exactly the numbers one process would draw for the
    same global batch (and one process draws what it always drew). Draws happen on the CPU, so they
    are the same on every device; the caller moves them.
    """

    rank: int = 0
    world_size: int = 1

    def take(self, values: torch.Tensor, local: int) -> torch.Tensor:
        return values[self.rank * local : (self.rank + 1) * local]

    def rand(self, gen: torch.Generator, local: int, dtype=torch.float32) -> torch.Tensor:
        return self.take(torch.rand(local * self.world_size, generator=gen, dtype=dtype), local)

    def randn(self, gen: torch.Generator, shape, dtype=torch.float32) -> torch.Tensor:
        local = shape[0]
        return self.take(torch.randn((local * self.world_size, *shape[1:]), generator=gen, dtype=dtype), local)


class SlicedNoise:
    """A noise source for rollouts (consistency re-noising): global draws, this rank's rows."""

    def __init__(self, gen: torch.Generator, ranks: RankSlice):
        self.gen, self.ranks = gen, ranks

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return self.ranks.randn(self.gen, shape, dtype)


class TrainLoop:
    """Owns optimiser, scheduler, EMA and checkpoints for one trainable module.

    ``loss_fn(step, micro) -> (loss, metrics)`` computes one micro-batch's loss; the loop scales it
    for accumulation, clips, steps, updates EMA, logs, and checkpoints. Under torchrun the module
    is FSDP2-sharded (:func:`anystep.distributed.shard`): gradients are averaged over ranks, the
    clip norm, EMA and checkpoint work on the shards, and rank 0 logs global means.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        out: str | Path,
        cfg,
        *,
        name: str = "train",
        env: DistEnv | None = None,
    ):
        self.module = module
        self.cfg = cfg
        self.env = env or current()
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
        self.logger = JsonlLogger(self.out / "metrics.jsonl" if self.env.is_main else None)

    # -- checkpoints ---------------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {
            "model": trainable_tensors(self.module, self.params),
            "optim": optimizer_state(self.module, self.opt),
            "ema": self.ema.shadow,
        }

    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks: a resume must keep it (the data position and
        the rank-sliced random draws are functions of it)."""
        return int(self.cfg.batch_size) * self.env.world_size * max(1, int(getattr(self.cfg, "grad_accum", 1)))

    def save(self) -> None:
        meta = {"step": self.step, "config": asdict(self.cfg), "sched": self.sched.state_dict(), "name": self.name,
                "global_batch": self.global_batch()}
        save_checkpoint(self.out, self._tensors(), meta)

    def maybe_resume(self) -> bool:
        if not find_checkpoint(self.out):
            return False
        tensors = self._tensors()
        meta = load_checkpoint(self.out, tensors, expect_global_batch=self.global_batch())
        load_optimizer_state(self.module, self.opt, tensors["optim"])
        self.sched.load_state_dict(meta["sched"])
        apply_resumed_hyperparams(self.opt, self.sched, [self.cfg.lr], self.cfg.betas, self.cfg.weight_decay)
        self.step = int(meta["step"])
        return True

    # -- the loop ------------------------------------------------------------------------------
    def run(self, loss_fn: Callable[[int, int], tuple[torch.Tensor, dict]], steps: int, on_step=None) -> None:
        cfg = self.cfg
        accum = max(1, int(getattr(cfg, "grad_accum", 1)))
        t0 = time.time()
        progress = Progress(self.name, steps, self.step, enabled=self.env.is_main)
        while self.step < steps:
            total, metrics, gn = optimizer_step(self.module, self.params, self.opt, self.sched, loss_fn, self.step, accum,
                                                cfg.grad_clip, self.env, getattr(cfg, "mixed_precision", False), "loss")
            self.step += 1
            self.ema.update(self.module, self.step)
            progress.update(self.step, {"loss": total, **metrics})
            if self.step % cfg.log_every == 0 or self.step == steps or self.step == 1:
                lr = self.sched.get_last_lr()[0]
                # "loss" is this step's (what resume and rank-parity checks compare); "*_mean" the window's.
                rec = {"step": self.step, **global_mean({"loss": total, **metrics, **progress.window(self.step, lr)}),
                       "grad_norm": gn, "lr": lr, "time": time.time() - t0}
                if on_step is not None:
                    rec.update(on_step(self.step) or {})
                self.logger.log(rec)
            if self.step % cfg.ckpt_every == 0 or self.step == steps:
                self.save()
        progress.close(str(self.out / "checkpoint"))

    def ema_module(self) -> torch.nn.Module:
        return self.ema.ema_copy(self.module)


def optimizer_step(module, params, opt, sched, loss_fn, step: int, accum: int, grad_clip: float, env: DistEnv | None,
                   mixed_precision: bool, what: str) -> tuple[float, dict, float]:
    """One optimiser update over ``accum`` micro-batches: ``(mean loss, mean metrics, grad norm)``.

    Shared by every trainer. A sharded module reduce-scatters its gradients once, after the last
    micro-batch; an unsharded one on CUDA computes under bf16 autocast (FSDP's policy casts a
    sharded one); the clip norm is the global one (DTensor gradients).
    """
    sharded = is_sharded(module)
    opt.zero_grad(set_to_none=True)
    total, metrics = 0.0, {}
    for micro in range(accum):
        if sharded:
            module.set_requires_gradient_sync(micro == accum - 1)
        with autocast(env, mixed_precision and not sharded) if env is not None else contextlib.nullcontext():
            loss, m = loss_fn(step, micro)
        check_finite(loss, f"{what} at step {step}")
        (loss / accum).backward()
        total += loss.item() / accum
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + float(v) / accum
    gn = float(local_value(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return total, metrics, gn


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Stop on a non-finite loss on *any* rank (every rank raises, none waits in a collective)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0])
    if float(all_sum(bad)[0]) > 0:
        raise FloatingPointError(f"non-finite {what} (value here: {loss.item()})")


def write_resolved_config(out: Path, cfg) -> None:
    if not current().is_main:
        return
    (Path(out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))


def final_folder_from_checkpoint(run_dir) -> Path:
    """Sharded runs: rank 0 writes ``<run>/model`` from the final checkpoint's EMA weights (the same
    rebuild ``anystep export`` does, on one process).

    The process group is torn down first: at 14B the rebuild takes long enough that ranks waiting
    in a collective for it would hit the timeout, and it needs no other rank.
    """
    from anystep.distributed import shutdown

    env = current()
    dest = Path(run_dir) / "model"
    shutdown()
    if env.is_main:
        from anystep.export import export_run

        export_run(run_dir, dest)
    return dest
