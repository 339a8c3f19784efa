"""Stage-2 cost: flow-map vs consistency backward simulation at s = 4 and s = 16, side by side.

    python benchmarks/stage2_cost.py [--teacher models/toy-teacher] [--batch 4] [--repeats 3] [--arch both]

Students are built from the teacher (weights do not matter for cost). One Stage-2 iteration =
generator step (rollout with gradient + DMD + co-trained Stage-1 loss) + critic step, as in
training. All variants of an architecture are timed interleaved in one process; peak memory is
the rise of peak RSS over the set-up baseline, in a fresh subprocess per variant. The paper: the
flow-map rollout costs the same at every s (three jumps), the consistency rollout grows with s
(+15.7% causal / +22.5% bidirectional for flow-map at 4 steps, -43.4% / -47.0% at 16).
The last line is a JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

VARIANTS = {
    "flowmap_s4": dict(rollout="flowmap", step_budgets=(4,)),
    "flowmap_s16": dict(rollout="flowmap", step_budgets=(16,)),
    "consistency_s4": dict(rollout="consistency", consistency_steps=4),
    "consistency_s16": dict(rollout="consistency", consistency_steps=16),
}


def _students(teacher: str, tmp: Path) -> dict[str, Path]:
    from anystep.models.students import student_folder_from_teacher

    return {
        "bidirectional": student_folder_from_teacher(teacher, tmp / "bidi"),
        "causal": student_folder_from_teacher(teacher, tmp / "far", causal=True, chunk_partition=(1, 3, 3, 3, 3)),
    }


def _trainer(teacher: str, student: Path, arch: str, variant: str, batch: int, out: Path):
    from anystep.train.stage2 import Stage2Config, Stage2Method

    cfg = Stage2Config(
        student=str(student), teacher=teacher, out=str(out), batch_size=batch,
        causal=arch == "causal", num_frames=13 if arch == "causal" else 7,
        critic_lora_rank=32, critic_lora_alpha=32, **VARIANTS[variant],
    )
    return Stage2Method(cfg)


def _child(args) -> None:
    arch, variant, student = args.child.split(":", 2)
    with tempfile.TemporaryDirectory() as tmp:
        tr = _trainer(args.teacher, Path(student), arch, variant, args.batch, Path(tmp) / "o")
        tr.train_step()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tr.train_step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rise_mb": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "models" / "toy-teacher"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", default="both", choices=["both", "bidirectional", "causal"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    archs = ["bidirectional", "causal"] if args.arch == "both" else [args.arch]
    result: dict = {"batch": args.batch, "threads": torch.get_num_threads(), "sec_per_iter": {}, "peak_rss_rise_mb": {}, "ratios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        students = _students(args.teacher, tmp)
        for arch in archs:
            trainers = {v: _trainer(args.teacher, students[arch], arch, v, args.batch, tmp / f"{arch}-{v}") for v in VARIANTS}
            times = {v: [] for v in VARIANTS}
            for tr in trainers.values():
                tr.train_step()  # warm-up
            for _ in range(args.repeats):
                for v, tr in trainers.items():
                    t0 = time.perf_counter()
                    tr.train_step()
                    times[v].append(time.perf_counter() - t0)
            med = {v: statistics.median(x) for v, x in times.items()}
            result["sec_per_iter"][arch] = med
            if not args.no_memory:
                mem = {}
                for v in VARIANTS:
                    out = subprocess.run(
                        [sys.executable, __file__, "--teacher", args.teacher, "--batch", str(args.batch),
                         "--child", f"{arch}:{v}:{students[arch]}"],
                        capture_output=True, text=True, check=True,
                    ).stdout.strip().splitlines()[-1]
                    mem[v] = json.loads(out)["peak_rise_mb"]
                result["peak_rss_rise_mb"][arch] = mem
            r = {
                "flowmap_s16_over_s4": med["flowmap_s16"] / med["flowmap_s4"],
                "consistency_s16_over_s4": med["consistency_s16"] / med["consistency_s4"],
                "flowmap_over_consistency_s4": med["flowmap_s4"] / med["consistency_s4"],
                "flowmap_over_consistency_s16": med["flowmap_s16"] / med["consistency_s16"],
            }
            result["ratios"][arch] = r
            print(f"\n{arch}, batch {args.batch}, median of {args.repeats} iterations (generator + critic)")
            for v in VARIANTS:
                m = result["peak_rss_rise_mb"].get(arch, {}).get(v)
                print(f"  {v:>16}: {med[v]:.3f} s/iter" + (f"   peak RSS rise {m:.0f} MB" if m is not None else ""))
            print(f"  flow-map s16/s4 = {r['flowmap_s16_over_s4']:.3f}   consistency s16/s4 = {r['consistency_s16_over_s4']:.3f}")
            print(f"  flow-map vs consistency: {100 * (r['flowmap_over_consistency_s4'] - 1):+.1f}% at s=4, "
                  f"{100 * (r['flowmap_over_consistency_s16'] - 1):+.1f}% at s=16")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
