"""Loss curves of a training run as one PNG (``anystep plot RUN``), read from its metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

from anystep.errors import UserError
from anystep.fsutil import atomic_file


class PlotError(UserError, ValueError):
    """The run folder has no readable metrics."""


def read_metrics(run) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl here; give a training run's out folder")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{i} is not a JSON line") from None
    if not rows:
        raise PlotError(f"{path} is empty: the run has not logged a step yet")
    return rows


def loss_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for every loss the run logged, the window means where it has them."""
    names = sorted({k for r in rows for k in r if k.startswith("loss") and not k.endswith("_mean")})
    out = {}
    for name in names:
        key = name + "_mean" if any(name + "_mean" in r for r in rows) else name
        pts = [(int(r["step"]), float(r[key])) for r in rows if key in r and math.isfinite(float(r[key]))]
        if pts:
            out[name] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def plot_run(run, out=None) -> Path:
    """Write ``out`` (default ``RUN/losses.png``): one panel per loss, log scale when it spans >10x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = loss_series(read_metrics(run))
    if not series:
        raise PlotError(f"{run}/metrics.jsonl has no loss column")
    out = Path(out) if out else Path(run) / "losses.png"
    n = len(series)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (name, (steps, vals)) in zip(axes.flat, series.items()):
        ax.plot(steps, vals, lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        positive = [v for v in vals if v > 0]
        if positive and len(positive) == len(vals) and max(vals) / min(positive) > 10:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{Path(run).name} (window means where logged)", fontsize=11)
    fig.tight_layout()
    try:  # written beside, then renamed: an interrupted plot never replaces a good one
        atomic_file(out, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return out
