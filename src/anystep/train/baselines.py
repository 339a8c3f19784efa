"""Baselines of paper Table 2 that need their own forward stage: consistency ODE-init.

The Table 2 rows and how ``anystep`` builds each (docs/design.md section 3, "the consistency
baselines ... sharing the same loop so the comparison is fair"):

* *Consistency ODE-init + consistency backward simulation* (Self-Forcing / rCM style):
  :func:`train_consistency_init` here, then ``train_stage2(Stage2Config(student=<that folder>,
  rollout="consistency"))``, sampled with the consistency sampler (:mod:`anystep.sampling`).
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
:func:`anystep.train.student.build_student`, gate 0.25 interpolated conditioning), used only at
r = 0 -- so the consistency and flow-map rows differ in the training method alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from anystep.data.shards import training_batches
from anystep.flow.matching import per_sample_mse, x0_from_velocity
from anystep.flow.schedule import sampling_grid
from anystep.flow.solvers import consistency_grid, euler
from anystep.models.card import training_rows
from anystep.models.far_train import far_flow_map_velocity
from anystep.models.lora import REFERENCE_LORA_TARGETS
from anystep.models.velocity import flow_map_velocity, teacher_velocity
from anystep.train.loop import run_method
from anystep.train.real_score import check_real_score, empirical_real_score
from anystep.train.registry import MethodInfo
from anystep.train.stage1 import CHUNK_SAMPLE_PROB, chunk_count
from anystep.train.student import StudentSpec, build_student, load_trained_student, prepare_student, save_student
from anystep.train.updater import RankSlice, Updater, step_generator

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
    teacher_guidance: float = 3.0  # the ODE's guided field v_u + w (v_c - v_u), the flow-map students' target too
    # The ODE's teacher: "teacher" (the folder's network) or "empirical" (the toy world's exact flow,
    # as Stage 2's real_score; the student still starts from the folder's network).
    real_score: str = "teacher"  # the ODE's teacher: teacher (the folder's network) | empirical (the exact flow)
    real_score_clips: int = 64
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
    lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS
    seed: int = 0
    log_every: int = 10
    log_to: tuple[str, ...] = ("tensorboard",)  # besides metrics.jsonl: tensorboard (RUN/tensorboard/), wandb; none: neither
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
def ode_states(velocity, noise: torch.Tensor, record: list[float], ode_steps: int = 48, shift: float = 5.0,
               guidance: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler + CFG on a PF-ODE from ``noise`` (at sigma 1) to 0; ``velocity(z, t, r)`` sees the
    conditional and the null half as one batch, as in :func:`anystep.flow.solvers.euler`.

    Returns ``(states, x0)``: ``states[i]`` is the ODE state at ``record[i]`` (shape
    (len(record), B, F, C, h, w)), ``x0`` the end point. CFG in the usual form
    v = v_u + w (v_c - v_u): the sampler's own :func:`~anystep.flow.solvers.euler`, run from one
    recorded time to the next.
    """
    times = ode_time_grid(list(record), ode_steps, shift)
    want = {i: j for j, r in enumerate(record) for i, t in enumerate(times) if math.isclose(r, t, rel_tol=0, abs_tol=1e-9)}
    if len(want) != len(record):
        raise ValueError(f"record times {record} not all on the ODE grid")
    z = noise.float()
    states: list[torch.Tensor | None] = [None] * len(record)
    start = 0
    for i in sorted(want):
        z = euler(velocity, z, times[start : i + 1], guidance)
        states[want[i]] = z
        start = i
    return torch.stack(states), euler(velocity, z, times[start:], guidance)


