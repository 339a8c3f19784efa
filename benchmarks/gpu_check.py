"""The CUDA path end to end, in one command: correctness checks, then the paper's Table 5 analogue.

    python benchmarks/gpu_check.py                      # on a GPU: Wan2.1-1.3B shapes, bf16 (~6 min on an H200)
    python benchmarks/gpu_check.py --skip cost,causal_cost   # the PASS/FAIL checks alone (~1.5 min)
    python benchmarks/gpu_check.py --device cpu         # the same code at toy shapes (CI runs this)
    python benchmarks/gpu_check.py --json out.json      # also write every result as JSON (rewritten after each line)

Nothing is downloaded: the Wan teacher is a random-weight ``WanTransformer3DModel`` of the published
shape, the students are built from it by the toolkit's own converter, and the command-line checks
train the shipped toy teacher (``models/toy-teacher``) on whatever device the machine has.

Part 1 prints one line per check, ``PASS`` or ``FAIL`` with the reason; a failing check does not stop
the others. Part 2 times one generator + critic iteration of each training recipe (Table 5's "upper
bound": a consistency rollout exits at its last step) at 81 frames of 480x832 (21 x 60 x 104
latents) with gradient checkpointing, plus the sampling latency of the teacher (50 steps x 2 for
CFG; 10 of its 50 steps timed) against a 4-NFE AnyFlow student, and prints each as a ratio beside
the paper's; then the causal student's forward-training rows at the reference FAR layout. One process,
one GPU, no sharding: absolute seconds are this GPU's, the ratios are what compares.
Exit code: 0 when every check passed, 1 when one failed, 2 when the machine cannot run the check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from anystep.flow.schedule import sampling_grid
from anystep.flow.stage1 import sample_types
from anystep.flow.matching import x0_from_velocity
from anystep.flow.stage2 import dmd_gradient, dmd_loss
from anystep.models.far_attention import (
    far_attention_kind,
    use_compiled_flex_far_attention,
    use_dense_far_attention,
    use_flex_far_attention,
)
from anystep.models.far_train import far_flow_map_velocity
from anystep.models.lora import add_student_lora
from anystep.models.students import student_from_teacher
from anystep.models.velocity import flow_map_velocity, teacher_velocity
from anystep.models.wan_layout import TINY_TRANSFORMER, WAN_TRANSFORMERS
from anystep.rollout.consistency import consistency_backward_simulation
from anystep.flow.solvers import euler, flow_map_euler
from anystep.models.causal_state import prepare_far_for_rollout
from anystep.rollout.flowmap import causal_flowmap_rollout, flowmap_backward_simulation
from anystep.flow.stage2 import flow_map_segments
from anystep.train.stage1 import Stage1Config, flow_matching_loss, flowmap_loss

ROOT = Path(__file__).resolve().parents[1]
TOY_TEACHER = ROOT / "models" / "toy-teacher"
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]

# Correctness runs at the real width on a shorter, smaller clip (the cost table uses the full one).
# Sides divisible by the compressed context patch (4) so the FAR layout has compressed chunks.
SHAPES = {
    "cuda": dict(transformer=WAN_TRANSFORMERS["wan1.3b"], check_latent=(9, 16, 32, 56), far_part=(1, 2, 2, 2, 2),
                 cost_latent=(21, 16, 60, 104), cost_far_part=(1, 3, 3, 3, 3, 3, 3, 2), text_tokens=512,
                 lora_rank=256, tol=3e-2),
    "cpu": dict(transformer=TINY_TRANSFORMER, check_latent=(5, 16, 8, 8), far_part=(1, 1, 1, 1, 1),
                cost_latent=(5, 16, 8, 8), cost_far_part=(1, 1, 1, 1, 1), text_tokens=16, lora_rank=4, tol=1e-5),
}
# Paper Table 5, bidirectional column (s/iter, Wan2.1-1.3B, batch 16 on 8 x H100).
PAPER_TABLE5 = {"flow_matching": 9.7, "guidance_fused": 12.3, "stage1_full": 16.8, "consistency_bs_4": 41.8,
                "flowmap_bs_4": 51.2, "consistency_bs_16": 96.6, "flowmap_bs_16": 51.2}
# The causal column (FAR); the eager-flex row has no paper counterpart.
PAPER_TABLE5_CAUSAL = {"causal_flow_matching": 5.8, "causal_stage1_full": 10.4, "causal_stage1_full_eager_flex": None}
# A floor on the free GPU memory the Wan-1.3B cost rows need at batch 2 (weights of student, teacher
# and critic in bf16, LoRA optimiser states, checkpointed activations of three jumps + Stage 1).
NEED_GIB = 60


class Report:
    def __init__(self, json_path):
        self.json_path = Path(json_path) if json_path else None
        self.data = {"checks": {}, "cost": {}, "info": {}}
        self.failed = 0

    def check(self, name, ok, detail):
        self.failed += not ok
        self.data["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        self.flush()

    def flush(self):
        if self.json_path:
            tmp = self.json_path.with_name(self.json_path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.json_path)


def run_check(report, name, fn):
    """One check: ``fn()`` returns (ok, detail); an exception is a FAIL with its last line."""
    t0 = time.perf_counter()
    try:
        ok, detail = fn()
    except Exception as e:  # a broken check must not hide the others
        last = (str(e).strip().splitlines() or [""])[-1][:300]
        ok, detail = False, f"{type(e).__name__}: {last}"
        traceback.print_exc(file=sys.stderr)
    report.check(name, ok, f"{detail} ({time.perf_counter() - t0:.1f} s)")


def rel_err(a, b):
    """max |a - b| / max |b|: bf16 noise is ~1e-2 of the scale, a wrong weight or mask is O(1)."""
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_teacher(shape, device, dtype, seed=0):
    """A random Wan teacher whose every tensor is moved off its constructor value (zero or
    constant inits would let a wrongly copied weight go unnoticed)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**shape).eval()
        if dtype != torch.float32:
            model = model.to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 0.02))
    return model.requires_grad_(False)


