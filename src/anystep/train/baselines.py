"""Baselines of paper Table 2 that need their own forward stage: consistency ODE-init.

The Table 2 rows and how ``anystep`` builds each (docs/design.md section 3, "the consistency
baselines ... sharing the same loop so the comparison is fair"):

* *Consistency ODE-init + consistency backward simulation* (Self-Forcing / rCM style):
  :func:`train_consistency_init` here, then ``train_stage2(Stage2Config(student=<that folder>,
  rollout="consistency"))``, sampled with :func:`anystep.rollout.consistency_sample`.
* *Flow-map training + consistency backward simulation* (the ablation row): Stage 1, then
  ``train_stage2(..., rollout="consistency")``.
* *AnyFlow*: Stage 1, then ``train_stage2(..., rollout="flowmap")``, sampled with flow-map Euler.
* *Flow matching*: ``Stage1Config(method="flow_matching")``.

Consistency ODE-init (Self-Forcing's initialisation): run the teacher's probability-flow ODE
(Euler with CFG, no gradient) from pure noise, record its states at the consistency grid times
tau_0..tau_{s-1} (for s = 4 and shift 5: timesteps 1000, 937.5, 833.3, 625), and regress the
student's clean-data prediction at those states onto the ODE's end point:

    x0_theta(z_tau, tau) = z_tau - tau u(z_tau, tau, 0)  ->  x_ODE(0).

The student is the same flow-map network as AnyFlow's (built from the teacher by
:class:`anystep.train.stage1.Stage1Method`, gate 0.25 interpolated conditioning), used only at
r = 0 -- so the consistency and flow-map rows differ in the training method alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from anystep.flow.matching import per_sample_mse, x0_from_velocity
from anystep.flow.schedule import sampling_grid
from anystep.flow.solvers import euler
from anystep.models.velocity import teacher_velocity
from anystep.train.stage2 import LORA_TARGETS
from anystep.models.card import training_rows

STREAM_ODE = 21


@dataclass
class ConsistencyInitConfig:
    teacher: str = "models/toy-teacher"
    out: str = "runs/consistency_init"
    data: str = "moving_digits"  # or a folder of teacher-generated shards (`anystep synth`)
    num_frames: int = 7
    causal: bool = False
    chunk_partition: tuple[int, ...] = (1, 3, 3)
    grid_steps: int = 4  # the consistency grid whose times are regressed (4: 1000, 937.5, 833.3, 625)
    ode_steps: int = 48  # teacher Euler steps from 1 to 0 (the grid times are always among them)
    # v_u + w (v_c - v_u). 3.0: the guided field the flow-map students' forward stage regresses
    # (Eq. 6 fused at g = 3 makes u_c -> v_u + 3 (v_c - v_u)), so both families' first stage aim at
    # one target; both Stage 2s share the real score (v_c + 3 (v_c - v_u), CFG 4, the reference's).
    teacher_guidance: float = 3.0
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 100
    shift: float = 5.0
    gate_value: float = 0.25
    lora_rank: int = 0
    lora_alpha: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    threads: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: bool = True  # bf16 compute, CUDA only


def ode_time_grid(record: list[float], ode_steps: int, shift: float = 5.0) -> list[float]:
    """The teacher ODE's Euler times: the shifted ``ode_steps`` grid with the ``record`` times
    merged in (equal to float rounding counts as present), descending from 1 to 0."""
    times = [float(v) for v in sampling_grid(ode_steps, shift)]
    for r in record:
        if not any(math.isclose(r, t, rel_tol=0, abs_tol=1e-9) for t in times):
            times.append(float(r))
    return sorted(set(times), reverse=True)


@torch.no_grad()
def teacher_ode_states(
    teacher, noise: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, record: list[float],
    ode_steps: int = 48, shift: float = 5.0, guidance: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler + CFG on the teacher's PF-ODE from ``noise`` (at sigma 1) to 0.

    Returns ``(states, x0)``: ``states[i]`` is the ODE state at ``record[i]`` (shape
    (len(record), B, F, C, h, w)), ``x0`` the end point. CFG in the usual form
    v = v_u + w (v_c - v_u), both halves in one batched call: the sampler's own
    :func:`anystep.flow.solvers.euler`, run from one recorded time to the next.
    """
    times = ode_time_grid(list(record), ode_steps, shift)
    want = {i: j for j, r in enumerate(record) for i, t in enumerate(times) if math.isclose(r, t, rel_tol=0, abs_tol=1e-9)}
    if len(want) != len(record):
        raise ValueError(f"record times {record} not all on the ODE grid")
    emb = torch.cat([cond, null])

    def velocity(z, t, _r):
        return teacher_velocity(teacher, z, t, emb)

    z = noise.float()
    states: list[torch.Tensor | None] = [None] * len(record)
    start = 0
    for i in sorted(want):
        z = euler(velocity, z, times[start : i + 1], guidance)
        states[want[i]] = z
        start = i
    return torch.stack(states), euler(velocity, z, times[start:], guidance)


