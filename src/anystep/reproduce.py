"""``anystep reproduce``: the paper's pipeline and key figures in miniature, from the shipped teacher.

Jobs, per architecture (bidirectional 7-frame clips; causal AnyFlow-FAR, 13 frames, chunks 1,3,3,3,3):

=====================  ====================================================  =====================
row (Table 2)          training                                             sampler
=====================  ====================================================  =====================
Teacher / flow match.  (full mode) teacher fine-tune by flow matching,        Euler + CFG 4 (x2 NFE)
                       one per architecture on its clip length; the students
                       and critics start from it
Real score             none: the exact flow of the toy world's clips          Euler + CFG 4 (x2 NFE)
                       (``anystep.flow.empirical``); Stage 2's DMD real score
                       and the ODE-init's teacher (``Budget.real_score``)
Flow matching (FAR)    causal student trained by flow matching (r = t)        Euler + CFG 4 (x2 NFE)
Consistency            ODE-init -> consistency backward simulation + DMD     consistency
 (full mode, also)     the same without the co-trained Stage-1 term           consistency
Flow map + consistency Stage 1 -> consistency backward simulation + DMD      consistency
AnyFlow, Stage 1 only  Stage 1 (Alg. 1)                                       flow-map Euler
AnyFlow                Stage 1 -> flow-map backward simulation + DMD (Alg. 2) flow-map Euler
=====================  ====================================================  =====================

Every model is swept over NFE (students 1..32 steps, guided models 1..50 steps at 2 NFE a step)
with ToyBench; then ``results.json``, ``report.md``, ``cost.md``, ``scaling.png``, ``samples.png``
and per-method mp4 grids are written.

Re-running with the same ``--out`` reuses everything already finished: a job whose ``model/``
exists is not retrained, a killed job resumes from its checkpoint, a finished sweep point is
not regenerated. A job whose recorded settings differ from the current ones is an error (use a
fresh ``--out``), so numbers from two settings are never mixed.
"""

from __future__ import annotations

from anystep.errors import UserError

import hashlib
import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from anystep.config import build_config_from_dict, load_yaml
from anystep.eval.cost import measure_costs
from anystep.eval.empirical_teacher import EmpiricalFlowModel
from anystep.eval.toybench_run import run_toybench
from anystep.eval.sample_figures import samples_figure
from anystep.report import TEACHER_REFERENCE_STEPS, write_report
from anystep.fsutil import atomic_write, folder_digest
from anystep.train.registry import method_info

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = ROOT / "models" / "toy-teacher"
TOY_CONFIGS = ROOT / "configs" / "toy"
CAUSAL_PARTITION = (1, 3, 3, 3, 3)
CAUSAL_FRAMES = sum(CAUSAL_PARTITION)  # the codec keeps the frame count: one latent frame per frame
STUDENT_STEPS = (1, 2, 4, 8, 16, 32)
GUIDED_STEPS = (1, 2, 4, 8, 16, 32, 50)  # NFE 2..100: Table 2 at 4/32 NFE, Table 3 at 50x2


@dataclass
class Budget:
    """Iterations per job (causal jobs use ``causal_frac`` of them) and evaluation size."""

    teacher_ft: int  # 0 skips the teacher fine-tune (the shipped teacher is the flow-matching row)
    stage1: int
    stage2: int
    consistency_init: int
    flow_matching_causal: int
    causal_frac: float
    n_prompts: int
    cost_repeats: int
    archs: tuple[str, ...] = ("bidirectional", "causal")
    student_steps: tuple[int, ...] = STUDENT_STEPS
    guided_steps: tuple[int, ...] = GUIDED_STEPS
    overrides: dict = field(default_factory=dict)  # per-job config overrides, e.g. {"stage2": {"lr": 1e-5}}
    # What Stage 2 and the consistency ODE-init distil from: "empirical", the exact flow of the toy
    # world's clips (clean converged samples; the network teacher stays every student's and critic's
    # start, Wan's role), or "teacher", the teacher network itself as on Wan.
    real_score: str = "empirical"
    real_score_clips: int = 64
    # Also train the consistency baseline without the co-trained Stage-1 term (Self-Forcing as
    # published), beside the co-trained one that shares AnyFlow's Stage-2 loop.
    published_consistency: bool = False


