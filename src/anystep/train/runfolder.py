"""A run folder belongs to one run.

``claim_run_folder`` is what ``anystep train`` does before a training function touches ``out=``:

* ownership: the folder is missing, empty, marked as a run of ours, or (runs written before the
  marker existed) holds one of our checkpoints; anything else is refused, never taken over;
* a lock file with the PID while the run writes (a second run is refused; the lock of a process
  that no longer exists is taken over);
* the checkpoint is checked *before* ``config.json`` is rewritten: complete (every piece there),
  written by the same method, and with the same hyper-parameters -- changed ones are listed and
  refused unless named (``--allow-changed lr``); a finished run is reported, not retrained;
* ``metrics.jsonl`` is cut back to the resumed step, so it has one line per step after a resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from anystep.distributed import launched_world_size
from anystep.errors import UserError
from anystep.fsutil import (
    atomic_write,
    check_parent_writable,
    has_entries,
    read_marker,
    release_lock,
    take_lock,
    write_marker,
)
from anystep.train.checkpoint import CHECKPOINT_DIR, missing_piece, read_meta, recover_interrupted_swap

RUN_KIND = "run"
# Changing these on resume is what resuming is for (a longer run, other logging); the run honours them.
FREE_ON_RESUME = {"steps", "log_every", "log_to", "ckpt_every", "probe_every", "threads", "out"}
# The global batch (batch_size x ranks x grad_accum) fixes the data position and the random draws
# of every step: a resume may split it differently over ranks, never change it.
BATCH_KEYS = {"batch_size", "grad_accum"}


@dataclass
class RunState:
    out: Path
    step: int = 0  # the step the run resumes from (0: a fresh run)
    finished: bool = False
    model: Path | None = None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _previous(method: str, out: Path) -> tuple[dict | None, int]:
    """(config the checkpoint was written with, its step); (None, 0) without a checkpoint."""
    if (out / "checkpoint.pt").is_file():
        raise UserError(f"out={out} holds a teacher run of an older anystep (checkpoint.pt), whose format is no longer "
                        "read; use another out=")
    recover_interrupted_swap(out)
    ckpt = out / CHECKPOINT_DIR
    if not ckpt.exists():
        return None, 0

    missing = missing_piece(ckpt)
    if missing is not None:
        raise UserError(f"the checkpoint in {ckpt} is incomplete or damaged ({missing}); it is not restarted over: "
                        f"move {ckpt} away to start from step 0, or use another out=")

    meta = read_meta(out)
    return meta, int(meta.get("step", 0))


def _changed(old: dict, new: dict) -> dict[str, tuple]:
    old, new = _jsonable(old), _jsonable(new)
    return {k: (old.get(k), v) for k, v in new.items() if k in old and old[k] != v}


def _is_ours(out: Path) -> bool:
    marker = read_marker(out)
    if marker is not None:
        return marker.get("kind") == RUN_KIND
    # Runs written before the marker existed: one of our checkpoints makes the folder ours.
    ckpt = out / "checkpoint"
    return (ckpt / "anystep_checkpoint.json").is_file() or (ckpt / ".metadata").is_file() or (out / "checkpoint.pt").is_file() or any(
        (out / f".checkpoint.{s}" / "anystep_checkpoint.json").is_file() for s in ("tmp", "old"))


def cut_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to ``step`` (the resumed one): the steps after it are trained again."""
    if not path.is_file():
        return
    keep, cut = [], False
    for line in path.read_text().splitlines():
        try:
            s = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            s = 0
        if s <= step:
            keep.append(line)
        else:
            cut = True
    if cut:
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep)), binary=False)


@contextlib.contextmanager
def claim_run_folder(method: str, cfg, allow_changed=()):
    """Check, lock and prepare ``cfg.out`` for ``method``; yields a :class:`RunState`."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} exists and is not a folder; choose another out=")
    created = not out.exists()
    if not created and has_entries(out) and not _is_ours(out):
        raise UserError(f"out={out} is a non-empty folder that is not an anystep run; it is left as it is: "
                        "choose a new or empty out=")

    check_parent_writable(out / "x", "out=")
    out.mkdir(parents=True, exist_ok=True)
    lock = None
    try:
        lock = take_lock(out, "out=")
        meta, step = _previous(method, out)
        state = RunState(out=out, step=step)
        if meta is not None:
            name = meta.get("name")
            if name is not None and name.split(":")[0] != method:
                raise UserError(f"out={out} holds a {name!r} checkpoint, not {method!r}; use another out=")
            old_cfg = meta.get("config") or {}
            changed = _changed(old_cfg, asdict(cfg))
            _check_global_batch(out, meta, cfg)
            refused = sorted(k for k in changed if k not in FREE_ON_RESUME | BATCH_KEYS and k not in allow_changed)
            if refused:
                raise UserError(f"resuming {out} with changed settings: {_describe(changed, refused)}; "
                                f"pass --allow-changed {','.join(refused)} to resume with them, or use another out=")
            if step >= cfg.steps and (out / "model").is_dir():
                state.finished, state.model = True, out / "model"
        if not state.finished:
            write_marker(out, RUN_KIND, method=method)
            cut_metrics(out / "metrics.jsonl", step)
        yield state
    except BaseException:
        if lock is not None:
            release_lock(lock)
            lock = None
        # A refused or failed fresh run leaves no folder behind.
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {".anystep"}:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            release_lock(lock)


def _check_global_batch(out: Path, meta: dict, cfg) -> None:
    want = meta.get("global_batch")
    have = int(cfg.batch_size) * launched_world_size() * max(1, int(getattr(cfg, "grad_accum", 1)))
    if want is not None and int(want) != have:
        raise UserError(f"{out}/checkpoint was written at global batch {want} (batch_size x ranks x grad_accum) but "
                        f"this run has {have}: set batch_size so that the global batch matches")


def _describe(changed: dict, keys) -> str:
    return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)


def apply_resumed_hyperparams(opt, sched, lrs, betas=None, weight_decay=None) -> None:
    """After loading an optimiser and scheduler state, put this run's learning rates (and betas,
    weight decay) back: the loaded state carries the old ones, and ``--allow-changed lr`` means the
    new value is the one used from the resumed step on."""
    sched.base_lrs = list(lrs)
    factor = [lam(sched.last_epoch) for lam in getattr(sched, "lr_lambdas", [lambda _: 1.0] * len(lrs))]
    for g, base, f in zip(opt.param_groups, lrs, factor):
        g["initial_lr"] = base
        g["lr"] = base * f
        if betas is not None:
            g["betas"] = tuple(betas)
        if weight_decay is not None:
            g["weight_decay"] = weight_decay
