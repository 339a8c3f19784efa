"""Stage 1 and Stage 2 at the real Wan2.1 shape: seconds per iteration, peak memory, and the
memory each GPU needs for the model states under FSDP2 (issue 6, item 6; paper Table 5).

    python benchmarks/wan_scale.py --estimate                       # model-state memory per GPU, no GPU needed
    python benchmarks/wan_scale.py --shape wan1.3b --batch 2        # on a GPU: 81 frames at 480x832 (21x60x104 latents)
    python benchmarks/wan_scale.py --tiny                           # the same code path on a tiny shape (CPU check)

Random weights (nothing is downloaded); latents and prompt embeddings are random tensors of the
real shapes, so the timings are the networks' and the method's, not the data pipeline's. One
process, one GPU, no sharding: the numbers compare with Table 5's per-GPU figures, which the paper
measured under FSDP with more GPUs (so its memory is lower than one unsharded GPU's).
The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from anystep.models.wan_layout import TINY_TRANSFORMER, WAN_TRANSFORMERS

# 81 frames at 480x832 through AutoencoderKLWan (4x temporal, 8x spatial): 21 x 60 x 104 latents.
REAL_LATENT = (21, 16, 60, 104)
TINY_LATENT = (3, 16, 8, 8)
TEXT_TOKENS = 512
LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def _student_and_teacher(shape: dict, device, dtype, lora_rank: int):
    from diffusers import WanTransformer3DModel

    from anystep.models.lora import add_student_lora
    from anystep.models.students import student_from_teacher

    with torch.device(device):
        teacher = WanTransformer3DModel(**shape).to(dtype)
    if str(device) == "meta":  # sizes only: the student's layout, nothing copied
        from diffusers import AnyFlowTransformer3DModel

        from anystep.models.students import anyflow_config_from_wan

        with torch.device("meta"):
            student = AnyFlowTransformer3DModel(**anyflow_config_from_wan(teacher.config))
    else:
        student = student_from_teacher(teacher).to(device=device, dtype=dtype)
    if lora_rank:
        add_student_lora(student, lora_rank, lora_rank, LORA_TARGETS)
    teacher.requires_grad_(False)
    return student, teacher


def count_parameters(shape: dict, lora_rank: int) -> dict:
    """Total and trainable parameter counts of the student (LoRA recipe), on the meta device."""
    student, teacher = _student_and_teacher(shape, "meta", torch.float32, lora_rank)
    total = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    base_teacher = sum(p.numel() for p in teacher.parameters())
    critic = 0
    if lora_rank:
        from anystep.models.lora import add_student_lora

        add_student_lora(teacher, lora_rank, lora_rank, LORA_TARGETS, train_embedders=False)
        critic = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    return {"student_total": total, "student_trainable": trainable, "teacher": base_teacher,
            "critic_trainable": critic}


def state_memory_gib(counts: dict, world: int) -> dict:
    """Model-state bytes per GPU under FSDP2 with fp32 master weights (sharded over ``world``):
    fp32 parameters (4 B), and for trainable ones fp32 gradients (4 B) + Adam moments (8 B) + EMA
    (4 B). Stage 2 adds the teacher (fp32, sharded) and the critic, a LoRA on it (its adapters:
    parameters, gradients, Adam, EMA: 20 B each). Activations come on top (measured by the timed run on a GPU)."""
    gib = 2**30
    s1 = (4 * counts["student_total"] + 16 * counts["student_trainable"]) / world / gib
    s2 = s1 + (4 * counts["teacher"] + 20 * counts["critic_trainable"]) / world / gib
    return {"stage1_states_gib": round(s1, 2), "stage2_states_gib": round(s2, 2)}


def activation_gib(shape: dict, latent, batch: int) -> dict:
    """A floor for the activations kept for backward with gradient checkpointing: each block's bf16
    input for every forward that carries gradient (Stage 1: one; Stage 2: the three flow-map jumps
    plus the co-trained Stage-1 loss), plus one block's recomputed working set (its FFN hidden
    state dominates; attention is flash / memory-efficient). Not a measurement."""
    f, _, h, w = latent
    pt, ph, pw = shape["patch_size"]
    tokens = (f // pt) * (h // ph) * (w // pw)
    dim = shape["num_attention_heads"] * shape["attention_head_dim"]
    per_forward = tokens * dim * 2 * shape["num_layers"] * batch
    block = tokens * (shape["ffn_dim"] + 4 * dim) * 2 * batch
    gib = 2**30
    return {"tokens": tokens, "stage1_activations_gib": round((per_forward + block) / gib, 1),
            "stage2_activations_gib": round((4 * per_forward + block) / gib, 1)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_iterations(shape, latent, batch, device, dtype, lora_rank, iters, warmup):
    from anystep.flow.matching import x0_from_velocity
    from anystep.flow.stage2 import dmd_gradient, dmd_loss
    from anystep.models.velocity import flow_map_velocity, teacher_velocity
    from anystep.rollout import flowmap_backward_simulation
    from anystep.train.stage1 import Stage1Config, flowmap_loss
    from anystep.flow.stage1 import sample_types

    student, teacher = _student_and_teacher(shape, device, dtype, lora_rank)
    student.enable_gradient_checkpointing()
    cfg = Stage1Config()
    x = torch.randn(batch, *latent, device=device)
    cond = torch.randn(batch, TEXT_TOKENS, shape["text_dim"], device=device)
    null = torch.zeros_like(cond)
    net = lambda z, t, r, emb, clean: flow_map_velocity(student, z, t, r, emb)  # noqa: E731
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    gen = torch.Generator().manual_seed(0)

    def stage1_step():
        loss, _ = flowmap_loss(net, x, cond, null, cfg, gen, sample_types(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def stage2_step():
        # Generator: 3 flow-map jumps with gradient (s = 4), DMD with real (CFG) and fake scores,
        # plus the co-trained Stage-1 loss; the critic step's no-grad rollout and flow-matching pass
        # cost about one more rollout and one teacher forward/backward (counted below).
        noise = torch.randn_like(x)
        x_hat = flowmap_backward_simulation(student, noise, cond, 4, 1).sample
        sigma = torch.rand(batch, device=device)
        z = (1 - sigma.view(-1, 1, 1, 1, 1)) * x_hat.detach() + sigma.view(-1, 1, 1, 1, 1) * torch.randn_like(x)
        with torch.no_grad():
            v = teacher_velocity(teacher, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([cond, null])).float()
            real = x0_from_velocity(z, v[:batch] + 3.0 * (v[:batch] - v[batch:]), sigma)
            fake = x0_from_velocity(z, teacher_velocity(teacher, z, sigma, cond).float(), sigma)
        loss = dmd_loss(x_hat, dmd_gradient(x_hat.detach(), real, fake))
        s1, _ = flowmap_loss(net, x, cond, null, cfg, gen, sample_types(batch))
        (loss + s1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            x_c = flowmap_backward_simulation(student, torch.randn_like(x), cond, 4, 1).sample
        teacher.requires_grad_(True)  # stands in for the critic's trainable adapters
        teacher_velocity(teacher, x_c, sigma, cond).float().pow(2).mean().backward()
        teacher.requires_grad_(False)
        teacher.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("stage1", stage1_step), ("stage2", stage2_step)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        out[f"{name}_s_per_iter"] = round((time.perf_counter() - t0) / iters, 3)
        if device.type == "cuda":
            out[f"{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(WAN_TRANSFORMERS), default="wan1.3b")
    ap.add_argument("--tiny", action="store_true", help="tiny transformer and latents: checks the code path on CPU")
    ap.add_argument("--estimate", action="store_true", help="only the model-state memory per GPU (meta device)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)

    result = {"shape": "tiny" if args.tiny else args.shape, "lora_rank": args.lora_rank}
    if args.estimate:
        for name, shape in WAN_TRANSFORMERS.items():
            counts = count_parameters(shape, args.lora_rank)
            act = activation_gib(shape, REAL_LATENT, args.batch)
            result[name] = {**counts, **act, **{f"gpus_{w}": state_memory_gib(counts, w) for w in (1, 8, 32)}}
            print(f"{name}: activations at 81x480x832, batch {args.batch} per GPU ({act['tokens']} tokens a clip), "
                  f"floor: Stage 1 {act['stage1_activations_gib']} GiB, Stage 2 {act['stage2_activations_gib']} GiB")
            print(f"{name}: student {counts['student_total'] / 1e9:.2f}B parameters, "
                  f"{counts['student_trainable'] / 1e6:.0f}M trainable (LoRA rank {args.lora_rank}); "
                  + "; ".join(f"{w} GPUs: Stage 1 {state_memory_gib(counts, w)['stage1_states_gib']} GiB, "
                              f"Stage 2 {state_memory_gib(counts, w)['stage2_states_gib']} GiB" for w in (1, 8, 32)))
        print(json.dumps(result))
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("wan_scale.py: no GPU here; use --tiny (code path) or --estimate (memory on paper)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY_TRANSFORMER if args.tiny else WAN_TRANSFORMERS[args.shape]
    latent = TINY_LATENT if args.tiny else REAL_LATENT
    rank = min(args.lora_rank, 4) if args.tiny else args.lora_rank
    result.update(lora_rank=rank, device=torch.cuda.get_device_name() if cuda else "cpu", batch=args.batch,
                  latent=list(latent))
    result.update(time_iterations(shape, latent, args.batch, device, dtype, rank, args.iters, args.warmup))
    for k, v in result.items():
        print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
