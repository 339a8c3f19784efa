"""Training logs besides metrics.jsonl: TensorBoard event files by default, wandb on request,
none on request; a resume after a crash keeps one value per step; a bad choice is one line."""

from __future__ import annotations

import json
import sys
import types

import pytest

from anystep.cli import main

TINY = ["batch_size=4", "probe_every=1000", "log_every=1", "threads=1"]


def _train(capsys, out, *extra) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", "teacher", f"out={out}", *TINY, *extra])
    return rc, capsys.readouterr().err


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_events_match_metrics(run) -> None:
    rows, events = _metrics(run), _events(run)
    for key in ("loss_mean", "loss", "lr", "grad_norm"):
        want = [(r["step"], r[key]) for r in rows]
        assert [s for s, _ in events[key]] == [s for s, _ in want], key
        assert [v for _, v in events[key]] == pytest.approx([v for _, v in want], rel=1e-6), key  # float32 in the file
    assert "step" not in events and "time" not in events


def test_a_crashed_and_resumed_run_has_event_files_equal_to_its_metrics(tmp_path, capsys, monkeypatch):
    from anystep.train import loop

    run = tmp_path / "run"
    real, calls = loop.run_updates, []

    def ctrl_c_at_step_4(*a, **kw):  # step 3 is logged but not checkpointed (ckpt_every=2)
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "run_updates", ctrl_c_at_step_4)
    rc, err = _train(capsys, run, "steps=4", "ckpt_every=2")
    assert rc == 130, err[-3000:]
    # The writer was closed on Ctrl-C: what it had, step 3 included, is on disk.
    assert [s for s, _ in _events(run)["loss_mean"]] == [1, 2, 3]
    monkeypatch.setattr(loop, "run_updates", real)

    rc, err = _train(capsys, run, "steps=4", "ckpt_every=2")
    assert rc == 0, err[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resume added a file
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    _assert_events_match_metrics(run)  # step 3 once, the crashed run's copy hidden


def test_no_logger_writes_metrics_only_and_wandb_gets_every_record(tmp_path, capsys, monkeypatch):
    rc, err = _train(capsys, tmp_path / "none", "steps=2", "log_to=none")
    assert rc == 0, err[-3000:]
    assert not (tmp_path / "none" / "tensorboard").exists() and len(_metrics(tmp_path / "none")) == 2

    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.kw, self.logged, self.exit_code = kw, [], None
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self, exit_code=0):
            self.exit_code = exit_code

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    run = tmp_path / "wandb"
    assert _train(capsys, run, "steps=2", "log_to=[wandb]")[0] == 0
    assert _train(capsys, run, "steps=3", "log_to=[wandb]")[0] == 0  # a resume continues the same wandb run
    assert not (run / "tensorboard").exists()
    first, resumed = runs
    assert first.kw["id"] == resumed.kw["id"] and resumed.kw["resume"] == "allow"
    assert first.kw["config"]["steps"] == 2 and first.exit_code == resumed.exit_code == 0
    logged = first.logged + resumed.logged
    assert [(s, v["loss_mean"]) for s, v in logged] == [(r["step"], r["loss_mean"]) for r in _metrics(run)]


@pytest.mark.parametrize("setting, fragment", [
    ("log_to=[tensorbord]", "'log_to' must be a list of tensorboard, wandb"),
    ("log_to=wandb", "log_to=wandb needs the wandb package"),
])
def test_a_logger_that_cannot_be_used_is_one_line_before_any_output(tmp_path, capsys, monkeypatch, setting, fragment):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this Python has
    rc, err = _train(capsys, tmp_path / "run", "steps=1", setting)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anystep: error: ") and fragment in lines[0], err
    assert not (tmp_path / "run").exists()