def teacher_ode_states(
    teacher, noise: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, record: list[float],
    ode_steps: int = 48, shift: float = 5.0, guidance: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ode_states` of the teacher network."""
    emb = torch.cat([cond, null])

    def velocity(z, t, _r):
        return teacher_velocity(teacher, z, t, emb)

    return ode_states(velocity, noise, record, ode_steps, shift, guidance)


def student_spec(cfg: ConsistencyInitConfig) -> StudentSpec:
    """The flow-map student AnyFlow's Stage 1 builds from the same teacher."""
    return StudentSpec(source=cfg.teacher, causal=cfg.causal, chunk_partition=tuple(cfg.chunk_partition),
                       num_frames=cfg.num_frames, gate_value=cfg.gate_value, lora_rank=cfg.lora_rank,
                       lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets))


class ConsistencyInitMethod:
    """Student and teacher, one updater: the student's x0 at the teacher's ODE states."""

    name = title = "consistency_init"
    shown = ("loss",)
    weights = ("model", "ema")

    def __init__(self, cfg: ConsistencyInitConfig, rank: int = 0, world_size: int = 1):
        if cfg.grid_steps < 1:
            raise ValueError(f"grid_steps must be >= 1, got {cfg.grid_steps}")
        check_real_score(cfg.real_score, cfg.data)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.ranks = RankSlice(rank, world_size)
        self.device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.student, self.pipe = build_student(student_spec(cfg))
        if self.pipe.__class__.__name__ != "WanPipeline":
            raise ValueError(f"{cfg.teacher}: consistency ODE-init starts from a Wan teacher folder")
        self.teacher = self.pipe.transformer.float().eval().requires_grad_(False)
        self.data = training_batches(self.pipe, cfg.data, cfg.num_frames, cfg.seed)
        self.grid = consistency_grid(cfg.grid_steps, cfg.shift)
        self.empirical = empirical_real_score(cfg.real_score, cfg.data, self.pipe.vae, cfg.num_frames,
                                              cfg.real_score_clips)
        self.updaters = [Updater.from_config(self.student, self.loss, cfg)]

    @staticmethod
    def sampler(cfg: ConsistencyInitConfig) -> str:
        return "consistency"

    def prepare_for_training(self, env) -> None:
        prepare_student(self.student, env, self.cfg)
        self.device = env.device
        self.teacher.to(env.device)  # frozen, replicated: it only runs no-grad ODE solves
        self.updaters = [Updater.from_config(self.student, self.loss, self.cfg)]

    def batch(self, step: int, micro: int):
        return self.data.batch(step, self.cfg.batch_size, micro, self.cfg.grad_accum, self.rank, self.world_size)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        return self.loss_on(self.batch(step, micro), step, micro)

    def loss_on(self, batch, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg, ranks, dev = self.cfg, self.ranks, self.device
        # Global-batch draws sliced per rank (RankSlice): N ranks draw what one process would.
        gen = step_generator(cfg.seed + 7919, step, micro, STREAM_ODE)
        x, prompts = batch
        cond, null = self.data.embed(prompts).to(dev), self.data.null(len(prompts)).to(dev)
        noise = ranks.randn(gen, x.shape).to(dev)
        if self.empirical is not None:
            velocity = self.empirical.halves_velocity(self.empirical.prompt_ids(prompts))
            states, x0 = ode_states(velocity, noise, self.grid, cfg.ode_steps, cfg.shift, cfg.teacher_guidance)
        else:
            states, x0 = teacher_ode_states(self.teacher, noise, cond, null, self.grid, cfg.ode_steps, cfg.shift,
                                            cfg.teacher_guidance)
        b = x.shape[0]
        idx = ranks.take(torch.randint(len(self.grid), (b * self.world_size,), generator=gen), b)
        z = states[idx, torch.arange(b)]
        t = torch.tensor([self.grid[i] for i in idx.tolist()], dtype=torch.float32, device=dev)
        if cfg.causal:
            # Teacher forcing with the ODE's end point as clean context; chunk count as in Stage 1.
            k = chunk_count(len(cfg.chunk_partition), min(3, len(cfg.chunk_partition)), CHUNK_SAMPLE_PROB,
                            step_generator(cfg.seed, step, micro, stream=1))
            part = tuple(cfg.chunk_partition[:k])
            f = sum(part)
            z, x0 = z[:, :f], x0[:, :f]
            u = far_flow_map_velocity(self.student, z, t, torch.zeros_like(t), cond, part, clean_latents=x0).float()
            z, x0 = z[:, f - u.shape[1] :], x0[:, f - u.shape[1] :]
        else:
            u = flow_map_velocity(self.student, z, t, torch.zeros_like(t), cond).float()
        return per_sample_mse(x0_from_velocity(z, u, t), x0).mean(), {"grid_index_mean": idx.float().mean().item()}

    def save_folder(self, dest) -> Path:
        final = self.updaters[0].ema.ema_copy(self.student)
        return save_student(dest, final, self.pipe, shift=self.cfg.shift, sampler="consistency",
                            training=training_rows(self.cfg, "consistency_init"), lora=self.cfg.lora_rank > 0)

    def export_checkpoint(self, run_dir, dest) -> Path:
        module, pipe = load_trained_student(run_dir, student_spec(self.cfg), self.weights)
        return save_student(dest, module, pipe, shift=self.cfg.shift, sampler="consistency",
                            training=training_rows(self.cfg, "consistency_init"), lora=self.cfg.lora_rank > 0)


def train_consistency_init(cfg: ConsistencyInitConfig) -> Path:
    """Train the consistency ODE-init student; write ``out/model`` (EMA weights, diffusers folder)."""
    return run_method(ConsistencyInitMethod, cfg)


METHOD = MethodInfo(ConsistencyInitConfig, ConsistencyInitMethod, train_consistency_init, "consistency ODE-init model",
                    student_spec)
