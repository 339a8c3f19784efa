"""`anystep export`: merged and separate-LoRA exports reload with diffusers and agree."""

import pytest
import torch

from anystep.cli import main
from anystep.sampling import generate_latents, load_model

PROMPTS = ["a red one moving left", "a blue two moving up"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from conftest import make_tiny_teacher

    from anystep.train.stage1 import Stage1Config, train_stage1

    root = tmp_path_factory.mktemp("exp")
    teacher = make_tiny_teacher(root / "t", steps=2)
    out = root / "s1"
    # lr large enough that the adapters and embedders move measurably in three steps.
    train_stage1(Stage1Config(teacher=str(teacher), out=str(out), steps=3, batch_size=2, warmup=1, ema_start=0,
                              ema_decay=0.5, lr=1e-2, lora_rank=4, lora_alpha=8, ckpt_every=1))
    return teacher, out


def test_merged_and_separate_lora_exports_agree(lora_run, tmp_path):
    from diffusers import AnyFlowPipeline

    teacher, run = lora_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "sep"), "--lora-file"]) == 0
    merged = load_model(tmp_path / "merged")
    # The merged export is the folder training wrote at the end (same EMA weights, LoRA fused).
    final = load_model(run / "model")
    z_m = generate_latents(merged, PROMPTS, steps=2, seed=3)
    assert torch.allclose(z_m, generate_latents(final, PROMPTS, steps=2, seed=3), atol=1e-5)
    # Base + LoRA file loaded through diffusers' own LoRA loader reproduces the merged model.
    sep = load_model(tmp_path / "sep")
    assert (tmp_path / "sep" / "pytorch_lora_weights.safetensors").exists()
    z_base = generate_latents(sep, PROMPTS, steps=2, seed=3)
    assert not torch.allclose(z_base, z_m, atol=1e-4)  # the adapters matter
    sep.pipe.load_lora_weights(str(tmp_path / "sep"))
    assert isinstance(sep.pipe, AnyFlowPipeline)
    assert torch.allclose(generate_latents(sep, PROMPTS, steps=2, seed=3), z_m, atol=1e-4)


def test_raw_weights_and_bad_input(lora_run, tmp_path, capsys):
    teacher, run = lora_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    raw, ema = load_model(tmp_path / "raw"), load_model(run / "model")
    assert not torch.allclose(generate_latents(raw, PROMPTS, 2, seed=1), generate_latents(ema, PROMPTS, 2, seed=1), atol=1e-5)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anystep: error:") and not (tmp_path / "x").exists()


def test_stage2_export_builds_the_student_alone(lora_run, tmp_path, monkeypatch):
    """Exporting a Stage-2 run opens the student's folder and nothing else: no teacher (the real
    score), no critic, no trainer; the folder equals the one training wrote."""
    from anystep.models import loaded
    from anystep.train.stage2 import Stage2Config, Stage2Method, train_stage2

    teacher, run = lora_run
    s2 = tmp_path / "s2"
    train_stage2(Stage2Config(student=str(run / "model"), teacher=str(teacher), out=str(s2), steps=1, batch_size=1,
                              critic_lora_rank=4, critic_lora_alpha=4, step_budgets=(2,), ema_start=0))
    opened = []
    real_load = loaded.load_pipeline
    monkeypatch.setattr(loaded, "load_pipeline", lambda folder, *a, **k: opened.append(str(folder)) or real_load(folder, *a, **k))

    def no_trainer(*args, **kwargs):
        raise AssertionError("export built the Stage-2 trainer")

    monkeypatch.setattr(Stage2Method, "__init__", no_trainer)
    assert main(["export", "--run", str(s2), "--out", str(tmp_path / "exp")]) == 0
    assert opened == [str(run / "model")]
    monkeypatch.undo()
    exp, final = load_model(tmp_path / "exp"), load_model(s2 / "model")
    assert torch.equal(generate_latents(exp, PROMPTS, 2, seed=1), generate_latents(final, PROMPTS, 2, seed=1))
