"""The one training loop: every method's updaters, stepped in order, with accumulation, JSONL
metrics and the loggers of ``log_to`` (:mod:`anystep.train.loggers`), a progress bar, atomic DCP
checkpoints (:mod:`anystep.train.checkpoint`) whose resume continues with the same next loss at
the same or another world size, and the final folder.

A method (``Stage1Method``, ``Stage2Method``, ``ConsistencyInitMethod``, ``TeacherMethod``) is a
small class: it builds its modules, takes each micro-batch as an argument of its loss, and exposes

* ``updaters``: the :class:`anystep.train.updater.Updater` list of one iteration;
* ``name`` (the checkpoint's) and ``title`` (the progress bar's), ``shown`` (losses on the bar);
* ``prepare_for_training(env)``: devices, attention kernels, FSDP2 -- then its updaters again;
* ``save_folder(dest)``: the final diffusers folder from the EMA weights (one process), and
  ``export_checkpoint(run_dir, dest)``: the same from the final checkpoint (rank 0 of a sharded run);
* optionally ``extra_metrics(step)`` (logged when not empty), ``extra_state()`` / ``load_extra_state``
  (tensors and JSON the checkpoint carries besides the updaters').
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from anystep.distributed import current, global_mean, setup, shutdown
from anystep.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from anystep.train.loggers import RunLog
from anystep.train.progress import Progress


def run_updates(updaters, step: int, accum: int, env, mixed_precision: bool) -> tuple[dict, dict]:
    """One iteration: each updater's optimiser step in order. ``(losses and metrics, grad norms)``;
    a single untagged updater logs ``loss`` / ``grad_norm``, tagged ones ``loss_<tag>`` /
    ``grad_norm_<tag>`` and ``loss`` is the first one's."""
    rec, norms = {}, {}
    for u in updaters:
        total, metrics, gn = u.step(step, accum, env, mixed_precision)
        suffix = f"_{u.tag}" if u.tag else ""
        rec.update({f"loss{suffix}": total, **metrics})
        norms[f"grad_norm{suffix}"] = gn
    if "loss" not in rec:
        rec["loss"] = rec[f"loss_{updaters[0].tag}"]
    return rec, norms


class TrainLoop:
    """Steps ``method.updaters`` and owns the step counter, the log and the checkpoints."""

    def __init__(self, method, env=None):
        self.method, self.cfg = method, method.cfg
        self.env = env or current()
        self.out = Path(self.cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.step = 0

    @property
    def accum(self) -> int:
        return max(1, int(getattr(self.cfg, "grad_accum", 1)))

    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks: a resume must keep it (the data position and
        the rank-sliced random draws are functions of it)."""
        return int(self.cfg.batch_size) * self.env.world_size * self.accum

    def _tensors(self) -> dict:
        out = {}
        for u in self.method.updaters:
            out.update(u.tensors())
        extra = getattr(self.method, "extra_state", None)
        return {**out, **(extra()[0] if extra else {})}

    def save(self) -> None:
        """Collective: a DCP checkpoint of everything that moves."""
        meta = {"step": self.step, "config": asdict(self.cfg), "name": self.method.name, "global_batch": self.global_batch()}
        meta.update({u.keys[3]: u.sched.state_dict() for u in self.method.updaters})
        extra = getattr(self.method, "extra_state", None)
        meta.update(extra()[1] if extra else {})
        save_checkpoint(self.out, self._tensors(), meta)

    def maybe_resume(self) -> bool:
        if not find_checkpoint(self.out):
            return False
        tensors = self._tensors()
        meta = load_checkpoint(self.out, tensors, expect_global_batch=self.global_batch())
        for u in self.method.updaters:
            u.load(tensors, meta)
        if hasattr(self.method, "load_extra_state"):
            self.method.load_extra_state(tensors, meta)
        self.step = int(meta["step"])
        return True

    def run(self, steps: int) -> None:
        # Opened here, not in __init__: a resumed run's loggers need the step it resumed from.
        log = RunLog(self.out if self.env.is_main else None, self.cfg, self.step)
        try:
            progress = Progress(self.method.title, steps, self.step, enabled=self.env.is_main, shown=self.method.shown)
            self._steps(steps, progress, log)
        except BaseException:
            log.close(failed=True)
            raise
        log.close()
        progress.close(str(self.out / "checkpoint"))

    def _steps(self, steps: int, progress: Progress, log: RunLog) -> None:
        cfg, method = self.cfg, self.method
        mixed = bool(getattr(cfg, "mixed_precision", False))
        t0 = time.time()
        while self.step < steps:
            rec, norms = run_updates(method.updaters, self.step, self.accum, self.env, mixed)
            self.step += 1
            progress.update(self.step, {k: v for k, v in rec.items() if k.startswith("loss")})
            extra = method.extra_metrics(self.step) if hasattr(method, "extra_metrics") else None
            if extra or self.step % cfg.log_every == 0 or self.step == steps or self.step == 1:
                lr = method.updaters[0].sched.get_last_lr()[0]
                # "loss" is this step's (what resume and rank-parity checks compare); "*_mean" the window's.
                log.log({"step": self.step, **global_mean({**rec, **progress.window(self.step, lr)}), **norms,
                         "lr": lr, "time": time.time() - t0, **(extra or {})})
            if self.step % cfg.ckpt_every == 0 or self.step == steps:
                self.save()
                log.flush()  # the event files on disk reach at least the checkpoint's step


def write_resolved_config(out: Path, cfg) -> None:
    if not current().is_main:
        return
    (Path(out) / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))


def run_method(method_cls, cfg) -> Path:
    """Train (or resume) ``method_cls(cfg)`` and write ``<out>/model`` from the EMA weights.

    Sharded runs: rank 0 writes the folder from the final checkpoint after the process group is
    torn down -- at 14B the rebuild takes long enough that ranks waiting for it in a collective
    would hit the timeout, and it needs no other rank.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = setup()
    method = method_cls(cfg, env.rank, env.world_size)
    method.prepare_for_training(env)
    loop = TrainLoop(method, env)
    write_resolved_config(loop.out, cfg)
    loop.maybe_resume()
    loop.run(cfg.steps)
    dest = loop.out / "model"
    if not env.distributed:
        return method.save_folder(dest)
    shutdown()
    if env.is_main:
        method.export_checkpoint(loop.out, dest)
    return dest
