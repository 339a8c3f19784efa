"""`anystep reproduce`: the report builder, the bootstrap, reuse of finished work, the pipeline's plumbing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from anystep.report import bootstrap_ci, claims, report_markdown, table2, table3


def test_bootstrap_matches_the_exact_resampling_distribution():
    # Three prompts scoring 0, 0, 90: a resample's mean is 30 k with k ~ Binomial(3, 1/3), so
    # P(mean = 0) = 8/27 > 2.5% and P(mean = 90) = 1/27 > 2.5%: the 95% interval is [0, 90].
    m, lo, hi = bootstrap_ci([0.0, 0.0, 90.0], n_boot=20000)
    assert (m, lo, hi) == (30.0, 0.0, 90.0)
    assert bootstrap_ci([7.0] * 5) == (7.0, 7.0, 7.0)
    # Large n: the percentile interval approaches mean +- 1.96 sd / sqrt(n).
    v = np.random.default_rng(1).normal(50.0, 10.0, 400)
    m, lo, hi = bootstrap_ci(v, n_boot=4000)
    half = 1.96 * v.std() / np.sqrt(len(v))
    assert abs((hi - lo) / 2 - half) / half < 0.1 and lo < m < hi
    with pytest.raises(ValueError):
        bootstrap_ci([])


def _row(steps, nfe, totals):
    t = np.asarray(totals, float)
    return {"steps": steps, "nfe": nfe, "Quality": float(t.mean()), "Semantic": float(t.mean()), "Total": float(t.mean()),
            "per_clip": {"quality": list(t), "semantic": list(t), "total": list(t)}}


def _synthetic():
    anyflow = {"label": "AnyFlow", "sweep": {"4": _row(4, 4, [60, 62, 64, 66]), "32": _row(32, 32, [70, 70, 72, 72])}}
    cons = {"label": "Consistency", "sweep": {"4": _row(4, 4, [50, 52, 54, 56]), "32": _row(32, 32, [40, 40, 42, 42])}}
    teacher = {"label": "Teacher", "is_teacher": True,
               "sweep": {"2": _row(2, 4, [10, 10, 10, 10]), "16": _row(16, 32, [60, 60, 60, 60]), "50": _row(50, 100, [80, 80, 80, 80])}}
    return {"meta": {"command": "anystep reproduce --quick --out x", "quick": True, "wall_seconds": 60, "n_prompts": 4},
            "architectures": {"bidirectional": {"methods": {"flow_matching": teacher, "consistency": cons, "anyflow": anyflow}}}}


def test_report_builder_on_synthetic_results():
    res = _synthetic()
    t2 = table2(res, n_boot=500)["bidirectional"]
    assert t2["anyflow"]["4"]["Total"]["mean"] == 63.0 and t2["anyflow"]["32"]["Total"]["mean"] == 71.0
    assert t2["flow_matching"]["4"]["Total"]["mean"] == 10.0  # the NFE-4 column of a guided model is 2 steps x 2
    assert t2["anyflow"]["4"]["Total"]["low"] <= 63.0 <= t2["anyflow"]["4"]["Total"]["high"]
    t3 = table3(res, n_boot=500)
    assert t3["teacher 50x2"]["nfe"] == 100 and t3["teacher 50x2"]["Total"]["mean"] == 80.0
    assert t3["AnyFlow bidirectional 4 NFE"]["Total"]["mean"] == 63.0
    verdicts = {c["claim"]: c["verdict"] for c in claims(res)}
    assert verdicts["bidirectional: AnyFlow does not degrade from 4 to 32 NFE (Total at 32 >= at 4)"] == "holds (intervals separate)"
    assert verdicts["bidirectional: AnyFlow beats Consistency at 4 NFE"].startswith("holds")
    assert verdicts["bidirectional: the consistency baseline degrades from 4 to 32 NFE (Total at 4 > at 32)"].startswith("holds")
    assert verdicts["bidirectional: AnyFlow at 4 NFE matches the teacher at 50x2 (Total >=)"] == "does not hold (intervals separate)"
    md = report_markdown(res, n_boot=500)
    assert "| AnyFlow | " in md and "63.0 [" in md and "| teacher 50x2 | 100 |" in md
    assert "**does not hold (intervals separate)**" in md
    # The teacher gains 50 points from 4 to 32 NFE: the ">= 5" claim holds; AnyFlow's 8 does too.
    assert verdicts["bidirectional: Teacher gains >= 5 Total from 4 to 32 NFE"] == "holds (intervals separate)"


def test_real_score_claims():
    """The real score at 100 NFE is held against real clips (within 10 Total) and gains from steps
    by >= 5 only with a margin: 3 points of gain are not enough even with separate intervals."""
    res = _synthetic()
    res["meta"]["real"] = {"Total": 99.0}
    res["architectures"]["bidirectional"]["methods"]["real_score"] = {
        "label": "Real score", "sweep": {"2": _row(2, 4, [95, 95, 96, 96]), "16": _row(16, 32, [98, 98, 99, 99]),
                                         "50": _row(50, 100, [88, 88, 90, 90])}}
    verdicts = {c["claim"]: c["verdict"] for c in claims(res)}
    assert verdicts["bidirectional: the real score at 100 NFE is within 10 Total of held-out real clips (99.0)"] == "holds"
    assert verdicts["bidirectional: Real score gains >= 5 Total from 4 to 32 NFE"] == (
        "does not hold (intervals separate) (a gain of 3.00, below the 5-point bar)")
    assert verdicts["bidirectional: AnyFlow at 4 NFE matches the real score it distils at 50x2 (Total >=)"].startswith(
        "does not hold")
    res["meta"]["real"] = {"Total": 100.0}
    assert {c["claim"]: c["verdict"] for c in claims(res)}[
        "bidirectional: the real score at 100 NFE is within 10 Total of held-out real clips (100.0)"] == "does not hold"
    assert "real score (exact empirical flow) 50x2, bidirectional clips" in table3(res, n_boot=200)
    # An architecture's own ceiling (the causal one's 13-frame clips) wins over the run-wide one.
    res["architectures"]["bidirectional"]["real"] = {"Total": 95.0}
    assert {c["claim"]: c["verdict"] for c in claims(res)}[
        "bidirectional: the real score at 100 NFE is within 10 Total of held-out real clips (95.0)"] == "holds"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole pipeline on a tiny teacher with a drastically shortened budget."""
    from conftest import make_tiny_teacher

    from anystep.reproduce import Budget, reproduce

    root = tmp_path_factory.mktemp("rep")
    teacher = make_tiny_teacher(root / "teacher", steps=2)
    small = {"batch_size": 2}
    budget = Budget(teacher_ft=1, stage1=2, stage2=1, consistency_init=1, flow_matching_causal=1, causal_frac=1.0,
                    n_prompts=3, cost_repeats=1, student_steps=(1, 4), guided_steps=(2, 50), real_score_clips=2,
                    published_consistency=True, overrides={"stage1": small, "stage2": {**small, "critic_lora_rank": 4, "critic_lora_alpha": 4},
                               "consistency_init": {**small, "ode_steps": 4}})
    out = root / "out"
    logs: list[str] = []
    res = reproduce(out, quick=True, teacher=teacher, budget=budget, measure_cost=False, progress=logs.append)
    return out, teacher, budget, res, logs