# Quick: the README's main job, ~7 min on 2 quiet CPU cores (the teacher ODE of the consistency
# ODE-init is its most expensive part, so quick mode runs it with 12 Euler steps instead of 24).
# Its real score keeps 16 clips a prompt instead of 64: the exact flow of a smaller clip set, 4x
# cheaper for the ODE-init's 12-step solves, which would otherwise cost minutes on 2 cores.
QUICK = Budget(teacher_ft=0, stage1=120, stage2=40, consistency_init=30, flow_matching_causal=60,
               causal_frac=0.5, n_prompts=16, cost_repeats=2, overrides={"consistency_init": {"ode_steps": 12}},
               real_score_clips=16)
# Full: 30 min on 2 quiet CPU cores without the cost measurement (docs/results/reproduce-full-v8/,
# the causal half about 18 of them); the bidirectional half took 7.2 min on one H200
# (docs/results/real-score-h200/).
FULL = Budget(teacher_ft=300, stage1=600, stage2=200, consistency_init=100, flow_matching_causal=300,
              causal_frac=0.5, n_prompts=40, cost_repeats=3, published_consistency=True)
#: A row whose "folder" starts with this is the empirical flow in that teacher folder's latent space.
EMPIRICAL = "empirical-flow:"


@dataclass
class Job:
    name: str  # "<arch>/<method>"
    kind: str  # stage1 | stage2 | consistency_init
    config: dict

    @property
    def dir(self) -> str:
        return self.config["out"]


def _toy(name: str) -> dict:
    return load_yaml(TOY_CONFIGS / f"{name}.yaml")


