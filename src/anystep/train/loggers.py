"""Where a training run's logged numbers go besides ``metrics.jsonl``, chosen by the config key
``log_to``: TensorBoard event files in ``RUN/tensorboard/`` (the default) and Weights & Biases
(when ``wandb`` is installed). Only the main rank writes.

Event files and metrics.jsonl are logs that grow while the run goes on, so they are appended to
rather than written atomically; a resume makes both agree with the checkpoint again (metrics.jsonl
is cut by :func:`anystep.train.runfolder.cut_metrics`, the event files get a purge marker).
"""

from __future__ import annotations

import contextlib
import importlib
import secrets
import time
from dataclasses import asdict
from pathlib import Path

from anystep.errors import UserError
from anystep.fsutil import atomic_write
from anystep.train.common import JsonlLogger

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
# TensorBoard and wandb stamp each point with its own wall time; the step is the x axis.
_NOT_SCALARS = ("step", "time")


def check_loggers(names) -> None:
    """One line, before the run folder is touched, for a chosen logger whose package is missing."""
    for name in names:  # each logger is the package of its name
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"log_to={name} needs the {name} package, which is not installed in this Python "
                            f"(pip install {name}); or leave {name} out of log_to (log_to=none: metrics.jsonl only)") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl record that are plotted against its step."""
    out = {}
    for k, v in record.items():
        if k in _NOT_SCALARS or isinstance(v, bool):
            continue
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # a 0-d tensor or a NumPy scalar
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _wait_for_a_later_second(files) -> None:
    """Readers take a folder's event files in name order, whose first field is the second the file
    was made in: a resume within the second of the last file would otherwise be read before it."""
    seconds = [int(p.name.split(".")[3]) for p in files if p.name.split(".")[3].isdigit()]
    delay = max(seconds, default=0) + 1 - time.time()
    if 0 < delay <= 1:  # a file from the future (a clock set back) is not waited for
        time.sleep(delay)


class TensorBoardLog:
    def __init__(self, out: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(out) / TENSORBOARD_DIR
        # A resumed run adds an event file. Its start marker at the first step it trains hides what
        # an interrupted run logged past its checkpoint (those steps are trained and logged again),
        # so every step keeps one value and the steps stay in order.
        existing = list(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
        _wait_for_a_later_second(existing)
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if existing else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLog:
    def __init__(self, out: Path, step: int, cfg):
        import wandb

        out = Path(out)
        id_file = out / WANDB_ID_FILE
        # A resume continues the wandb run of the same folder; a run that restarts from step 0
        # starts a new one, since wandb refuses steps below those it has already seen.
        if step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(8)
            atomic_write(id_file, lambda f: f.write(run_id + "\n"), binary=False)
        try:
            self.run = wandb.init(dir=str(out), id=run_id, resume="allow", name=out.resolve().name,
                                  config=asdict(cfg))
        except Exception as e:  # wandb's own errors: not logged in, offline, a bad project
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"log_to=wandb: wandb could not start a run ({first}); run `wandb login`, set "
                            "WANDB_MODE=offline, or leave wandb out of log_to") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        # wandb drops points at steps it has seen: after a resume those are the re-trained steps,
        # whose values the resume reproduces.
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass  # wandb sends in the background and flushes at finish

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class RunLog:
    """metrics.jsonl and the loggers of ``cfg.log_to`` for a run that continues after ``step``;
    ``out=None`` (a rank other than the main one) writes nothing."""

    def __init__(self, out: Path | None, cfg, step: int):
        self.jsonl = JsonlLogger(Path(out) / "metrics.jsonl" if out is not None else None)
        self.sinks: list = []
        if out is None:
            return
        names = tuple(dict.fromkeys(getattr(cfg, "log_to", ())))
        check_loggers(names)
        try:
            for name in names:
                self.sinks.append(TensorBoardLog(out, step) if name == "tensorboard" else WandbLog(out, step, cfg))
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, record: dict) -> None:
        self.jsonl.log(record)
        if self.sinks:
            step, values = int(record["step"]), scalars(record)
            for sink in self.sinks:
                sink.log(step, values)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close every logger. After a failure (Ctrl-C included), a logger that cannot
        close must not hide the failure's own message."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            if failed:
                with contextlib.suppress(Exception):
                    sink.close(failed=True)
            else:
                sink.close()
