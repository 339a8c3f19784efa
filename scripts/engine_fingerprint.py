"""Bit-exactness fingerprint of every training method and every sampler (issue 19, item 0).

One process, CPU, one thread, fixed seeds: a few steps of each method from the shipped toy teacher
with tiny budgets, then generation at 1 and 4 steps with every kind of folder. Prints each logged
metric with its full float repr and a SHA-256 of every trained weight and every generated tensor,
so two revisions of the code can be compared with ``diff``:

    PYTHONPATH=src python scripts/engine_fingerprint.py > /tmp/after.txt
    diff docs/results/engine_fingerprint.txt /tmp/after.txt   # recorded on main at 6b5db6e

Wall-clock fields (``time``, ``*_mean`` windows that divide by it) are left out: they differ run
to run whatever the code does.

Against the record, the engine branch (issue 19) differs in these lines only, every loss, grad
norm, probe and weight digest being equal: the teacher's log gains ``loss_mean`` and ODE-init's
loses ``grid_index_mean_mean`` (one logging rule for every method: windows over ``loss*`` keys);
flow-map students are sampled by ``anystep.sampling``'s own flow-map Euler instead of diffusers'
pipelines (``stage1`` and ``s2_flowmap`` at 4 steps: ~1e-5 apart; FAR ``latents`` now equal the
chunk-by-chunk ``chunked`` clip, which did not change).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = str(ROOT / "models" / "toy-teacher")
_CLOCK = ("time", "it_per_s", "s_per_it", "eta")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def weights_digest(folder: Path) -> str:
    from anystep.models.folders import load_pipeline

    sd = load_pipeline(folder).transformer.state_dict()
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def metrics(run: Path) -> list[str]:
    lines = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        keep = {k: v for k, v in rec.items() if not any(c in k for c in _CLOCK)}
        lines.append(" ".join(f"{k}={v!r}" for k, v in sorted(keep.items())))
    return lines


def report(out, name: str, run: Path, folder: Path) -> None:
    print(f"## {name}", file=out)
    for line in metrics(run):
        print("  " + line, file=out)
    print(f"  weights={weights_digest(folder)}", file=out, flush=True)


def train_all(tmp: Path, out) -> dict[str, Path]:
    from anystep.train.baselines import ConsistencyInitConfig, train_consistency_init
    from anystep.train.stage1 import Stage1Config, train_stage1
    from anystep.train.stage2 import Stage2Config, train_stage2
    from anystep.train.teacher import TeacherConfig, train_teacher

    common = dict(steps=2, batch_size=2, warmup=1, log_every=1, ckpt_every=1)
    folders = {}
    t = TeacherConfig(out=str(tmp / "teacher"), steps=2, batch_size=4, warmup=1, log_every=1, probe_every=2,
                      ckpt_every=1, ema_start=0, sign_weight=0.5, text_sep_weight=0.5)
    folders["teacher"] = train_teacher(t)
    report(out, "teacher", tmp / "teacher", folders["teacher"])
    folders["stage1"] = train_stage1(Stage1Config(teacher=TEACHER, out=str(tmp / "s1"), ema_start=0, **common))
    report(out, "stage1 flowmap", tmp / "s1", folders["stage1"])
    folders["stage1_fm"] = train_stage1(Stage1Config(teacher=TEACHER, out=str(tmp / "s1fm"), method="flow_matching",
                                                     ema_start=0, **common))
    report(out, "stage1 flow_matching (wan)", tmp / "s1fm", folders["stage1_fm"])
    folders["far"] = train_stage1(Stage1Config(teacher=TEACHER, out=str(tmp / "far"), causal=True, num_frames=13,
                                               bidirectional_aux_prob=1.0, ema_start=0, **common))
    report(out, "stage1 causal flowmap", tmp / "far", folders["far"])
    folders["far_fm"] = train_stage1(Stage1Config(teacher=TEACHER, out=str(tmp / "farfm"), causal=True, num_frames=13,
                                                  method="flow_matching", ema_start=0, **common))
    report(out, "stage1 causal flow_matching", tmp / "farfm", folders["far_fm"])
    s2 = dict(teacher=TEACHER, critic_lora_rank=4, critic_lora_alpha=4, step_budgets=(1, 2, 4), lr=1e-4, critic_lr=1e-4,
              ema_start=0, **common)
    folders["s2_flowmap"] = train_stage2(Stage2Config(student=str(folders["stage1"]), out=str(tmp / "s2f"), **s2))
    report(out, "stage2 flowmap", tmp / "s2f", folders["s2_flowmap"])
    folders["s2_consistency"] = train_stage2(Stage2Config(student=str(folders["stage1"]), out=str(tmp / "s2c"),
                                                          rollout="consistency", **s2))
    report(out, "stage2 consistency", tmp / "s2c", folders["s2_consistency"])
    folders["s2_far"] = train_stage2(Stage2Config(student=str(folders["far"]), out=str(tmp / "s2far"), causal=True,
                                                  num_frames=13, **s2))
    report(out, "stage2 causal flowmap", tmp / "s2far", folders["s2_far"])
    folders["ode_init"] = train_consistency_init(ConsistencyInitConfig(teacher=TEACHER, out=str(tmp / "ci"), ode_steps=8,
                                                                       ema_start=0, **common))
    report(out, "consistency ODE-init", tmp / "ci", folders["ode_init"])
    return folders


def export_all(tmp: Path, out) -> None:
    from anystep.export import export_run

    print("## export (EMA weights of the last checkpoint)", file=out)
    for run in ("s1", "s1fm", "far", "s2f", "s2c", "s2far", "ci"):
        folder = export_run(tmp / run, tmp / f"export_{run}")
        print(f"  {run} weights={weights_digest(folder)}", file=out, flush=True)


def generate_all(folders: dict[str, Path], out) -> None:
    from anystep.sampling import generate_latents, load_model

    prompts = ["a red three moving right", "a blue seven moving up"]
    print("## generation", file=out)
    for name, folder in [("teacher", TEACHER), ("stage1", folders["stage1"]), ("stage1_fm", folders["stage1_fm"]),
                         ("s2_flowmap", folders["s2_flowmap"]), ("s2_consistency", folders["s2_consistency"]),
                         ("ode_init", folders["ode_init"])]:
        model = load_model(folder)
        for steps in (1, 4):
            lat = generate_latents(model, prompts, steps, seed=5)
            print(f"  {name} ({model.kind}/{model.sampler}) steps={steps} latents={digest(lat)}", file=out)
    for name in ("far", "far_fm", "s2_far"):
        model = load_model(folders[name])
        nf = int(sum(model.transformer.config.chunk_partition))
        for steps in (1, 4):
            whole = generate_latents(model, prompts, steps, seed=5, num_frames=nf)
            chunked = generate_latents(model, prompts, steps, seed=5, num_frames=nf, on_chunk=lambda k, lat: None)
            print(f"  {name} ({model.kind}/{model.sampler}) steps={steps} latents={digest(whole)} "
                  f"chunked={digest(chunked)}", file=out)
    out.flush()


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = sys.stdout
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        # The trainers' progress lines carry timings: they go to stderr, the fingerprint to stdout.
        folders = train_all(Path(tmp), out)
        export_all(Path(tmp), out)
        generate_all(folders, out)


if __name__ == "__main__":
    main()