def plan(out: Path, budget: Budget, teacher: Path) -> tuple[list[Job], dict]:
    """The training jobs and, per architecture, the rows of the report: method -> (label, folder, steps)."""
    jobs: list[Job] = []
    rows: dict = {}
    ov = budget.overrides

    def job(name, kind, base, **cfg):
        merged = {**base, **cfg, **ov.get(kind, {}), "out": str(out / name), "threads": 0}
        jobs.append(Job(name, kind, merged))
        return str(out / name / "model")

    s1, s2 = _toy("stage1"), _toy("stage2")
    ci = _toy("consistency_init")
    real = dict(real_score=budget.real_score, real_score_clips=budget.real_score_clips)
    for arch in budget.archs:
        causal = arch == "causal"
        frac = budget.causal_frac if causal else 1.0
        n = lambda k: max(1, int(round(k * frac)))  # noqa: E731
        geo = dict(num_frames=CAUSAL_FRAMES, causal=True) if causal else dict(num_frames=7, causal=False)
        part = dict(chunk_partition=list(CAUSAL_PARTITION)) if causal else {}
        # The reference recipe fine-tunes the teacher on the students' data before Stage 1; the
        # fine-tune is every student's start, real score and critic. Each architecture gets one on
        # its own clip length: a 7-frame fine-tune forgets 13-frame clips (digit 72.5 -> 55% at
        # 50x2 for the shipped teacher), and the causal students would inherit that. The teacher
        # itself stays bidirectional: it scores whole clips.
        t = str(teacher)
        if budget.teacher_ft > 0:
            # The bidirectional one keeps its top-level name, so runs made before the split still reuse it.
            name = "teacher_ft" if not causal else f"{arch}/teacher_ft"
            t = job(name, "stage1", s1, method="flow_matching", teacher=str(teacher), steps=budget.teacher_ft,
                    num_frames=geo["num_frames"], causal=False)
        r: dict = {}
        if causal:
            fm = job(f"{arch}/flow_matching", "stage1", s1, method="flow_matching", teacher=t,
                     steps=budget.flow_matching_causal, **geo, **part)
            r["flow_matching"] = ("Flow matching (Euler + CFG)", fm, tuple(s for s in budget.guided_steps if s <= 32), False)
        else:
            label = "Teacher / flow matching (Euler + CFG)"
            r["flow_matching"] = (label, t, budget.guided_steps, True)
        st1 = job(f"{arch}/stage1", "stage1", s1, method="flowmap", teacher=t, steps=n(budget.stage1), **geo, **part)
        init = job(f"{arch}/consistency_init", "consistency_init", ci, teacher=t, steps=n(budget.consistency_init),
                   **geo, **part, **real)
        cons = job(f"{arch}/consistency", "stage2", s2, student=init, teacher=t, rollout="consistency",
                   steps=n(budget.stage2), **geo, **real)
        fmc = job(f"{arch}/flowmap_consistency", "stage2", s2, student=st1, teacher=t, rollout="consistency",
                  steps=n(budget.stage2), **geo, **real)
        anyf = job(f"{arch}/anyflow", "stage2", s2, student=st1, teacher=t, rollout="flowmap", steps=n(budget.stage2),
                   **geo, **real)
        ss = budget.student_steps
        if budget.real_score == "empirical":
            r["real_score"] = ("Real score: exact empirical flow (Euler + CFG)", EMPIRICAL + t, budget.guided_steps, False)
        r["consistency"] = ("Consistency ODE-init + consistency BS", cons, ss, False)
        if budget.published_consistency:
            pub = job(f"{arch}/consistency_published", "stage2", s2, student=init, teacher=t, rollout="consistency",
                      steps=n(budget.stage2), stage1_weight=0.0, **geo, **real)
            r["consistency_published"] = ("Consistency ODE-init + consistency BS, no co-trained Stage 1", pub, ss, False)
        r["flowmap_consistency"] = ("Flow-map training + consistency BS", fmc, ss, False)
        r["stage1"] = ("AnyFlow, Stage 1 only", st1, ss, False)
        r["anyflow"] = ("AnyFlow (Stage 1 + flow-map BS)", anyf, ss, False)
        rows[arch] = r
    return jobs, rows


class SettingsChanged(UserError, ValueError):
    """A finished or partial job in ``--out`` was made with different settings."""


def settings_diff(cls, have: dict, want: dict) -> list[str]:
    """Names of the settings in which a job record ``have`` differs from ``want``.

    A field absent from ``have`` was added to ``cls`` after that run was made; the run behaved as
    that field's default, so it only counts as a difference when ``want`` asks for another value.
    A key of ``have`` that ``cls`` no longer has is a difference too, unless it was recorded empty
    (None, {}, [], ""): an unused, since-retired field such as ``Stage1Config.extra``."""
    if have.get("kind") != want.get("kind"):
        return ["kind"]
    defaults = {}
    for f in fields(cls):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    defaults = json.loads(json.dumps(defaults))
    old, new = have["config"], want["config"]
    missing = object()
    diff = []
    retired_empty = {k for k, v in old.items() if k not in defaults and v in (None, {}, [], "")}
    for k in sorted((set(old) - retired_empty) | set(new)):
        before = old[k] if k in old else defaults.get(k, missing)
        if before != new.get(k, missing):
            diff.append(k)
    return diff


def run_job(job: Job) -> Path:
    """Train one job unless its model exists; a partial run resumes from its checkpoint."""
    d = Path(job.dir)
    info = method_info(job.kind)
    cls = info.config
    cfg = build_config_from_dict(cls, job.config)
    record = d / "reproduce_job.json"
    want = json.loads(json.dumps({"kind": job.kind, "config": asdict(cfg)}))
    want["teacher_sha256"] = folder_digest(cfg.teacher)
    if record.exists():
        have = json.loads(record.read_text())
        diff = settings_diff(cls, have, want)
        # A record written before the digest existed cannot vouch for the weights; the shipped
        # teacher has been retrained since, so it is refused rather than silently reused.
        if have.get("teacher_sha256") != want["teacher_sha256"]:
            diff.insert(0, f"teacher weights in {cfg.teacher}")
        elif "teacher" in diff:
            diff.remove("teacher")  # the same weights under another folder name are the same teacher
        if diff:
            raise SettingsChanged(f"{d} was made with different settings ({', '.join(diff[:5])}); use a fresh --out or delete the old one")
    if (d / "model" / "model_index.json").exists() and record.exists():
        return d / "model"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda f: f.write(json.dumps(want, indent=1).encode()))
    return info.train(cfg)


