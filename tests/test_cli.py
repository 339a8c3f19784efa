"""The command line: one-line errors with exit code 2, no partial output, working happy paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anystep.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import make_tiny_teacher

    out = tmp_path_factory.mktemp("teacher")
    return make_tiny_teacher(out)


def _err(capsys):
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("anystep"), err
    assert "Traceback" not in err
    return lines[0]


def test_generate_writes_mp4_and_png(teacher_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    rc = main(["generate", "--model", str(teacher_dir), "--prompt", "a red three moving left", "--steps", "2", "--out", str(out)])
    assert rc == 0
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    import imageio.v2 as imageio

    frames = imageio.mimread(out)
    assert len(frames) == 7 and frames[0].shape == (128, 128, 3)
    grid = imageio.imread(out.with_suffix(".png"))
    assert grid.shape[0] > 128 and len(np.unique(grid[: grid.shape[0] - 128].reshape(-1, 3), axis=0)) > 1  # the label band
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_generate_from_prompt_file(teacher_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red three moving left\na blue one moving up\n")
    out = tmp_path / "clips"
    assert main(["generate", "--model", str(teacher_dir), "--prompts", str(prompts), "--steps", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".anystep", "0000-a-red-three-moving-left.mp4",
                                                      "0001-a-blue-one-moving-up.mp4", "grid.png", "prompts.txt"]
    import imageio.v2 as imageio

    # Rows of 7 frames of 64 px, each under a band holding its prompt.
    grid = imageio.imread(out / "grid.png")
    band = (grid.shape[0] + 2) // 2 - 64 - 2
    assert band > 0 and grid.shape[1] == 7 * 66 - 2
    for top in (0, band + 64 + 2):
        assert len(np.unique(grid[top : top + band].reshape(-1, 3), axis=0)) > 1
    assert not np.array_equal(grid[:band], grid[band + 66 : 2 * band + 66])  # two prompts, two labels


def test_clip_names_follow_their_prompts():
    from anystep.io import clip_name

    assert clip_name(0, "A red THREE, moving left!") == "0000-a-red-three-moving-left.mp4"
    assert clip_name(12, "  x  ") == "0012-x.mp4"
    assert clip_name(1, "???") == "0001.mp4"  # nothing left to name it after: the index alone
    long = clip_name(2, "a green seven moving up " * 10)
    assert long.startswith("0002-a-green-seven-moving-up-") and len(long) <= 5 + 60 + 4 and "--" not in long
    assert clip_name(3, "same") != clip_name(4, "same")


@pytest.mark.parametrize(
    "args_fn, fragment",
    [
        (lambda d, t: ["--model", str(t / "nope")], "not found"),
        (lambda d, t: ["--model", str(d), "--steps", "0"], "--steps must be >= 1"),
        (lambda d, t: ["--model", str(d), "--height", "30"], "divisible"),
        (lambda d, t: ["--model", str(d), "--steps", "two"], "invalid int"),
    ],
)
def test_generate_bad_input(teacher_dir, tmp_path, capsys, args_fn, fragment):
    out = tmp_path / "clip.mp4"
    base = ["generate", "--prompt", "a red three moving left", "--out", str(out)]
    rc = main(base + args_fn(teacher_dir, tmp_path))
    assert rc == 2
    assert fragment in _err(capsys)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_malformed_model_folder(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    assert main(["generate", "--model", str(bad), "--prompt", "a red one moving up", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "not valid JSON" in _err(capsys)
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}))
    assert main(["generate", "--model", str(bad), "--prompt", "a red one moving up", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "transformer/ is missing" in _err(capsys)
    (bad / "transformer").mkdir()
    assert main(["generate", "--model", str(bad), "--prompt", "a red one moving up", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "names no 'vae'" in _err(capsys)
    assert not (tmp_path / "x.mp4").exists()


def test_empty_prompt_file(teacher_dir, tmp_path, capsys):
    p = tmp_path / "p.txt"
    p.write_text("\n")
    assert main(["generate", "--model", str(teacher_dir), "--prompts", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in _err(capsys)
    p.write_text("a red one moving up\n\na blue two moving left\n")
    assert main(["generate", "--model", str(teacher_dir), "--prompts", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_eval_rejects_zero_steps(teacher_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(teacher_dir), "--steps", "1,0", "--out", str(tmp_path / "ev")]) == 2
    assert "--steps must be >= 1" in _err(capsys)
    assert not (tmp_path / "ev").exists()


def test_eval_honours_num_frames(teacher_dir, tmp_path, capsys):
    out = tmp_path / "ev13"
    assert main(["eval", "--model", str(teacher_dir), "--steps", "1", "--n-prompts", "2", "--num-frames", "13",
                 "--out", str(out)]) == 0
    assert json.loads((out / "toybench.json").read_text())["num_frames"] == 13
    assert np.load(out / "samples_1.npy").shape[1] == 13
    assert main(["eval", "--model", str(teacher_dir), "--steps", "1", "--height", "64", "--out", str(tmp_path / "e")]) == 2
    assert "vbench only" in _err(capsys)
    assert not (tmp_path / "e").exists()


def test_eval_guidance_scale_reaches_the_sampler_and_the_json(teacher_dir, tmp_path, capsys):
    """--guidance-scale: the clips are the ones generate() makes at that scale, the JSON says which
    scale made them, a rerun at another scale does not reuse them, and a guidance-fused flow-map
    student refuses it in one line."""
    from anystep.sampling import generate, load_model

    base = ["eval", "--model", str(teacher_dir), "--steps", "1", "--n-prompts", "2"]
    assert main(base + ["--out", str(tmp_path / "g4")]) == 0
    assert main(base + ["--guidance-scale", "1.0", "--out", str(tmp_path / "g1")]) == 0
    g4, g1 = (json.loads((tmp_path / d / "toybench.json").read_text()) for d in ("g4", "g1"))
    assert g4["guidance_scale"] == 4.0 and g1["guidance_scale"] == 1.0
    s1, s4 = np.load(tmp_path / "g1" / "samples_1.npy"), np.load(tmp_path / "g4" / "samples_1.npy")
    assert not np.allclose(s1, s4, atol=1e-2)
    prompts = [p["prompt"] for p in g1["prompts"]]
    ref = generate(load_model(teacher_dir), prompts, 1, seed=g1["prompts"][0]["seed"], guidance_scale=1.0)
    assert np.allclose(s1.astype(np.float32), ref.numpy(), atol=2e-3)  # samples are stored as float16
    capsys.readouterr()
    student = tmp_path / "student"
    assert main(["student", "--teacher", str(teacher_dir), "--out", str(student)]) == 0
    capsys.readouterr()
    out = tmp_path / "gs"
    assert main(["eval", "--model", str(student), "--steps", "1", "--guidance-scale", "3", "--out", str(out)]) == 2
    assert "guidance-fused" in _err(capsys)
    assert not out.exists()


def test_train_dry_run_and_bad_override(tmp_path, capsys):
    assert main(["train", "teacher", "--config", "configs/toy/teacher.yaml", "--dry-run", "steps=7", "lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "lr: 0.001" in out
    assert main(["train", "teacher", "--dry-run", "no_such_key=1"]) == 2
    assert "unknown config key" in _err(capsys)
    assert main(["train", "teacher", "--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "not found" in _err(capsys)


def test_teacher_init_must_be_a_checkpoint_or_a_teacher_folder(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "teacher", "--config", "configs/toy/teacher.yaml", f"out={out}", "steps=1"]
    assert main(base + [f"init={tmp_path / 'nope.pt'}"]) == 2
    assert "neither a teacher checkpoint" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(base + [f"init={tmp_path / 'empty'}"]) == 2
    assert "empty" in _err(capsys)
    assert not out.exists()
    # A student folder is not a teacher, although most of its weights would load.
    from anystep.models.students import student_folder_from_teacher

    student = student_folder_from_teacher(Path("models/toy-teacher"), tmp_path / "student")
    capsys.readouterr()
    assert main(base + [f"init={student}"]) == 2
    assert "a teacher fine-tune starts from a Wan teacher folder" in _err(capsys)
    assert not out.exists()


def test_teacher_init_that_does_not_fit_the_transformer_is_one_error_line(tmp_path, capsys):
    from conftest import make_tiny_teacher

    folder = make_tiny_teacher(tmp_path / "t", steps=1, num_layers=1)
    capsys.readouterr()
    out = tmp_path / "run"
    base = ["train", "teacher", "--config", "configs/toy/teacher.yaml", f"out={out}", "steps=1", "batch_size=2",
            "codec_channels=28"]  # the tiny teacher's codec (configs/toy/teacher.yaml is phase 1's exact one)
    assert main(base + [f"init={folder}"]) == 2
    assert "num_layers 1 != 4" in _err(capsys)
    assert not out.exists()
    # A teacher run's checkpoint: its weights are refused when they do not fit.
    assert main(base + [f"init={tmp_path / 't'}"]) == 2
    assert "does not fit this run's transformer" in _err(capsys)
    assert not out.exists()
    # Told the folder's architecture, the same fine-tune runs.
    assert main(base + [f"init={folder}", "transformer={num_layers: 1}", "probe_every=1000"]) == 0


def test_console_script_exit_code(tmp_path):
    """The installed entry point, run as a process: exit 2, one stderr line, no traceback."""
    exe = Path(sys.executable).with_name("anystep")
    proc = subprocess.run(
        [str(exe), "generate", "--model", str(tmp_path / "missing"), "--prompt", "a red one moving up", "--out", str(tmp_path / "c.mp4")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_config_values_take_the_field_type():
    from anystep.config import ConfigError, build_config
    from anystep.train.teacher import TeacherConfig

    cfg = build_config(TeacherConfig, None, ["lr=1e-3", "steps=10", "betas=[0.5,0.9]", "train_text_encoder=false"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.steps == 10 and cfg.betas == (0.5, 0.9) and cfg.train_text_encoder is False
    with pytest.raises(ConfigError, match="expects int"):
        build_config(TeacherConfig, None, ["steps=ten"])


def test_student_command_and_far_frame_check(teacher_dir, tmp_path, capsys):
    far = tmp_path / "far"
    assert main(["student", "--teacher", str(teacher_dir), "--out", str(far), "--causal", "--chunk-partition", "1,3,3,3,3"]) == 0
    capsys.readouterr()
    out = tmp_path / "c.mp4"
    # 7 frames cannot be split as (1,3,3,3,3).
    rc = main(["generate", "--model", str(far), "--prompt", "a red one moving up", "--num-frames", "7", "--steps", "1", "--out", str(out)])
    assert rc == 2
    assert "chunk partition" in _err(capsys)
    assert not out.exists()
    # The default frame count follows the partition (13 frames).
    assert main(["generate", "--model", str(far), "--prompt", "a red one moving up", "--steps", "1", "--out", str(out)]) == 0
    import imageio.v2 as imageio

    assert len(imageio.mimread(out)) == 13
    assert main(["student", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert "not found" in _err(capsys)