def test_pipeline_writes_every_artefact(tiny_run):
    out, _, _, res, logs = tiny_run
    for name in ("report.md", "results.json", "scaling.png", "samples.png", "samples_causal_anyflow.mp4"):
        assert (out / name).stat().st_size > 0, name
    # measure_cost=False: no cost.md, and the report does not point a reader at one
    assert not (out / "cost.md").exists() and "`cost.md`" not in (out / "report.md").read_text()
    on_disk = json.loads((out / "results.json").read_text())
    for arch in ("bidirectional", "causal"):
        methods = on_disk["architectures"][arch]["methods"]
        assert set(methods) == {"flow_matching", "real_score", "consistency", "consistency_published",
                                "flowmap_consistency", "stage1", "anyflow"}
        assert methods["anyflow"]["sweep"]["4"]["nfe"] == 4
        assert methods["real_score"]["sweep"]["50"]["nfe"] == 100
    # The real score is the empirical flow of the arch's own clip length; it is what Stage 2 and the
    # ODE-init distil from, with and without the co-trained Stage-1 term for the consistency baseline.
    assert json.loads((out / "eval/causal/real_score/toybench.json").read_text())["num_frames"] == 13
    for name in ("bidirectional/anyflow", "causal/consistency", "causal/consistency_init"):
        assert json.loads((out / name / "reproduce_job.json").read_text())["config"]["real_score"] == "empirical"
    pub = json.loads((out / "bidirectional/consistency_published/reproduce_job.json").read_text())["config"]
    assert pub["stage1_weight"] == 0.0 and pub["student"] == str(out / "bidirectional/consistency_init/model")
    ref = on_disk["architectures"]["causal"]["teacher_reference"]
    assert ref["num_frames"] == 13 and ref["nfe"] == 100 and len(ref["per_clip"]["total"]) == 3
    assert on_disk["architectures"]["bidirectional"]["methods"]["flow_matching"]["sweep"]["2"]["nfe"] == 4
    assert any("job 1/" in line for line in logs) and any("ToyBench" in line for line in logs)
    # Consistency rows are served by the consistency sampler, the causal flow-matching row by Euler + CFG.
    assert json.loads((out / "bidirectional/consistency/model/anystep.json").read_text())["sampler"] == "consistency"
    assert json.loads((out / "causal/flow_matching/model/anystep.json").read_text())["sampler"] == "euler_cfg"
    # Causal rows are also scored image-to-video at the Table 2 NFE (4 here: 2 guided steps, 4 student steps).
    i2v = on_disk["architectures"]["causal"]["i2v"]
    assert set(i2v) == set(on_disk["architectures"]["causal"]["methods"]) - {"real_score"}
    assert list(i2v["flow_matching"]) == ["2"] and list(i2v["anyflow"]) == ["4"]
    assert json.loads((out / "eval/causal/anyflow_i2v/toybench.json").read_text())["context_frames"] == 1
    assert "causal: image-to-video" in (out / "report.md").read_text()
    # Every student row is also sampled with the other students' sampler at the Table 2 NFE.
    for arch in ("bidirectional", "causal"):
        cross = on_disk["architectures"][arch]["sampler_cross"]
        assert {m: (c["own"], c["other"]) for m, c in cross.items()} == {
            "consistency": ("consistency", "flowmap"), "consistency_published": ("consistency", "flowmap"),
            "flowmap_consistency": ("consistency", "flowmap"),
            "stage1": ("flowmap", "consistency"), "anyflow": ("flowmap", "consistency")}
        assert list(cross["anyflow"]["sweep"]) == ["4"]
    assert json.loads((out / "eval/causal/anyflow_consistency_sampler/toybench.json").read_text())["sampler"] == "consistency"
    assert "the same weights under both samplers" in (out / "report.md").read_text()
    # Each architecture's students start from (and are scored by) a teacher fine-tune on their own
    # clip length; the fine-tuned teacher stays bidirectional.
    job = lambda name: json.loads((out / name / "reproduce_job.json").read_text())["config"]  # noqa: E731
    ft = job("causal/teacher_ft")
    assert (ft["num_frames"], ft["causal"], ft["method"]) == (13, False, "flow_matching")
    assert job("teacher_ft")["num_frames"] == 7
    for name in ("causal/anyflow", "causal/stage1", "causal/flow_matching", "causal/consistency_init"):
        assert job(name)["teacher"] == str(out / "causal/teacher_ft/model"), name
    assert job("bidirectional/anyflow")["teacher"] == str(out / "teacher_ft/model")


