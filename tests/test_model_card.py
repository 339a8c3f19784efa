"""Every folder we write carries a model card whose diffusers snippet runs as written and makes
the clip the prompt asks for; the pipeline and `anystep generate` agree given the same noise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anystep.eval.clip_analysis import clip_scores
from anystep.models.card import CARD_FILE, card_text
from anystep.train.stage1 import Stage1Config, train_stage1

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-teacher"


def _snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def _run_snippet(folder: Path, monkeypatch, prompt: str | None = None, **extra) -> np.ndarray:
    """Run the card's snippet from the folder's parent; ``extra`` become more keywords of the call."""
    code = _snippet((folder / CARD_FILE).read_text())
    if prompt is not None:
        code = code.replace('"a red three moving left"', repr(prompt))
    for key in extra:
        code = code.replace("generator=", f"{key}={key}, generator=")
    monkeypatch.chdir(folder.parent)
    scope: dict = dict(extra)
    exec(compile(code, str(folder / CARD_FILE), "exec"), scope)
    return scope["video"]


def _as_clip(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) in [0, 1] -> (F, 3, H, W) in [-1, 1], ToyBench's layout."""
    return frames.transpose(0, 3, 1, 2) * 2.0 - 1.0


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A freshly trained toy student (2 Stage-1 steps from the shipped teacher)."""
    out = tmp_path_factory.mktemp("s1")
    return train_stage1(Stage1Config(teacher=str(TEACHER), out=str(out / "run"), steps=2, batch_size=4, warmup=1,
                                     log_every=1, ckpt_every=10))


def test_the_shipped_teacher_card_is_current_and_its_snippet_follows_the_prompt(tmp_path):
    assert (TEACHER / CARD_FILE).read_text() == card_text(TEACHER)  # regenerate with write_model_card if not
    teacher = tmp_path / "toy-teacher"
    shutil.copytree(TEACHER, teacher)
    # In a fresh interpreter: the card's own import line is all diffusers needs.
    code = _snippet((teacher / CARD_FILE).read_text()) + '\nimport numpy\nnumpy.save("frames.npy", video)\n'
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = np.load(tmp_path / "frames.npy")
    assert frames.shape == (7, 32, 32, 3)
    s = clip_scores(_as_clip(frames), "a red three moving left")  # ToyBench's colour and motion estimates
    assert s["color_accuracy"] == 1.0 and s["direction_accuracy"] == 1.0


def test_a_trained_student_card_runs_and_matches_anystep_generate(student, monkeypatch):
    from anystep.sampling import generate, load_model

    card = (student / CARD_FILE).read_text()
    assert "`anystep train stage1`" in card and "AnyFlowPipeline" in card
    prompt = "a blue zero moving right"
    frames = _run_snippet(student, monkeypatch, prompt)
    assert frames.shape == (7, 32, 32, 3)
    s = clip_scores(_as_clip(frames), prompt)
    assert s["color_accuracy"] == 1.0 and s["direction_accuracy"] == 1.0

    # The same seed is the same clip: the card's snippet (seed 0) is `anystep generate --seed 0`.
    model = load_model(student)
    ours = generate(model, [prompt], 4, seed=0)[0].numpy()  # (F, 3, H, W) in [-1, 1]
    assert np.abs(_as_clip(frames) - ours).max() < 1e-5
    assert np.abs(generate(model, [prompt], 4, seed=1)[0].numpy() - ours).max() > 1e-2  # another seed, another clip


def test_the_card_is_not_part_of_a_teachers_identity(tmp_path):
    """reproduce keys finished jobs on the teacher's bytes; rewording its card must not retrain them."""
    from anystep.reproduce import folder_digest

    teacher = tmp_path / "t"
    shutil.copytree(TEACHER, teacher)
    before = folder_digest(teacher)
    (teacher / CARD_FILE).write_text("another card\n")
    assert folder_digest(teacher) == before
    (teacher / "scheduler" / "scheduler_config.json").write_text("{}")
    assert folder_digest(teacher) != before