def _eval(folder: str, steps, out_dir: Path, n_prompts: int, num_frames: int | None = None,
          context_frames: int = 0, sampler: str | None = None, clips_per_prompt: int = 64) -> dict:
    if folder.startswith(EMPIRICAL):
        folder = EmpiricalFlowModel(folder[len(EMPIRICAL):], clips_per_prompt)
    return run_toybench(folder, steps=steps, out_dir=out_dir, n_prompts=n_prompts, reuse=True, n_show=4,
                        num_frames=num_frames, context_frames=context_frames, sampler=sampler)


#: Each student's own sampler (Table 2); the sampler cross table evaluates it with the other one too.
OWN_SAMPLER = {"consistency": "consistency", "consistency_published": "consistency",
               "flowmap_consistency": "consistency", "stage1": "flowmap", "anyflow": "flowmap"}
OTHER_SAMPLER = {"flowmap": "consistency", "consistency": "flowmap"}


def _strip(res: dict) -> dict:
    return {s: {kk: v for kk, v in row.items() if kk != "per_clip_total"} for s, row in res["results"].items()}


def _earlier_invocations(path: Path) -> list[dict]:
    """The finished invocations an earlier ``results.json`` of this ``--out`` recorded (date, wall
    seconds); a file from before the list existed counts as one invocation."""
    if not path.exists():
        return []
    try:
        meta = json.loads(path.read_text()).get("meta", {})
    except (json.JSONDecodeError, OSError):
        return []
    if meta.get("invocations"):
        return list(meta["invocations"])
    if "wall_seconds" in meta:
        return [{"date": meta.get("date", "?"), "wall_seconds": float(meta["wall_seconds"])}]
    return []


def _steps_at_nfe(steps, guided: bool, nfes=(4, 32)) -> tuple[int, ...]:
    """The step counts of ``steps`` whose NFE is in ``nfes`` (guided samplers cost 2 calls a step)."""
    per = 2 if guided else 1
    return tuple(s for s in steps if s * per in nfes)


