"""The command line a user expects: --version, defaults in help, every config key listed per
method, the nearest key suggested for a misspelt one, and `anystep plot`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from anystep import __version__
from anystep.cli import main
from anystep.train.baselines import ConsistencyInitConfig
from anystep.train.stage1 import Stage1Config
from anystep.train.stage2 import Stage2Config
from anystep.train.teacher import TeacherConfig


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"anystep {__version__}"


def test_generate_help_shows_defaults_and_units(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in out and "pixels (default: 32)" in out and "frames per second of the mp4" in out


@pytest.mark.parametrize("method, cls", [("stage1", Stage1Config), ("stage2", Stage2Config),
                                         ("consistency_init", ConsistencyInitConfig), ("teacher", TeacherConfig)])
def test_train_method_help_lists_every_config_key(method, cls, capsys):
    assert main(["train", method, "--help"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("config keys of", 1)[1].splitlines()[1:] if line.strip()}
    assert listed == {f.name for f in dataclasses.fields(cls)}
    f = dataclasses.fields(cls)[0]
    assert f"default {f.default!r}" in out  # each key with its type and default
    if method == "stage1":  # and the note written beside the field
        assert "default 'wt_first'" in out and "reference" in out.split("adaptive_order", 1)[1].splitlines()[0]
    # Every key has a one-line note: its own comment, the comment above it, or the shared one.
    rows = [line for line in out.split("config keys of", 1)[1].splitlines()[1:] if line.strip()]
    undescribed = [r.split()[0] for r in rows if " -- " not in r or not r.split(" -- ", 1)[1].strip()]
    assert undescribed == []


def test_a_misspelt_key_gets_the_nearest_one(capsys):
    assert main(["train", "stage1", "--dry-run", "lrr=1e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lrr (did you mean lr?)" in err[0]


def test_plot_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    assert main(["plot", str(run)]) == 0
    assert (run / "losses.png").stat().st_size > 0
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
