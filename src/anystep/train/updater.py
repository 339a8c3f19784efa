"""One optimiser update of one module: the pieces a training method hands the loop.

An :class:`Updater` holds a module's trainable parameters, AdamW, the LR schedule, the EMA and the
loss they minimise. Stage 1, the consistency ODE-init and the teacher have one; Stage 2 has two,
the generator (student) and the critic, stepped 1:1 -- DMD2's alternation as two optimiser groups.

Randomness is drawn from a generator seeded by (seed, step), so a resumed run draws exactly the
numbers an uninterrupted one would have, without replaying any RNG state; every per-sample draw is
made for the global batch and sliced per rank (:class:`RankSlice`), so N ranks train on what one
process would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from anystep.distributed import DistEnv, all_sum, autocast, is_sharded, local_value
from anystep.train.checkpoint import load_optimizer_state, optimizer_state, trainable_tensors
from anystep.train.common import EMA, warmup_lambda
from anystep.train.runfolder import apply_resumed_hyperparams

#: ``loss(step, micro) -> (loss, metrics)`` for one micro-batch.
LossFn = Callable[[int, int], tuple[torch.Tensor, dict]]


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


@dataclass
class Updater:
    """A module, the loss that moves it, and its optimiser / schedule / EMA (built on creation, so
    build it after the module is placed and sharded: FSDP2 replaces the parameters).

    ``groups``: AdamW parameter groups with their own ``lr`` (default: every trainable parameter at
    ``lr``). ``tag`` names the update in the log (``loss_<tag>``) when a method has several.
    ``keys``: checkpoint names of (trainable tensors, optimiser state, EMA shadow, schedule).
    """

    module: torch.nn.Module
    loss: LossFn
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    ema_decay: float
    ema_start: int
    lr_lambda: Callable[[int], float]
    groups: list[dict] | None = None
    tag: str = ""
    keys: tuple[str, str, str, str] = ("model", "optim", "ema", "sched")
    params: list = field(init=False)

    def __post_init__(self):
        groups = self.groups or [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.lr}]
        self.params = [p for g in groups for p in g["params"]]
        self.base_lrs = [float(g["lr"]) for g in groups]
        if not self.params:
            raise ValueError(f"nothing to train: no parameter of the {self.tag or 'model'} requires grad")
        self.opt = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_lambda)
        self.ema = EMA(self.module, self.ema_decay, self.ema_start)

    @classmethod
    def from_config(cls, module: torch.nn.Module, loss: LossFn, cfg, **kw) -> "Updater":
        """The optimiser section every method's config shares (lr, betas, weight_decay, grad_clip,
        ema_decay, ema_start, warmup); ``kw`` overrides (``lr``, ``lr_lambda``, ``groups``, ``tag``, ``keys``)."""
        base = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                    ema_decay=cfg.ema_decay, ema_start=cfg.ema_start, lr_lambda=warmup_lambda(cfg.warmup))
        return cls(module, loss, **{**base, **kw})

    def step(self, step: int, accum: int, env: DistEnv | None, mixed_precision: bool) -> tuple[float, dict, float]:
        """One optimiser update at ``step`` over ``accum`` micro-batches, then the EMA."""
        out = optimizer_step(self.module, self.params, self.opt, self.sched, self.loss, step, accum, self.grad_clip, env,
                             mixed_precision, f"{self.tag} loss".strip())
        self.ema.update(self.module, step + 1)
        return out

    def tensors(self) -> dict:
        model, optim, ema, _ = self.keys
        return {model: trainable_tensors(self.module, self.params), optim: optimizer_state(self.module, self.opt),
                ema: self.ema.shadow}

    def load(self, tensors: dict, meta: dict) -> None:
        """After the checkpoint's tensors were loaded into :meth:`tensors`: optimiser and schedule,
        with this run's learning rates and betas (``--allow-changed``)."""
        _, optim, _, sched = self.keys
        load_optimizer_state(self.module, self.opt, tensors[optim])
        self.sched.load_state_dict(meta[sched])
        apply_resumed_hyperparams(self.opt, self.sched, self.base_lrs, self.betas, self.weight_decay)


def optimizer_step(module, params, opt, sched, loss_fn, step: int, accum: int, grad_clip: float, env: DistEnv | None,
                   mixed_precision: bool, what: str) -> tuple[float, dict, float]:
    """One optimiser update over ``accum`` micro-batches: ``(mean loss, mean metrics, grad norm)``.

    A sharded module reduce-scatters its gradients once, after the last micro-batch; an unsharded
    one on CUDA computes under bf16 autocast (FSDP's policy casts a sharded one); the clip norm is
    the global one (DTensor gradients).
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
