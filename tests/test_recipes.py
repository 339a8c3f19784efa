"""Real-scale recipes: each file builds and trains one step on a tiny random-weight folder of the
released layout (WanPipeline / AnyFlowPipeline / AnyFlowFARPipeline with AutoencoderKLWan)."""

import json
from pathlib import Path

import pytest
import torch

from anystep.cli import main
from anystep.models.latents import encode_pixels, latent_frames
from anystep.models.wan_layout import build_tiny_wan_folder, parameter_count

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["data=moving_digits", "steps=1", "num_frames=13", "batch_size=2", "ckpt_every=1", "log_every=1", "threads=1"]
FAR_SMOKE = ["chunk_partition=[1,1,1,1]"]  # 13 frames -> 4 latent frames under the Wan VAE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinywan")
    return {k: build_tiny_wan_folder(root / k, k) for k in ("teacher", "anyflow", "anyflow_far")}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_meta_device_sizes():
    # Wan2.1 "1.3B" counts 1.42e9 with its text/time embedders; 14B counts 1.43e10.
    assert 1.3e9 < parameter_count("wan1.3b") < 1.5e9
    assert 1.35e10 < parameter_count("wan14b") < 1.5e10


def test_wan_vae_latents_layout(tiny):
    from anystep.sampling import load_model

    vae = load_model(tiny["teacher"]).pipe.vae
    assert latent_frames(vae, 13) == 4
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_frames(vae, 7)
    x = encode_pixels(vae, torch.zeros(1, 13, 3, 32, 32))
    assert x.shape == (1, 4, 16, 4, 4)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("recipe", ["wan1.3b/stage1", "wan14b/stage1", "farwan1.3b/stage1", "wan1.3b/teacher_finetune"])
def test_stage1_recipes_run_one_step(tiny, tmp_path, recipe):
    out = tmp_path / "run"
    extra = FAR_SMOKE if recipe.startswith("farwan") else []
    rc = main(["train", "stage1", "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
               f"teacher={tiny['teacher']}", f"out={out}", *SMOKE, *extra])
    assert rc == 0
    m = _metrics(out)
    assert m[-1]["step"] == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    index = json.loads((out / "model" / "model_index.json").read_text())
    expected = {"farwan1.3b/stage1": "AnyFlowFARPipeline", "wan1.3b/teacher_finetune": "WanPipeline"}.get(recipe, "AnyFlowPipeline")
    assert index["_class_name"] == expected and index["vae"][1] == "AutoencoderKLWan"


@pytest.mark.parametrize("recipe", ["wan1.3b/stage2", "farwan1.3b/stage2"])
def test_stage2_recipes_run_one_step(tiny, tmp_path, recipe):
    out = tmp_path / "run"
    far = recipe.startswith("farwan")
    student = tiny["anyflow_far" if far else "anyflow"]
    rc = main(["train", "stage2", "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
               f"student={student}", f"teacher={tiny['teacher']}", f"out={out}", *SMOKE, "critic_lora_rank=4",
               "critic_lora_alpha=4", "lora_rank=4", "lora_alpha=4"])
    assert rc == 0
    assert _metrics(out)[-1]["step"] == 1
    index = json.loads((out / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ("AnyFlowFARPipeline" if far else "AnyFlowPipeline")


def test_recipes_carry_reference_numbers():
    from anystep.config import build_config
    from anystep.train.stage1 import Stage1Config
    from anystep.train.stage2 import Stage2Config

    s1 = build_config(Stage1Config, ROOT / "configs/wan1.3b/stage1.yaml")
    assert (s1.lr, tuple(s1.betas), s1.warmup, s1.ema_decay, s1.ema_start) == (5e-5, (0.9, 0.95), 1000, 0.999, 1000)
    assert (s1.guidance, s1.fd_eps, s1.gate_value, s1.lora_rank, s1.lora_alpha) == (3.0, 0.005, 0.25, 256, 256)
    far = build_config(Stage1Config, ROOT / "configs/farwan1.3b/stage1.yaml")
    assert far.causal and tuple(far.chunk_partition) == (1, 3, 3, 3, 3, 3, 3, 2) and sum(far.chunk_partition) == 21
    s2 = build_config(Stage2Config, ROOT / "configs/wan1.3b/stage2.yaml")
    assert tuple(s2.step_budgets) == (2, 4, 8, 16, 50) and (s2.lr, tuple(s2.betas), s2.ema_decay) == (2e-6, (0.0, 0.999), 0.99)