class ConsistencyInitMethod:
    """Student, teacher and the per-micro-step loss for the shared :class:`TrainLoop`."""

    def __init__(self, cfg: ConsistencyInitConfig, rank: int = 0, world_size: int = 1):
        from anystep.train.stage1 import Stage1Config, Stage1Method

        if cfg.grid_steps < 1:
            raise ValueError(f"grid_steps must be >= 1, got {cfg.grid_steps}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        torch.manual_seed(cfg.seed)
        s1 = dict(
            teacher=cfg.teacher, out=cfg.out, data=cfg.data, num_frames=cfg.num_frames, causal=cfg.causal,
            batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, shift=cfg.shift, gate_value=cfg.gate_value,
            lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets), seed=cfg.seed,
            gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision,
        )
        if cfg.causal:
            s1.update(chunk_partition=tuple(cfg.chunk_partition), min_chunks=min(3, len(cfg.chunk_partition)))
        # Stage1Method builds the flow-map student from the teacher exactly as Stage 1 does.
        self.base = Stage1Method(Stage1Config(**s1), rank, world_size)
        if self.base.pipe.__class__.__name__ != "WanPipeline":
            raise ValueError(f"{cfg.teacher}: consistency ODE-init starts from a Wan teacher folder")
        self.student = self.base.student
        self.pipe = self.base.pipe
        self.teacher = self.pipe.transformer.float().eval().requires_grad_(False)
        self.data = self.base.data
        self.grid = [float(v) for v in sampling_grid(cfg.grid_steps, cfg.shift)[:-1]]

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        from anystep.train.loop import step_generator

        cfg = self.cfg
        # Global-batch draws sliced per rank (RankSlice): N ranks draw what one process would.
        ranks = self.base.ranks
        gen = step_generator(cfg.seed + 7919, step, micro, STREAM_ODE)
        x, prompts = self.data.batch(step, cfg.batch_size, micro, cfg.grad_accum, self.rank, self.world_size)
        dev = self.base.device
        cond, null = self.data.embed(prompts).to(dev), self.data.null(len(prompts)).to(dev)
        noise = ranks.randn(gen, x.shape).to(dev)
        states, x0 = teacher_ode_states(self.teacher, noise, cond, null, self.grid, cfg.ode_steps, cfg.shift, cfg.teacher_guidance)
        b = x.shape[0]
        idx = ranks.take(torch.randint(len(self.grid), (b * self.world_size,), generator=gen), b)
        z = states[idx, torch.arange(b)]
        t = torch.tensor([self.grid[i] for i in idx.tolist()], dtype=torch.float32, device=dev)
        if cfg.causal:
            from anystep.models.far_train import far_flow_map_velocity

            # Teacher forcing with the ODE's end point as clean context; chunk count as in Stage 1.
            k = self.base.chunk_count(step_generator(cfg.seed, step, micro, stream=1))
            part = tuple(cfg.chunk_partition[:k])
            f = sum(part)
            z, x0 = z[:, :f], x0[:, :f]
            u = far_flow_map_velocity(self.student, z, t, torch.zeros_like(t), cond, part, clean_latents=x0).float()
            z, x0 = z[:, f - u.shape[1] :], x0[:, f - u.shape[1] :]
        else:
            from anystep.models.velocity import flow_map_velocity

            u = flow_map_velocity(self.student, z, t, torch.zeros_like(t), cond).float()
        return per_sample_mse(x0_from_velocity(z, u, t), x0).mean(), {"grid_index_mean": idx.float().mean().item()}


def train_consistency_init(cfg: ConsistencyInitConfig) -> Path:
    """Train the consistency ODE-init student; write ``out/model`` (EMA weights, diffusers folder)."""
    from anystep.distributed import setup
    from anystep.models.folders import save_anyflow_folder
    from anystep.train.loop import TrainLoop, final_folder_from_checkpoint, write_resolved_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = setup()
    method = ConsistencyInitMethod(cfg, env.rank, env.world_size)
    method.base.prepare_for_training(env)
    method.teacher.to(env.device)  # frozen, replicated: it only runs no-grad ODE solves
    loop = TrainLoop(method.student, cfg.out, cfg, name="consistency_init", env=env)
    write_resolved_config(Path(cfg.out), cfg)
    loop.maybe_resume()
    loop.run(method.loss, cfg.steps)
    if env.distributed:
        return final_folder_from_checkpoint(cfg.out)
    final = loop.ema_module().eval()
    if cfg.lora_rank > 0:
        from anystep.models.lora import merge_student_lora

        final = merge_student_lora(final)
    pipe = method.pipe
    return save_anyflow_folder(Path(cfg.out) / "model", final, pipe.text_encoder, pipe.tokenizer, pipe.vae,
                               shift=cfg.shift, sampler="consistency", training=training_rows(cfg, "consistency_init"))
