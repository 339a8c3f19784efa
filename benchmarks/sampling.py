"""Sampling latency per clip at each step count, teacher vs AnyFlow-style student, in one run.

    python benchmarks/sampling.py [--teacher models/toy-teacher] [--clips 8] [--repeats 3]

The student is built from the teacher (same backbone, flow-map embedding); its weights do not
matter for latency. Both are timed interleaved, in the same process, so machine noise hits both
alike. The last line is a JSON object with the latencies and the ratio
teacher (50 steps x 2 for guidance) / AnyFlow 4 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from anystep.models.students import student_folder_from_teacher  # noqa: E402
from anystep.sampling import generate_latents, load_model, nfe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(Path(__file__).resolve().parents[1] / "models" / "toy-teacher"))
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student-steps", default="1,2,4,8,16,32")
    ap.add_argument("--teacher-steps", default="4,8,16,50")
    args = ap.parse_args()

    teacher = load_model(args.teacher)
    with tempfile.TemporaryDirectory() as tmp:
        student = load_model(student_folder_from_teacher(args.teacher, Path(tmp) / "student"))
    prompts = ["a red three moving left", "a blue seven moving up", "a green one moving right", "a yellow eight moving down"]
    prompts = (prompts * ((args.clips + 3) // 4))[: args.clips]

    runs = [("anyflow", student, int(s)) for s in args.student_steps.split(",")]
    runs += [("teacher", teacher, int(s)) for s in args.teacher_steps.split(",")]
    times: dict[tuple[str, int], list[float]] = {(k, s): [] for k, _, s in runs}
    for k, m, s in runs:  # warm-up
        generate_latents(m, prompts[:1], 1)
    for _ in range(args.repeats):
        for k, m, s in runs:
            t0 = time.perf_counter()
            generate_latents(m, prompts, s, seed=0)
            times[(k, s)].append((time.perf_counter() - t0) / len(prompts))

    result = {"clips": args.clips, "threads": torch.get_num_threads(), "latency_s_per_clip": {}}
    print(f"{'model':>8} {'steps':>5} {'NFE':>4} {'s/clip (median)':>16}")
    for k, m, s in runs:
        med = statistics.median(times[(k, s)])
        result["latency_s_per_clip"][f"{k}@{s}"] = med
        print(f"{k:>8} {s:>5} {nfe(m, s):>4} {med:>16.4f}")
    t50 = result["latency_s_per_clip"].get("teacher@50")
    a4 = result["latency_s_per_clip"].get("anyflow@4")
    if t50 and a4:
        result["ratio_teacher50x2_over_anyflow4"] = t50 / a4
        print(f"teacher 50x2 / AnyFlow 4 steps: {t50 / a4:.1f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