def finite_grads(params):
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False, "no parameter received a gradient"
    bad = sum(not torch.isfinite(g).all().item() for g in grads)
    nonzero = sum(bool(g.abs().max() > 0) for g in grads)
    return bad == 0 and nonzero > 0, f"{len(grads)} grads, {bad} non-finite, {nonzero} non-zero"


# -- part 1a: the networks and rollouts at the real width -----------------------------------------


def network_checks(report, device, dtype, s):
    shape, tol = s["transformer"], s["tol"]
    f, c, h, w = s["check_latent"]
    teacher = build_teacher(shape, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(1)
    z = torch.randn(1, f, c, h, w, generator=gen).to(device)
    emb = torch.randn(1, s["text_tokens"], shape["text_dim"], generator=gen).to(device)
    sigma = torch.tensor([0.7], device=device)
    with torch.no_grad():
        v_ref = teacher_velocity(teacher, z, sigma, emb)

    def parity():
        student = student_from_teacher(teacher).eval()
        with torch.no_grad():
            e = rel_err(flow_map_velocity(student, z, sigma, sigma, emb), v_ref)
        return e <= tol, f"AnyFlow u(z, t, t) vs Wan v(z, t): rel err {e:.2e} (tol {tol:.0e})"

    part = s["far_part"]
    far = student_from_teacher(teacher, causal=True, chunk_partition=part).eval()

    def far_parity():
        # One chunk holding the whole clip attends bidirectionally: the causal student is the teacher there.
        use_flex_far_attention(far)
        with torch.no_grad():
            e = rel_err(far_flow_map_velocity(far, z, sigma, sigma, emb, (f,)), v_ref)
        return e <= tol, f"FAR (one chunk, {far_attention_kind(far)} attention) vs Wan: rel err {e:.2e}"

    run_check(report, "parity_bidirectional_r_eq_t", parity)
    run_check(report, "parity_far_flex_r_eq_t", far_parity)
    clean = torch.randn(1, f, c, h, w, generator=gen).to(device)
    t_frames = torch.rand(1, f, generator=gen).to(device) * 0.9 + 0.05

    def flex_vs_dense():
        with torch.no_grad():
            use_flex_far_attention(far)
            u_flex = far_flow_map_velocity(far, z, t_frames, t_frames * 0.5, emb, part, clean)
            use_compiled_flex_far_attention(far)
            u_comp = far_flow_map_velocity(far, z, t_frames, t_frames * 0.5, emb, part, clean)
            use_dense_far_attention(far)
            u_dense = far_flow_map_velocity(far, z, t_frames, t_frames * 0.5, emb, part, clean)
        use_flex_far_attention(far)
        e, e_comp = rel_err(u_flex, u_dense), rel_err(u_comp, u_dense)
        return max(e, e_comp) <= tol, (f"teacher-forcing forward {list(part)}: rel err to the dense mask: stock flex "
                                       f"{e:.2e}, {'compiled' if device.type == 'cuda' else 'eager'} flex kernel {e_comp:.2e}")

    def kv_cache():
        prepare_far_for_rollout(far)
        segs = flow_map_segments(8, 3).segments
        with torch.no_grad():
            a = causal_flowmap_rollout(far, z, emb, segs, part, use_cache=True).sample
            b = causal_flowmap_rollout(far, z, emb, segs, part, use_cache=False).sample
        e = rel_err(a, b)
        return e <= tol, f"causal rollout {list(part)}, 3 jumps a chunk: cached vs uncached rel err {e:.2e}"

    run_check(report, "far_flex_equals_dense_mask", flex_vs_dense)
    run_check(report, "far_kv_cache_equals_uncached", kv_cache)

    cfg = Stage1Config()
    x = torch.randn(2, f, c, h, w, generator=gen).to(device)
    cond = torch.randn(2, s["text_tokens"], shape["text_dim"], generator=gen).to(device)
    null = torch.zeros_like(cond)

    def train_step(model, loss_fn, what):
        model.train()
        if hasattr(model, "enable_gradient_checkpointing") and device.type == "cuda":
            model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        loss = loss_fn()
        loss.backward()
        ok_g, detail = finite_grads(params)
        for p in params:
            p.grad = None
        model.eval()
        ok = math.isfinite(loss.item()) and ok_g
        return ok, f"{what}: loss {loss.item():.4g}, {detail}"

    def stage1_bidirectional():
        st = student_from_teacher(teacher).requires_grad_(True)
        net = lambda zz, t, r, e, cl: flow_map_velocity(st, zz, t, r, e)  # noqa: E731
        return train_step(st, lambda: flowmap_loss(net, x, cond, null, cfg, torch.Generator().manual_seed(0),
                                                    sample_types(2))[0], "bidirectional Stage 1 (Eq. 4-7)")

    def stage1_causal():
        far.requires_grad_(True)
        prepare_far_for_rollout(far)
        net = lambda zz, t, r, e, cl: far_flow_map_velocity(far, zz, t, r, e, part, cl)  # noqa: E731
        out = train_step(far, lambda: flowmap_loss(net, x, cond, null, cfg, torch.Generator().manual_seed(0),
                                                    sample_types(2))[0], f"causal Stage 1 ({far_attention_kind(far)})")
        far.requires_grad_(False)
        return out

    def stage2(rollout):
        st = student_from_teacher(teacher).requires_grad_(True)

        def loss():
            noise = torch.randn_like(x)
            if rollout == "flowmap":
                x_hat = flowmap_backward_simulation(st, noise, cond, 4, 1).sample
            else:
                x_hat = consistency_backward_simulation(st, noise, cond, 4, 3, generator=torch.Generator().manual_seed(0)).sample
            return dmd_step_loss(teacher, teacher, x_hat, cond, null)

        return train_step(st, loss, f"Stage 2 {rollout} backward simulation + DMD (s=4)")

    run_check(report, "stage1_step_bidirectional", stage1_bidirectional)
    run_check(report, "stage1_step_causal", stage1_causal)
    run_check(report, "stage2_step_flowmap_bs", lambda: stage2("flowmap"))
    run_check(report, "stage2_step_consistency_bs", lambda: stage2("consistency"))
    del teacher, far
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dmd_step_loss(teacher, critic, x_hat, cond, null, guidance: float = 3.0):
    """Eq. 5 on a rollout: re-noise, real score = teacher with CFG ``cond + g (cond - uncond)``,
    fake score = critic, DMD loss on ``x_hat``."""
    b = x_hat.shape[0]
    sigma = torch.rand(b, device=x_hat.device)
    zt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x_hat.detach() + sigma.view(-1, 1, 1, 1, 1) * torch.randn_like(x_hat)
    with torch.no_grad():
        v = teacher_velocity(teacher, torch.cat([zt, zt]), torch.cat([sigma, sigma]), torch.cat([cond, null])).float()
        real = x0_from_velocity(zt, v[:b] + guidance * (v[:b] - v[b:]), sigma)
        fake = x0_from_velocity(zt, teacher_velocity(critic, zt, sigma, cond).float(), sigma)
    return dmd_loss(x_hat, dmd_gradient(x_hat.detach(), real, fake))


# -- part 1b: the command line on this device (the shipped toy teacher) --------------------------


@contextmanager
def _quiet_cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _losses(run):
    return [json.loads(line)["loss"] for line in open(Path(run) / "metrics.jsonl")]


def cli_checks(report, device, work: Path):
    from anystep.cli import main as anystep

    teacher = str(TOY_TEACHER)
    common = ["batch_size=4", "log_every=1", "threads=0", "num_frames=7"]

    def s1(out, steps, ckpt):
        return anystep(["train", "stage1", f"teacher={teacher}", f"out={out}", f"steps={steps}", f"ckpt_every={ckpt}", *common])

    def stage1_and_resume():
        rc = [s1(work / "a", 3, 2), s1(work / "b", 2, 2), s1(work / "b", 3, 2)]
        if any(rc):
            return False, f"exit codes {rc}"
        a, b = _losses(work / "a"), _losses(work / "b")
        diff = abs(a[-1] - b[-1])
        tol = 1e-6 if device.type == "cpu" else 1e-3 * max(abs(a[-1]), 1e-6)
        ok = all(map(math.isfinite, a + b)) and diff <= tol
        return ok, f"losses {[round(v, 4) for v in a]}; step 3 straight {a[-1]:.6f} vs resumed from DCP {b[-1]:.6f}"

    def stage2(rollout):
        out = work / f"s2_{rollout}"
        rc = anystep(["train", "stage2", f"teacher={teacher}", f"student={work / 'a' / 'model'}", f"out={out}",
                      f"rollout={rollout}", "steps=1", "batch_size=2", "critic_lora_rank=8", "critic_lora_alpha=8", "log_every=1", "threads=0", "num_frames=7"])
        if rc:
            return False, f"exit code {rc}"
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        vals = {k: v for k, v in rows[-1].items() if isinstance(v, float)}
        return all(map(math.isfinite, vals.values())), "metrics " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(vals.items()))

    def synth():
        rc = anystep(["synth", "--teacher", teacher, "--prompt", "a red three moving left", "--out", str(work / "shards"),
                      "--steps", "4", "--shard-size", "1"])
        shards = sorted(p.name for p in (work / "shards").iterdir() if not p.name.startswith("."))
        return rc == 0 and shards, f"exit {rc}, wrote {shards}"

    def generate():
        import importlib.util

        model = work / "s2_flowmap" / "model"
        if importlib.util.find_spec("imageio_ffmpeg") is None:
            from anystep.io import frame_grid, write_png
            from anystep.sampling import generate as gen_clips, load_model

            video = gen_clips(load_model(model), ["a blue zero moving right"], 4, seed=0)
            write_png(frame_grid(video), work / "clip.png")
            return bool(torch.isfinite(video).all()), f"4-step clip {tuple(video.shape)} as PNG (no imageio-ffmpeg here: no mp4)"
        rc = anystep(["generate", "--model", str(model), "--prompt", "a blue zero moving right", "--steps", "4",
                      "--out", str(work / "clip.mp4")])
        size = (work / "clip.mp4").stat().st_size if (work / "clip.mp4").exists() else 0
        return rc == 0 and size > 0, f"exit {rc}, clip.mp4 {size} bytes"

    with _quiet_cwd(work):
        run_check(report, "cli_stage1_and_dcp_resume", stage1_and_resume)
        run_check(report, "cli_stage2_flowmap", lambda: stage2("flowmap"))
        run_check(report, "cli_stage2_consistency", lambda: stage2("consistency"))
        run_check(report, "cli_synth_one_shard", synth)
        run_check(report, "cli_generate_4_steps", generate)


