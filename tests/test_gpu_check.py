"""The GPU check script (benchmarks/gpu_check.py) in its CPU mode: the same checks at toy shapes, so
the script that judges a GPU machine cannot rot on the days no GPU is at hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_passes_every_check_and_times_every_row(gpu_check, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert gpu_check.main(["--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = set(data["checks"])
    assert {"parity_bidirectional_r_eq_t", "parity_far_flex_r_eq_t", "far_flex_equals_dense_mask",
            "far_kv_cache_equals_uncached", "stage1_step_bidirectional", "stage1_step_causal",
            "stage2_step_flowmap_bs", "stage2_step_consistency_bs", "cli_stage1_and_dcp_resume",
            "cli_stage2_flowmap", "cli_stage2_consistency", "cli_synth_one_shard", "cli_generate_4_steps"} <= names
    assert all(c["ok"] for c in data["checks"].values()), data["checks"]
    for row in [*gpu_check.PAPER_TABLE5, "sample_teacher_50x2", "sample_anyflow_4"]:
        assert data["cost"][row]["s"] > 0, row
    assert data["cost_ratios"]["flow_matching"] == 1.0
    printed = capsys.readouterr().out
    assert "13 passed, 0 failed" in printed and "paper x" in printed


def test_a_wrong_student_fails_the_parity_line(gpu_check, monkeypatch, capsys):
    """The parity check can fail: a delta embedder that is not the teacher's time embedder moves
    u(z, t, t) away from the teacher and must print FAIL, while the other checks still run."""
    real = gpu_check.student_from_teacher

    def broken(*args, **kw):
        student = real(*args, **kw)
        with torch.no_grad():
            for p in student.condition_embedder.delta_embedder.parameters():
                p.add_(torch.randn_like(p))
        return student

    monkeypatch.setattr(gpu_check, "student_from_teacher", broken)
    report = gpu_check.Report(None)
    gpu_check.network_checks(report, torch.device("cpu"), torch.float32, gpu_check.SHAPES["cpu"])
    checks = report.data["checks"]
    assert not checks["parity_bidirectional_r_eq_t"]["ok"]
    assert not checks["parity_far_flex_r_eq_t"]["ok"]
    assert checks["far_flex_equals_dense_mask"]["ok"]  # both sides share the broken weights
    assert "FAIL  parity_bidirectional_r_eq_t" in capsys.readouterr().out


def test_cuda_without_a_gpu_is_one_error_line(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error:")


def test_far_sampling_never_takes_the_stock_pipeline_path(tmp_path, monkeypatch):
    """diffusers 0.42.1's AnyFlowFARPipeline fails with use_kv_cache=False and attends to its KV
    padding; our FAR sampler runs its own chunk-by-chunk path (on a Wan-layout folder too) and
    never calls the pipeline."""
    from diffusers import AnyFlowFARPipeline

    from anystep.models.wan_layout import build_tiny_wan_folder
    from anystep.sampling import generate_latents, load_model

    seen = []
    real_call = AnyFlowFARPipeline.__call__

    def spy(self, *args, **kw):
        seen.append(kw.get("use_kv_cache", "default"))
        return real_call(self, *args, **kw)

    monkeypatch.setattr(AnyFlowFARPipeline, "__call__", spy)
    folder = build_tiny_wan_folder(tmp_path / "far", "anyflow_far", chunk_partition=(1, 1, 1, 1))
    lat = generate_latents(load_model(folder), ["a red one moving up"], 2, seed=0, num_frames=13, height=32, width=32)
    assert seen == []
    assert lat.shape[1] == 4 and torch.isfinite(lat).all()