def test_rerun_reuses_finished_work_and_refuses_changed_settings(tiny_run, monkeypatch):
    from dataclasses import replace

    import anystep.reproduce as rp
    import anystep.eval.toybench_run as tb

    out, teacher, budget, res, _ = tiny_run
    calls = []
    real = rp.method_info

    def no_training(kind):
        def train(cfg):
            calls.append(kind)
            raise AssertionError("a finished job was retrained")

        return replace(real(kind), train=train)

    monkeypatch.setattr(rp, "method_info", no_training)
    monkeypatch.setattr(tb, "_generate_all", lambda *a, **k: calls.append("generate"))
    again = rp.reproduce(out, quick=True, teacher=teacher, budget=budget, measure_cost=False, progress=lambda m: None)
    assert calls == []  # no job retrained, no clip regenerated
    inv = again["meta"]["invocations"]  # the run's wall time adds up its invocations
    assert len(inv) == 2 and inv[0]["wall_seconds"] == pytest.approx(res["meta"]["wall_seconds"])
    assert again["meta"]["wall_seconds"] == pytest.approx(sum(i["wall_seconds"] for i in inv))
    assert "over 2 invocations" in (out / "report.md").read_text()
    assert again["architectures"]["causal"]["methods"]["anyflow"]["sweep"]["4"]["Total"] == \
        res["architectures"]["causal"]["methods"]["anyflow"]["sweep"]["4"]["Total"]
    # The same bytes under another folder name (a renamed teacher folder) are the same teacher.
    renamed = teacher.parent / "teacher_renamed"
    shutil.copytree(teacher, renamed)
    rp.reproduce(out, quick=True, teacher=renamed, budget=budget, measure_cost=False, progress=lambda m: None)
    assert calls == []
    monkeypatch.undo()
    with pytest.raises(rp.SettingsChanged, match="different settings"):
        rp.reproduce(out, quick=True, teacher=teacher, budget=replace(budget, stage1=3), measure_cost=False,
                     progress=lambda m: None)
    # Same path, other bytes: a retrained teacher must not be served the old students.
    marker = teacher / "retrained.txt"
    marker.write_text("new weights")
    try:
        with pytest.raises(rp.SettingsChanged, match="teacher weights"):
            rp.reproduce(out, quick=True, teacher=teacher, budget=budget, measure_cost=False, progress=lambda m: None)
    finally:
        marker.unlink()
    # A record from before the digest existed cannot vouch for the weights either.
    record = out / "bidirectional" / "stage1" / "reproduce_job.json"
    kept = record.read_text()
    rec = json.loads(kept)
    del rec["teacher_sha256"]
    record.write_text(json.dumps(rec))
    try:
        with pytest.raises(rp.SettingsChanged, match="teacher weights"):
            rp.reproduce(out, quick=True, teacher=teacher, budget=budget, measure_cost=False, progress=lambda m: None)
    finally:
        record.write_text(kept)