# -- part 2: cost ----------------------------------------------------------------------------------


def cost_rows(report, device, dtype, s, batch):
    """s/iter and peak memory of each recipe (one warm-up, then one timed iteration)."""
    shape = s["transformer"]
    latent = s["cost_latent"]
    teacher = build_teacher(shape, device, dtype)
    critic = build_teacher(shape, device, dtype)
    add_student_lora(critic, s["lora_rank"], s["lora_rank"], LORA_TARGETS, train_embedders=False)
    student = student_from_teacher(teacher)
    add_student_lora(student, s["lora_rank"], s["lora_rank"], LORA_TARGETS)
    for m in (student, critic):
        m.enable_gradient_checkpointing()
        m.train()
    s_params = [p for p in student.parameters() if p.requires_grad]
    c_params = [p for p in critic.parameters() if p.requires_grad]
    s_opt = torch.optim.AdamW(s_params, lr=1e-7)
    c_opt = torch.optim.AdamW(c_params, lr=1e-7)
    gen, x, cond, null, cfg = _cost_inputs(s, batch, device)
    net = lambda z, t, r, e, cl: flow_map_velocity(student, z, t, r, e)  # noqa: E731

    def step(opt, params, loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def flow_matching():
        step(s_opt, s_params, flow_matching_loss(net, x, cond, null, cfg, gen)[0])

    def guidance_fused():
        # Eq. 6 without Eq. 4's target: the plain flow-matching target through the fused velocity.
        from anystep.flow.stage1 import guidance_fused_velocity

        t = torch.rand(batch, device=device)
        e = torch.randn_like(x)
        z = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * e
        u_c = net(z, t, t, cond, x).float()
        with torch.no_grad():
            u_n = net(z, t, t, null, x).float()
        step(s_opt, s_params, (guidance_fused_velocity(u_c, u_n, cfg.guidance) - (e - x)).pow(2).mean())

    def stage1_full():
        step(s_opt, s_params, flowmap_loss(net, x, cond, null, cfg, gen, sample_types(batch))[0])

    def distill(rollout, steps):
        def it():
            noise = torch.randn_like(x)
            if rollout == "flowmap":
                x_hat = flowmap_backward_simulation(student, noise, cond, steps, steps // 2).sample
            else:  # the upper bound: exit at the last step
                x_hat = consistency_backward_simulation(student, noise, cond, steps, steps - 1, generator=gen).sample
            gen_loss = dmd_step_loss(teacher, critic, x_hat, cond, null)
            if rollout == "flowmap":  # the co-trained Stage-1 loss of Alg. 2
                gen_loss = gen_loss + flowmap_loss(net, x, cond, null, cfg, gen, sample_types(batch))[0]
            step(s_opt, s_params, gen_loss)
            # Critic: a no-grad rollout of the generator, then flow matching on it.
            with torch.no_grad():
                if rollout == "flowmap":
                    xc = flowmap_backward_simulation(student, torch.randn_like(x), cond, steps, steps // 2).sample
                else:
                    xc = consistency_backward_simulation(student, torch.randn_like(x), cond, steps, steps - 1, generator=gen).sample
            t = torch.rand(batch, device=device)
            e = torch.randn_like(xc)
            z = (1 - t.view(-1, 1, 1, 1, 1)) * xc + t.view(-1, 1, 1, 1, 1) * e
            step(c_opt, c_params, (teacher_velocity(critic, z, t, cond).float() - (e - xc)).pow(2).mean())

        return it

    rows = [("flow_matching", flow_matching), ("guidance_fused", guidance_fused), ("stage1_full", stage1_full),
            ("consistency_bs_4", distill("consistency", 4)), ("flowmap_bs_4", distill("flowmap", 4)),
            ("consistency_bs_16", distill("consistency", 16)), ("flowmap_bs_16", distill("flowmap", 16))]
    report.data["info"].update(cost_batch=batch, cost_latent=list(latent), lora_rank=s["lora_rank"])
    flow_matching()  # warm-up: kernels, allocator, cuDNN/cuBLAS plans
    for name, fn in rows:
        _cost_row(report, name, fn, device)

    del critic, s_opt, c_opt
    student.disable_gradient_checkpointing()
    student.eval()
    teacher.eval()
    with torch.no_grad():
        noise = torch.randn(1, *latent, device=device)
        c1, n1 = cond[:1], null[:1]
        grid50 = [float(v) for v in sampling_grid(50)]
        grid4 = [float(v) for v in sampling_grid(4)]
        both = torch.cat([c1, n1])
        teacher_v = lambda z, t, r: teacher_velocity(teacher, z, torch.tensor([t] * z.shape[0], device=device), both)  # noqa: E731
        student_u = lambda z, t, r: flow_map_velocity(student, z, t, r, c1)  # noqa: E731

        def flow_map_4():
            return flow_map_euler(student_u, noise, grid4)

        # Every Euler step of the teacher costs the same two network calls, so 10 of the 50 steps
        # are timed and scaled by 5 (the first full run on an H200 timed all 50: 69.5 s).
        row = timed(lambda: euler(teacher_v, noise, grid50[:11], 4.0), device, warm=False)
        report.data["cost"]["sample_teacher_50x2"] = {**row, "s": round(row["s"] * 5, 3), "timed_steps": "10 of 50, x5"}
        report.data["cost"]["sample_anyflow_4"] = timed(flow_map_4, device, warm=False)
        for name in ("sample_teacher_50x2", "sample_anyflow_4"):
            print(f"cost  {name}: {report.data['cost'][name]}", flush=True)
        report.flush()


def _cost_inputs(s, batch, device):
    """Random latents and prompt embeddings of the cost shape, and the reference Stage-1 settings."""
    x = torch.randn(batch, *s["cost_latent"], device=device)
    cond = torch.randn(batch, s["text_tokens"], s["transformer"]["text_dim"], device=device)
    return torch.Generator().manual_seed(0), x, cond, torch.zeros_like(cond), Stage1Config()


def causal_cost_rows(report, device, dtype, s, batch):
    """Forward training of the causal student at the reference FAR layout (all chunks, clean copy,
    compressed context), flex compiled; the last row repeats Stage 1 with eager flex, the
    unfused path diffusers takes by itself, to show what compiling saves."""
    shape, latent = s["transformer"], s["cost_latent"]
    part = s["cost_far_part"]
    teacher = build_teacher(shape, device, dtype)
    far = student_from_teacher(teacher, causal=True, chunk_partition=part)
    del teacher
    add_student_lora(far, s["lora_rank"], s["lora_rank"], LORA_TARGETS)
    far.enable_gradient_checkpointing()
    far.train()
    prepare_far_for_rollout(far)
    params = [p for p in far.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-7)
    gen, x, cond, null, cfg = _cost_inputs(s, batch, device)
    net = lambda z, t, r, e, cl: far_flow_map_velocity(far, z, t, r, e, part, cl)  # noqa: E731

    def step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = [("causal_flow_matching", lambda: step(flow_matching_loss(net, x, cond, null, cfg, gen)[0])),
            ("causal_stage1_full", lambda: step(flowmap_loss(net, x, cond, null, cfg, gen, sample_types(batch))[0]))]
    report.data["info"].update(causal_part=list(part), causal_attention=far_attention_kind(far))
    rows[0][1]()  # warm-up, and the flex compilation for this layout
    for name, fn in rows:
        _cost_row(report, name, fn, device)
    os.environ["ANYSTEP_FLEX_COMPILE"] = "0"
    try:
        _cost_row(report, "causal_stage1_full_eager_flex", rows[1][1], device)
    finally:
        os.environ.pop("ANYSTEP_FLEX_COMPILE")
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _cost_row(report, name, fn, device):
    try:
        report.data["cost"][name] = timed(fn, device)
    except Exception as e:  # an out-of-memory row is a result, not a crash
        report.data["cost"][name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    print(f"cost  {name}: {report.data['cost'][name]}", flush=True)
    report.flush()


def precision(device) -> str:
    return "fp32 weights, bf16 autocast" if device.type == "cuda" else "fp32"


def timed(fn, device, warm=True):
    if warm and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    out = {"s": round(time.perf_counter() - t0, 3)}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def print_cost_table(report):
    cost = report.data["cost"]
    base = cost.get("flow_matching", {}).get("s")
    print("\nrecipe               s/iter   peak GiB   x flow matching   paper x (s/iter)")
    for name, paper in PAPER_TABLE5.items():
        row = cost.get(name, {})
        if "s" not in row:
            print(f"{name:<20} {row.get('error', 'not measured')}")
            continue
        ratio = f"{row['s'] / base:.2f}" if base else "-"
        print(f"{name:<20} {row['s']:>6.2f}   {row.get('peak_gib', '-')!s:>8}   {ratio:>15}   "
              f"{paper / PAPER_TABLE5['flow_matching']:.2f} ({paper})")
    causal_base = cost.get("causal_flow_matching", {}).get("s")
    for name, paper in PAPER_TABLE5_CAUSAL.items():
        row = cost.get(name)
        if row is None:
            continue
        if "s" not in row:
            print(f"{name:<20} {row.get('error', 'not measured')}")
            continue
        ratio = f"{row['s'] / causal_base:.2f}" if causal_base else "-"
        paper_x = f"{paper / PAPER_TABLE5_CAUSAL['causal_flow_matching']:.2f} ({paper})" if paper else "-"
        print(f"{name:<20} {row['s']:>6.2f}   {row.get('peak_gib', '-')!s:>8}   {ratio:>15}   {paper_x}")
    t, a = cost.get("sample_teacher_50x2", {}).get("s"), cost.get("sample_anyflow_4", {}).get("s")
    if t and a:
        print(f"sampling one clip: teacher 50x2 NFE {t:.2f} s, AnyFlow 4 NFE {a:.2f} s: {t / a:.1f}x faster")
    report.data["cost_ratios"] = {k: round(v["s"] / (causal_base if k.startswith("causal") else base), 3)
                                  for k, v in cost.items() if "s" in v and (causal_base if k.startswith("causal") else base)}
    report.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--batch", type=int, default=2, help="per-GPU batch of the cost rows (paper: 16 on 8 GPUs = 2)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: network,cli,cost,causal_cost")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: error: --device cuda but torch sees no GPU; run with --device cpu", file=sys.stderr)
            return 2
        free = torch.cuda.mem_get_info()[0] / 2**30
        if "cost" not in skip and free < NEED_GIB:
            print(f"gpu_check: error: {free:.0f} GiB free on {torch.cuda.get_device_name()}, the Wan-1.3B cost rows "
                  f"need about {NEED_GIB}; free the GPU or pass --skip cost", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    # The single-GPU trainers' precision: fp32 weights, bf16 autocast on CUDA (FSDP's policy does the
    # same cast per block). A plain .to(bf16) would also round the embedders and norms diffusers keeps in fp32.
    dtype = torch.float32
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()  # noqa: E731
    s = SHAPES[device.type]
    report = Report(args.json)
    report.data["info"].update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               torch=torch.__version__, precision=precision(device))
    print(f"gpu_check on {report.data['info']['device']} (torch {torch.__version__}, {precision(device)})", flush=True)
    t0 = time.perf_counter()
    if "network" not in skip:
        with amp():
            network_checks(report, device, dtype, s)
    if "cli" not in skip:
        with tempfile.TemporaryDirectory(prefix="anystep-gpu-check-") as work:
            cli_checks(report, device, Path(work))
    if "cost" not in skip:
        with amp():
            cost_rows(report, device, dtype, s, args.batch)
    if "causal_cost" not in skip and device.type == "cpu":
        causal_cost_rows(report, device, dtype, s, args.batch)  # the dense fallback: flex has no CPU backward
    elif "causal_cost" not in skip:
        with amp():
            causal_cost_rows(report, device, dtype, s, args.batch)
    if report.data["cost"]:
        print_cost_table(report)
    report.data["info"]["wall_s"] = round(time.perf_counter() - t0, 1)
    report.flush()
    n = len(report.data["checks"])
    print(f"\n{n - report.failed} passed, {report.failed} failed ({report.data['info']['wall_s']} s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
