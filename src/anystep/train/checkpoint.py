"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): resumable at any world size.

One folder, ``<run>/checkpoint/``: DCP's per-rank shard files plus ``.metadata``, and
``anystep_checkpoint.json`` (step, the training config, the LR schedulers' state, the world size
that wrote it). Tensors are saved as what they are in the running job -- FSDP2 ``DTensor`` shards
under torchrun, plain tensors in one process -- and DCP reshards on load, so a checkpoint written by
2 ranks resumes on 1 and vice versa.

Atomicity: every rank writes into ``.checkpoint.tmp``; after a barrier rank 0 adds the JSON and
swaps the folder in by rename. A crash or a dying rank leaves the previous checkpoint intact.
"""

from __future__ import annotations

from anystep.errors import UserError

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from anystep.distributed import barrier
from anystep.fsutil import atomic_write

# DCP warns on every single-process save/load that it "assumes the intent" is one process: it is.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")

CHECKPOINT_DIR = "checkpoint"
META_NAME = "anystep_checkpoint.json"
FORMAT = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be read (one-line message)."""


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def has_checkpoint(run_dir) -> bool:
    return (checkpoint_dir(run_dir) / META_NAME).is_file()


def recover_interrupted_swap(run_dir) -> None:
    """A job stopped between the two renames of :func:`save_checkpoint` leaves no ``checkpoint/``
    but a complete ``.checkpoint.tmp`` (newer) or ``.checkpoint.old``: put it back. Call on one
    process (rank 0) before the others look."""
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir)
    if final.exists():
        return
    for cand in (run_dir / f".{CHECKPOINT_DIR}.tmp", run_dir / f".{CHECKPOINT_DIR}.old"):
        if (cand / META_NAME).is_file():
            os.replace(cand, final)
            return


def find_checkpoint(run_dir) -> bool:
    """Collective: repair an interrupted swap on rank 0, then whether a checkpoint exists."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        recover_interrupted_swap(run_dir)
    barrier()
    return has_checkpoint(run_dir)


def missing_piece(ckpt: Path) -> str | None:
    """What is missing or damaged in a DCP checkpoint folder, or None when every piece is there
    (checked before DCP reads it: its own failures print tracebacks from inside its planner)."""
    if not (ckpt / META_NAME).is_file():
        return f"{META_NAME} is missing"
    if not (ckpt / ".metadata").is_file():
        return ".metadata is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # unpickling a damaged file raises anything
        return f".metadata is unreadable ({type(e).__name__})"
    need: dict[str, int] = {}
    for item in (md.storage_data or {}).values():
        rel = getattr(item, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(item.offset) + int(item.length))
    for rel, size in sorted(need.items()):
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size < size:
            return f"{rel} is truncated"
    return None


def read_meta(run_dir) -> dict:
    path = checkpoint_dir(run_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def _no_dist() -> bool:
    return not dist.is_initialized()


def trainable_tensors(module: torch.nn.Module, params) -> dict[str, torch.Tensor]:
    """Name -> tensor for the given parameters; detached views, so a DCP load writes into them."""
    ids = {id(p) for p in params}
    return {n: p.detach() for n, p in module.named_parameters() if id(p) in ids}


def optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state keyed by parameter name (DCP's form; state created if still lazy)."""
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))


def load_optimizer_state(module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(flatten_optimizer_state_dict=True))


def save_checkpoint(run_dir, tensors: dict, meta: dict) -> Path:
    """Collective: every rank calls it with its own shards. ``meta`` must be JSON-serialisable.

    A failed or interrupted write (full disk, Ctrl-C) removes the temporary folder and leaves the
    previous checkpoint as it was; a full disk is reported as the ``OSError`` it is, not as the
    storage layer's ``RuntimeError``.
    """
    run_dir = Path(run_dir)
    final, tmp = checkpoint_dir(run_dir), run_dir / f".{CHECKPOINT_DIR}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(tensors, checkpoint_id=str(tmp), no_dist=_no_dist())
        barrier()
        if rank == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            body = {"format": FORMAT, "world_size": world, **meta}
            atomic_write(tmp / META_NAME, lambda f: f.write(json.dumps(body, indent=1, default=str)), binary=False)
            old = run_dir / f".{CHECKPOINT_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(run_dir)
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, OSError)) and _disk_full(run_dir)  # before the temp goes
        if rank == 0 and not final.exists():
            recover_interrupted_swap(run_dir)  # stopped between the two renames: keep the newest complete one
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from None
        raise
    barrier()
    return final


def _disk_full(path: Path) -> bool:
    """DCP wraps a failed write in a RuntimeError / CheckpointException whose text varies by
    version; the free space says what happened."""
    try:
        return shutil.disk_usage(path).free < 1024 * 1024
    except OSError:
        return False


def load_checkpoint(run_dir, tensors: dict, single_process: bool = False, expect_global_batch: int | None = None) -> dict:
    """Fill ``tensors`` (same structure as saved, any sharding) in place; returns the meta.

    Collective under torchrun, unless ``single_process`` (one rank reading alone, as export does).
    """
    meta = read_meta(run_dir)
    if expect_global_batch is not None and meta.get("global_batch") not in (None, expect_global_batch):
        raise CheckpointError(
            f"{checkpoint_dir(run_dir)} was written at global batch {meta['global_batch']} (batch_size x ranks x "
            f"grad_accum) but this run has {expect_global_batch}: set batch_size so that the global batch matches"
        )
    try:
        dcp.load(tensors, checkpoint_id=str(checkpoint_dir(run_dir)), no_dist=single_process or _no_dist())
    except (Exception, CheckpointException) as e:  # a missing key or a shape mismatch (DCP's is a BaseException)
        text = str(e).strip()
        failures = getattr(e, "failures", None)
        if failures:  # {rank: (exception, traceback)}: the first rank's own message says what is wrong
            err = next(iter(failures.values()))
            err = err[0] if isinstance(err, tuple) else err
            text = str(err).strip() or text
        first = text.splitlines()[0][:300] if text else type(e).__name__
        raise CheckpointError(f"{checkpoint_dir(run_dir)} does not fit this run: {first}") from None
    return meta


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
