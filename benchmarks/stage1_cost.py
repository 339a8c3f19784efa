"""Cost of one Stage-1 flow-map step over one flow-matching step, measured side by side.

    python benchmarks/stage1_cost.py [--teacher models/toy-teacher] [--batch 16] [--repeats 5]

Both methods run the same student, batch and loop (forward + backward + optimiser step),
interleaved in one process so machine noise hits both alike. Peak memory is the rise of the
process's peak RSS over the loaded-model baseline during three steps (optimiser state included,
the same for both), measured in a fresh subprocess per method (CPU has no allocator statistics).
The paper reports 1.73x (bidirectional) / 1.79x (causal); the Stage-1 step batches its three
no-grad forwards into one call and skips the finite-difference points of r = t samples.
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402


def _student(teacher: str) -> str:
    """Both methods train the same AnyFlowTransformer3DModel (flow matching at r = t), so the ratio
    measures the method, not Wan's per-sample vs AnyFlow's per-token time modulation."""
    from anystep.models.students import student_folder_from_teacher

    dest = Path("/tmp/anystep-bench-student")
    if not (dest / "model_index.json").exists():
        student_folder_from_teacher(teacher, dest)
    return str(dest)


def _method(teacher: str, method: str, batch: int):
    from anystep.train.stage1 import Stage1Config, Stage1Method

    cfg = Stage1Config(teacher=teacher, init=_student(teacher), method=method, batch_size=batch,
                       out="/tmp/anystep-bench", warmup=1)
    m = Stage1Method(cfg)
    opt = torch.optim.AdamW([p for p in m.student.parameters() if p.requires_grad], lr=1e-6)
    return m, opt


def _one_step(m, opt, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss, _ = m.loss(step, 0)
    loss.backward()
    opt.step()


def _peak_child(teacher: str, method: str, batch: int) -> None:
    """Memory of one step: bytes autograd keeps for backward (unique storages, the activation
    memory that differs between methods) and the rise of peak RSS over the loaded baseline."""
    m, opt = _method(teacher, method, batch)
    m.data.embed(["", "a red one moving up"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = m.loss(0, 0)
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"saved_for_backward_mb": sum(seen.values()) / 2**20, "peak_rise_mb": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default=str(ROOT / "models" / "toy-teacher"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        _peak_child(args.teacher, args.peak_child, args.batch)
        return

    methods = {k: _method(args.teacher, k, args.batch) for k in ("flow_matching", "flowmap")}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for k, (m, opt) in methods.items():
        _one_step(m, opt, 0)  # warm-up
    for rep in range(args.repeats):
        for k, (m, opt) in methods.items():
            t0 = time.perf_counter()
            _one_step(m, opt, rep + 1)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    peaks = {}
    for k in methods:
        out = subprocess.run(
            [sys.executable, __file__, "--teacher", args.teacher, "--batch", str(args.batch), "--peak-child", k],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        peaks[k] = json.loads(out)

    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for k in methods:
        print(f"{k:>14}: {med[k]:.3f} s/step   saved for backward {peaks[k]['saved_for_backward_mb']:.1f} MB"
              f"   peak RSS rise {peaks[k]['peak_rise_mb']:.0f} MB")
    ratio = med["flowmap"] / med["flow_matching"]
    mem_ratio = peaks["flowmap"]["saved_for_backward_mb"] / max(peaks["flow_matching"]["saved_for_backward_mb"], 1e-6)
    print(f"Stage-1 / flow-matching step time: {ratio:.2f}x (paper: 1.73x bidirectional)")
    print(json.dumps({
        "arch": "bidirectional",
        "batch": args.batch,
        "sec_per_step": med,
        "saved_for_backward_mb": {k: v["saved_for_backward_mb"] for k, v in peaks.items()},
        "peak_rss_rise_mb": {k: v["peak_rise_mb"] for k, v in peaks.items()},
        "time_ratio_stage1_over_flow_matching": ratio,
        "memory_ratio_stage1_over_flow_matching": mem_ratio,
    }))


if __name__ == "__main__":
    main()