def reproduce(out, quick: bool = True, teacher=None, budget: Budget | None = None, measure_cost: bool = True,
              command: str = "", progress=print) -> dict:
    """Run (or resume) the whole pipeline; returns the results dict also written to ``results.json``."""
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(teacher) if teacher else SHIPPED_TEACHER
    budget = budget or (QUICK if quick else FULL)
    jobs, rows = plan(out, budget, teacher)

    def say(msg):
        el = time.time() - t_start
        progress(f"[reproduce {el / 60:5.1f} min] {msg}")

    for i, job in enumerate(jobs, 1):
        done = (Path(job.dir) / "model" / "model_index.json").exists()
        say(f"job {i}/{len(jobs)} {job.name} ({job.kind}, {job.config.get('steps')} iterations)"
            + (" - finished earlier, reused" if done else ""))
        run_job(job)

    results: dict = {"architectures": {}, "meta": {}}
    n_evals = sum(len(r) for r in rows.values())
    k = 0
    real = None
    for arch, r in rows.items():
        methods, arch_real = {}, None
        for method, (label, folder, steps, is_teacher) in r.items():
            k += 1
            say(f"ToyBench {k}/{n_evals}: {arch} {label}, steps {list(steps)}")
            ev_dir = out / "eval" / arch / method
            frames = (CAUSAL_FRAMES if arch == "causal" else 7) if folder.startswith(EMPIRICAL) else None
            res = _eval(folder, steps, ev_dir, budget.n_prompts, num_frames=frames, clips_per_prompt=budget.real_score_clips)
            real = real or res.get("real")
            arch_real = arch_real or res.get("real")
            methods[method] = {
                "label": label, "folder": folder, "is_teacher": is_teacher, "eval_dir": str(ev_dir),
                "sweep": _strip(res),
            }
        # The same weights under both samplers at the Table 2 step counts: what the training does
        # apart from what the sampler does (consistency sampling returns denoised x0 at every step).
        cross = {}
        for method, own in OWN_SAMPLER.items():
            if method not in r:
                continue
            label, folder, steps, _ = r[method]
            other = OTHER_SAMPLER[own]
            sel = _steps_at_nfe(steps, guided=False)
            say(f"ToyBench sampler cross: {arch} {label} with the {other} sampler, steps {list(sel)}")
            res = _eval(folder, sel, out / "eval" / arch / f"{method}_{other}_sampler", budget.n_prompts, sampler=other)
            cross[method] = {"own": own, "other": other, "sweep": _strip(res)}
        results["architectures"][arch] = {"methods": methods, "sampler_cross": cross, "real": arch_real}
        if arch == "causal":
            # The causal students make CAUSAL_FRAMES-frame clips; their ceiling is the teacher at that length.
            say(f"ToyBench: the teacher on {CAUSAL_FRAMES}-frame clips at {TEACHER_REFERENCE_STEPS}x2 (the causal reference)")
            res = _eval(str(teacher), (TEACHER_REFERENCE_STEPS,), out / "eval" / arch / "teacher_13f", budget.n_prompts,
                        num_frames=CAUSAL_FRAMES)
            row = res["results"][str(TEACHER_REFERENCE_STEPS)]
            results["architectures"][arch]["teacher_reference"] = {k: v for k, v in row.items() if k != "per_clip_total"} | {"num_frames": CAUSAL_FRAMES}
            # Image-to-video: each causal model continues the first frame of its prompt's real clip.
            # Against the text-to-video rows this separates making the first frame from continuing it.
            i2v = {}
            for method, (label, folder, steps, is_teacher) in r.items():
                if folder.startswith(EMPIRICAL):
                    continue  # a flow of whole clips: it has no first-frame conditioning
                sel = _steps_at_nfe(steps, guided=(method == "flow_matching"))
                say(f"ToyBench image-to-video: {arch} {label}, steps {list(sel)}")
                res = _eval(folder, sel, out / "eval" / arch / f"{method}_i2v", budget.n_prompts, context_frames=1)
                i2v[method] = _strip(res)
            results["architectures"][arch]["i2v"] = i2v

    cost_path = out / "cost.json"
    if measure_cost:
        if cost_path.exists():
            results["cost"] = json.loads(cost_path.read_text())
        else:
            say("measuring per-iteration training cost (Table 5 analogue)")

            results["cost"] = measure_costs(str(teacher), batch=4, repeats=budget.cost_repeats, archs=budget.archs,
                                            progress=say)
            atomic_write(cost_path, lambda f: f.write(json.dumps(results["cost"], indent=1).encode()))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    invocations = _earlier_invocations(out / "results.json") + [{"date": now, "wall_seconds": time.time() - t_start}]
    results["meta"] = {
        "command": command or f"anystep reproduce {'--quick ' if quick else ''}--out {out}",
        "quick": quick, "date": now,
        # A re-run over finished work costs minutes; the run's cost is the sum over its invocations.
        "wall_seconds": sum(i["wall_seconds"] for i in invocations), "invocations": invocations,
        "teacher": str(teacher), "budget": asdict(budget),
        "n_prompts": budget.n_prompts, "real": real,
    }
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    say("writing report.md, cost.md, scaling.png, samples.png")
    write_report(results, out)
    samples_figure(results, out)
    say(f"done: {out / 'report.md'}")
    return results
