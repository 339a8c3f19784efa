"""Training output a user reads: window means, plain lines off a terminal, the summary, the plot."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from anystep.plot import PlotError, loss_series, plot_run
from anystep.train.progress import Progress


def test_lines_off_a_terminal_carry_the_window_mean():
    out = io.StringIO()
    p = Progress("stage1", 10, stream=out, interactive=False)
    for step, loss in enumerate([1.0, 2.0, 6.0], 1):
        p.update(step, {"loss": loss, "loss_boundary": loss / 2, "note": "x"})
    means = p.window(3, lr=1e-4)
    assert means == {"loss_mean": 3.0, "loss_boundary_mean": 1.5}
    p.update(4, {"loss": 5.0})
    assert p.window(4) == {"loss_mean": 5.0}  # a new window starts after each one
    p.close("runs/x/checkpoint")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("stage1 step 3/10 loss 3.0000 (mean of 3) lr 0.0001") and "ETA" in lines[0]
    assert lines[2].startswith("stage1: 4 step(s) in ") and "last window loss 5.0000" in lines[2]


def test_a_silent_rank_prints_nothing_but_still_averages():
    out = io.StringIO()
    p = Progress("x", 2, stream=out, interactive=False, enabled=False)
    p.update(1, {"loss": 4.0})
    assert p.window(1) == {"loss_mean": 4.0}
    p.close()
    assert out.getvalue() == ""


def _write(run, rows):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_draws_every_loss_from_its_window_means(tmp_path):
    run = tmp_path / "run"
    _write(run, [{"step": s, "loss": 9.0, "loss_mean": 1.0 / s, "loss_dmd": 0.5, "lr": 1e-4} for s in (1, 10, 20)])
    series = loss_series([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])
    assert series["loss"] == ([1, 10, 20], [1.0, 0.1, 0.05])  # the window mean, not the step's value
    assert series["loss_dmd"] == ([1, 10, 20], [0.5, 0.5, 0.5])
    png = plot_run(run)
    assert png == run / "losses.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 400


@pytest.mark.parametrize("content", [None, "", "not json\n"])
def test_plot_refuses_a_folder_without_metrics(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(PlotError):
        plot_run(run)
    assert not (run / "losses.png").exists()
