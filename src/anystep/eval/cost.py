"""Seconds per training iteration of each component (paper Table 5), timed side by side.

All variants of one architecture are built once and timed interleaved (round-robin, median of
``repeats``), so machine noise hits them alike and the ratios are meaningful on a shared CPU:

* flow matching: one flow-matching step of the flow-map student (r = t);
* Stage 1: one Algorithm-1 step (1 forward + backward, 3 batched no-grad forwards);
* flow-map / consistency backward simulation at s = 4 and s = 16: one Stage-2 iteration
  (generator step with rollout + DMD + co-trained Stage-1 loss, then the critic step).

Students are built from the teacher; the weights do not matter for cost.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from anystep.models.students import student_folder_from_teacher
from anystep.train.stage1 import Stage1Config, Stage1Method
from anystep.train.stage2 import Stage2Config, Stage2Method

STAGE2_VARIANTS = {
    "flowmap_s4": dict(rollout="flowmap", step_budgets=(4,)),
    "flowmap_s16": dict(rollout="flowmap", step_budgets=(16,)),
    "consistency_s4": dict(rollout="consistency", consistency_steps=4),
    "consistency_s16": dict(rollout="consistency", consistency_steps=16),
}
CAUSAL_PARTITION = (1, 3, 3, 3, 3)


class _Stage1Step:
    def __init__(self, teacher: str, student: Path, method: str, causal: bool, batch: int, out: Path):
        cfg = Stage1Config(teacher=teacher, init=str(student), method=method, batch_size=batch, out=str(out),
                           causal=causal, num_frames=13 if causal else 7,
                           chunk_partition=CAUSAL_PARTITION, warmup=1)
        self.m = Stage1Method(cfg)
        self.opt = torch.optim.AdamW([p for p in self.m.student.parameters() if p.requires_grad], lr=1e-7)
        self.step = 0

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.m.loss(self.step, 0)
        loss.backward()
        self.opt.step()
        self.step += 1


def _stage2_step(teacher: str, student: Path, variant: str, causal: bool, batch: int, out: Path):
    cfg = Stage2Config(student=str(student), teacher=teacher, out=str(out), batch_size=batch, causal=causal,
                       num_frames=13 if causal else 7, critic_lora_rank=32, critic_lora_alpha=32,
                       **STAGE2_VARIANTS[variant])
    return Stage2Method(cfg).train_step


def measure_costs(teacher: str, batch: int = 4, repeats: int = 3, archs=("bidirectional", "causal"),
                  progress=print) -> dict:
    """``{"sec_per_iter": {arch: {component: s}}, "ratios": {arch: {...}}, batch, repeats, threads}``."""
    result: dict = {"batch": batch, "repeats": repeats, "threads": torch.get_num_threads(), "sec_per_iter": {}, "ratios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in archs:
            causal = arch == "causal"
            student = student_folder_from_teacher(
                teacher, tmp / f"{arch}-student", causal=causal, chunk_partition=CAUSAL_PARTITION if causal else None
            )
            steps = {
                "flow_matching": _Stage1Step(teacher, student, "flow_matching", causal, batch, tmp / f"{arch}-fm"),
                "stage1": _Stage1Step(teacher, student, "flowmap", causal, batch, tmp / f"{arch}-s1"),
            }
            for v in STAGE2_VARIANTS:
                steps[v] = _stage2_step(teacher, student, v, causal, batch, tmp / f"{arch}-{v}")
            times = {k: [] for k in steps}
            for fn in steps.values():
                fn()  # warm-up
            for i in range(repeats):
                progress(f"[cost] {arch}: round {i + 1}/{repeats}")
                for k, fn in steps.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            result["sec_per_iter"][arch] = med
            result["ratios"][arch] = {
                "stage1_over_flow_matching": med["stage1"] / med["flow_matching"],
                "flowmap_s16_over_s4": med["flowmap_s16"] / med["flowmap_s4"],
                "consistency_s16_over_s4": med["consistency_s16"] / med["consistency_s4"],
                "flowmap_over_consistency_s4": med["flowmap_s4"] / med["consistency_s4"],
                "flowmap_over_consistency_s16": med["flowmap_s16"] / med["consistency_s16"],
            }
    return result