def test_folder_digest_sees_names_and_bytes(tmp_path):
    from anystep.reproduce import folder_digest

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    base = folder_digest(tmp_path)
    assert folder_digest(tmp_path) == base
    (tmp_path / "a" / "w.bin").write_bytes(b"124")
    assert folder_digest(tmp_path) != base
    (tmp_path / "a" / "w.bin").write_bytes(b"123")
    assert folder_digest(tmp_path) == base
    (tmp_path / "a" / "w.bin").rename(tmp_path / "a" / "v.bin")
    assert folder_digest(tmp_path) != base


def test_cli_reproduce_bad_input(tmp_path, capsys):
    from anystep.cli import main

    (tmp_path / "file").write_text("x")
    assert main(["reproduce", "--out", str(tmp_path / "file")]) == 2
    assert main(["reproduce", "--quick", "--out", str(tmp_path / "o"), "--teacher", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("anystep: error:") for line in err)
    assert not (tmp_path / "o").exists()


def test_cost_measurement_reports_every_component(tmp_path):
    """The Table 5 analogue: every component timed, ratios computed from the medians it reports."""
    from conftest import make_tiny_teacher

    from anystep.eval.cost import STAGE2_VARIANTS, measure_costs
    from anystep.report import cost_markdown

    teacher = make_tiny_teacher(tmp_path / "t", steps=1)
    cost = measure_costs(str(teacher), batch=2, repeats=1, archs=("bidirectional",), progress=lambda m: None)
    sec = cost["sec_per_iter"]["bidirectional"]
    assert set(sec) == {"flow_matching", "stage1", *STAGE2_VARIANTS} and all(v > 0 for v in sec.values())
    r = cost["ratios"]["bidirectional"]
    assert r["flowmap_over_consistency_s16"] == pytest.approx(sec["flowmap_s16"] / sec["consistency_s16"])
    assert r["stage1_over_flow_matching"] == pytest.approx(sec["stage1"] / sec["flow_matching"])
    md = cost_markdown(cost)
    assert "| flowmap_s16_over_s4 |" in md and "1.00 / 1.00" in md


def test_settings_diff_tolerates_fields_added_at_their_default():
    """A run recorded before a config field existed behaved as its default: reusable, unless
    the new job asks for another value (or any recorded value differs)."""
    from dataclasses import asdict

    from anystep.reproduce import settings_diff
    from anystep.train.stage1 import Stage1Config

    want = json.loads(json.dumps({"kind": "stage1", "config": asdict(Stage1Config(steps=7))}))
    assert settings_diff(Stage1Config, want, want) == []
    older = json.loads(json.dumps(want))
    dropped = sorted(older["config"])[0]
    del older["config"][dropped]
    assert settings_diff(Stage1Config, older, want) == []
    changed = json.loads(json.dumps(want))
    changed["config"][dropped] = "not the default"
    assert settings_diff(Stage1Config, older, changed) == [dropped]
    changed = json.loads(json.dumps(want))
    changed["config"]["steps"] = 8
    assert settings_diff(Stage1Config, want, changed) == ["steps"]
    # A field the record has and the class no longer knows is a difference too.
    extra = json.loads(json.dumps(want))
    extra["config"]["retired"] = 1
    assert settings_diff(Stage1Config, extra, want) == ["retired"]
    assert settings_diff(Stage1Config, {**want, "kind": "stage2"}, want) == ["kind"]


def test_causal_students_are_held_against_the_teacher_on_their_own_clip_length():
    """An architecture with its own teacher reference (the causal one: 13-frame clips) is checked
    against that row; the others keep the shared teacher row."""
    res = _synthetic()
    causal_anyflow = {"label": "AnyFlow", "sweep": {"4": _row(4, 4, [50, 50, 52, 52]), "32": _row(32, 32, [50, 50, 52, 52])}}
    res["architectures"]["causal"] = {"methods": {"anyflow": causal_anyflow},
                                      "teacher_reference": {**_row(50, 100, [40, 40, 40, 40]), "num_frames": 13}}
    t3 = table3(res, n_boot=500)
    assert t3["teacher 50x2, causal clips (13 frames)"]["Total"]["mean"] == 40.0
    assert t3["teacher 50x2"]["Total"]["mean"] == 80.0
    verdicts = {c["claim"]: c["verdict"] for c in claims(res)}
    assert verdicts["causal: AnyFlow at 4 NFE matches the teacher at 50x2 (Total >=)"] == "holds (intervals separate)"
    assert verdicts["bidirectional: AnyFlow at 4 NFE matches the teacher at 50x2 (Total >=)"].startswith("does not hold")
    assert "| teacher 50x2, causal clips (13 frames) | 100 |" in report_markdown(res, n_boot=500)


def test_swapped_sampler_agrees_at_one_step_and_not_beyond(tiny_run, tmp_path):
    """One flow-map jump from noise to data is the consistency sampler's first x0 prediction; from
    two steps on the consistency sampler re-noises, so the same weights give other clips."""
    from anystep.eval.toybench_run import run_toybench

    out = tiny_run[0]
    folder = out / "bidirectional" / "anyflow" / "model"
    own = run_toybench(folder, steps=(1, 2), out_dir=tmp_path / "own", n_prompts=2, n_show=2)
    swap = run_toybench(folder, steps=(1, 2), out_dir=tmp_path / "swap", n_prompts=2, n_show=2, sampler="consistency")
    assert own["sampler"] == "flowmap" and swap["sampler"] == "consistency"
    one_a, one_b = np.load(tmp_path / "own" / "samples_1.npy"), np.load(tmp_path / "swap" / "samples_1.npy")
    two_a, two_b = np.load(tmp_path / "own" / "samples_2.npy"), np.load(tmp_path / "swap" / "samples_2.npy")
    assert np.abs(one_a.astype(np.float32) - one_b.astype(np.float32)).max() < 1e-2
    assert np.abs(two_a.astype(np.float32) - two_b.astype(np.float32)).max() > 1e-2
    with pytest.raises(ValueError, match="Euler"):
        run_toybench(out / "causal" / "flow_matching" / "model", steps=(1,), out_dir=tmp_path / "x", n_prompts=2,
                     sampler="consistency")
