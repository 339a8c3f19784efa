"""What a training run tells its user while it runs and when it ends.

On a terminal: tqdm's bar (stderr) with the last step's losses. Otherwise (a log file, a cluster
job's output): one plain line per logging window on stdout -- the window's mean losses, learning rate, seconds per
step and time left -- because a bar redrawn with carriage returns becomes one unreadable line in a
file. Either way the run ends with a summary line. Only the main rank speaks.
"""

from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Window means of the logged losses, and the bar or the lines that show them.

    ``update(step, losses)`` after every optimiser step; ``window(step, lr)`` at each logging step
    returns the window's means (``<name>_mean``) for metrics.jsonl and, off a terminal, prints the
    line; ``close(summary)`` prints the end-of-run summary.
    """

    def __init__(self, name: str, total: int, initial: int = 0, *, enabled: bool = True, stream=None,
                 interactive: bool | None = None, shown: tuple[str, ...] = ("loss",)):
        self.name, self.total, self.enabled = name, int(total), bool(enabled)
        if interactive is None:
            interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.interactive = interactive
        # The bar lives on stderr like every tqdm bar; plain lines are the run's log and go to stdout,
        # so stderr carries nothing but a failure's one line.
        self.stream = stream if stream is not None else (sys.stderr if interactive else sys.stdout)
        self.shown = shown
        self.first = self.last_step = int(initial)
        self.t_start = self.t_window = time.time()
        self.window_start = int(initial)
        self.sums: dict[str, float] = {}
        self.count = 0
        self.last_means: dict[str, float] = {}
        self.bar = None
        if self.enabled and self.interactive:
            self.bar = tqdm(total=self.total, initial=initial, desc=name, dynamic_ncols=True, mininterval=2.0,
                            file=self.stream)

    def update(self, step: int, losses: dict[str, float]) -> None:
        self.last_step = int(step)
        for k, v in losses.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{float(losses[k]):.4f}" for k in self.shown if k in losses})

    def window(self, step: int, lr: float | None = None) -> dict[str, float]:
        """The means over the steps since the last window (and start a new one)."""
        n = max(self.count, 1)
        means = {f"{k}_mean": v / n for k, v in self.sums.items()}
        now = time.time()
        s_per_it = (now - self.t_window) / max(step - self.window_start, 1)
        if self.enabled and not self.interactive:
            losses = " ".join(f"{k} {means[k + '_mean']:.4f}" for k in self.shown if k + "_mean" in means)
            lr_text = f" lr {lr:.3g}" if lr is not None else ""
            print(f"{self.name} step {step}/{self.total} {losses} (mean of {self.count}){lr_text} "
                  f"{s_per_it:.2f} s/it ETA {_clock(s_per_it * (self.total - step))}", file=self.stream, flush=True)
        self.last_means = {k[: -len("_mean")]: v for k, v in means.items()}
        self.sums, self.count = {}, 0
        self.t_window, self.window_start = now, int(step)
        return means

    def close(self, where: str | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.enabled:
            return
        done = self.last_step - self.first
        took = time.time() - self.t_start
        losses = ", ".join(f"{k} {self.last_means[k]:.4f}" for k in self.shown if k in self.last_means)
        text = f"{self.name}: {done} step(s) in {_clock(took)}" + (f" (steps {self.first + 1}-{self.last_step})" if self.first else "")
        if losses:
            text += f"; last window {losses}"
        if where:
            text += f"; checkpoint in {where}"
        print(text, file=self.stream, flush=True)
