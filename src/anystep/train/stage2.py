"""Stage 2: on-policy flow-map distillation (paper Sec. 4.2.2, Algorithm 2; docs/design.md section 3).

Starting from a Stage-1 AnyFlow folder, every iteration runs two 1:1 updates on fresh batches:

**Generator step** (only the student changes):

1. s ~ U(step budgets), g ~ U{0..s-1} from a generator shared by all ranks; pure noise; the
   student's own rollout *with gradient* -- flow-map backward simulation (Eq. 8, three jumps) or,
   for the baselines, consistency backward simulation (exit index k);
2. DMD (Eq. 5): re-noise the rollout x^ at sigma ~ U(0, 1) + shift; x0 predictions
   x0 = z - sigma v of the *real* score (the teacher with CFG, v = v_c + 3 (v_c - v_u), i.e. an
   effective guidance of 4) and the *fake* score (the critic, no CFG), both without gradient,
   scoring the whole clip bidirectionally (also for a causal student); the normalised DMD
   gradient and the fp64 loss MSE(x^, sg(x^ - grad)) (:mod:`anystep.flow.stage2`);
3. plus the Stage-1 loss (Alg. 1) on the same batch, weight 1.0 by default -- computed by
   :class:`anystep.train.stage1.Stage1Method` itself, so the co-trained objective is exactly
   Stage 1's (prompt dropout, (t, r) split, causal chunk-count sampling included; the causal
   auxiliary bidirectional pass is off, as in the reference's on-policy configs). It keeps the
   forward flow map (and with it every step count) anchored while DMD pulls the samples towards
   the teacher's distribution.

**Critic step** (only the critic changes): a rollout *without gradient* with its own s, g, then
plain flow matching of the critic on that sample at logit-normal t + shift. The critic (the fake
score) is a LoRA on the teacher, so it starts equal to the teacher and tracks the student's
distribution; the real score is the same network with the adapters switched off.

Both optimisers: AdamW lr 2e-6, betas (0.0, 0.999), clip 1.0; EMA 0.99 after 200 updates for the
student and the critic. Randomness comes from :func:`anystep.train.updater.step_generator`: the
choices every rank must agree on (s, g / k, the DMD sigmas, the critic's t, Stage 1's chunk count)
from streams shared by all ranks, the noise from per-rank streams -- so a resumed run draws
exactly what an uninterrupted one would have. Checkpoints are atomic and hold the student, the
critic, both optimisers, both EMAs and the step; the final folder is the student's EMA weights
written as a diffusers ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` folder.

Under torchrun the student and the teacher / critic are FSDP2-sharded
(:func:`anystep.distributed.shard`); every per-sample random number is drawn for the global batch
and sliced (:class:`anystep.train.updater.RankSlice`), so N ranks reproduce one process's run at the
same global batch. Checkpoints are DCP folders, resumable at any world size.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anystep.data.shards import training_batches
from anystep.distributed import shard
from anystep.flow.matching import per_sample_mse, training_sigma, velocity_target, x0_from_velocity
from anystep.flow.schedule import add_noise
from anystep.flow.stage2 import (
    REFERENCE_STEP_BUDGETS,
    dmd_gradient,
    dmd_loss,
    dmd_renoise_sigma,
    sample_budget_and_index,
)
from anystep.models.card import training_rows
from anystep.models.causal_state import prepare_far_for_rollout
from anystep.models.loaded import load_model
from anystep.models.lora import REFERENCE_LORA_TARGETS, add_student_lora
from anystep.models.velocity import teacher_velocity
from anystep.rollout import consistency_backward_simulation, flowmap_backward_simulation
from anystep.train.loop import run_method, run_updates
from anystep.train.real_score import check_real_score, empirical_real_score
from anystep.train.registry import MethodInfo
from anystep.train.stage1 import Stage1Config, Stage1Loss
from anystep.train.stage1 import student_spec as stage1_student_spec
from anystep.train.student import build_student, load_trained_student, prepare_student, save_student
from anystep.train.updater import RankSlice, SlicedNoise, Updater, step_generator

# step_generator streams. Stage1Method uses 0 (its own draws) and 1 (causal chunk count); ours
# stay below 97 so (micro, stream) pairs never collide within a step.
STREAM_GEN_SHARED, STREAM_GEN_NOISE = 11, 12
STREAM_CRITIC_SHARED, STREAM_CRITIC_NOISE = 13, 14
_RANK_SEED_STRIDE = 7919


@dataclass
class Stage2Config:
    student: str = "runs/stage1/model"  # a Stage-1 AnyFlow (or AnyFlow-FAR) folder, EMA weights
    teacher: str = "models/toy-teacher"  # the Wan teacher folder: real score and critic init
    out: str = "runs/stage2"
    rollout: str = "flowmap"  # "flowmap" (Eq. 8) | "consistency" (Self-Forcing / rCM baseline)
    data: str = "moving_digits"  # or a folder of teacher-generated shards (`anystep synth`)
    num_frames: int = 7
    causal: bool = False  # the student is AnyFlow-FAR; rollouts go chunk by chunk over the KV cache
    chunk_partition: tuple[int, ...] = ()  # causal: () = the student's own partition
    use_kv_cache: bool = True  # causal rollouts over the KV cache (False: recompute, same result)
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    step_budgets: tuple[int, ...] = REFERENCE_STEP_BUDGETS  # flow-map rollout: s ~ U(budgets)
    consistency_steps: int = 4  # consistency rollout: the s-step grid, exit index k ~ U{0..s-1}
    shift: float = 5.0
    real_guidance: float = 3.0  # real score v_c + w (v_c - v_u); w = 3 is CFG 4 in the usual form
    # "teacher": the teacher folder's network (the paper); "empirical": the exact flow of the toy
    # world's training clips (anystep.train.real_score), a real score with clean converged samples.
    # Either way the critic and the student start from the teacher folder's network.
    real_score: str = "teacher"  # teacher: the folder's network (the paper) | empirical: the toy world's exact flow
    real_score_clips: int = 64  # empirical: training clips per prompt in its clip set
    dmd_weight: float = 1.0  # weight of the DMD loss in the generator's objective
    stage1_weight: float = 1.0  # co-trained Stage-1 loss on the same batch; 0 switches it off
    stage1: dict = field(default_factory=dict)  # overrides for the co-trained Stage1Config
    # critic = LoRA on the teacher (rank 0: a full copy of the teacher, fully trained)
    critic_lora_rank: int = 256  # the critic is a LoRA on the teacher; 0: a full, fully trained copy
    critic_lora_alpha: int = 256  # the critic LoRA's alpha
    critic_lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS  # module names the critic LoRA adapts
    # student LoRA (0 = full fine-tune), as in Stage 1
    lora_rank: int = 0
    lora_alpha: int = 0
    lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS
    lr: float = 2e-6
    critic_lr: float = 2e-6  # the critic's learning rate (the fake score's flow-matching updates)
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    ema_start: int = 200
    seed: int = 0
    log_every: int = 10
    log_to: tuple[str, ...] = ("tensorboard",)  # besides metrics.jsonl: tensorboard (RUN/tensorboard/), wandb; none: neither
    ckpt_every: int = 100
    threads: int = 0
    gradient_checkpointing: bool = False  # student, and the critic when it is trained in full
    mixed_precision: bool = True  # bf16 compute with fp32 master weights and reductions, CUDA only


def _student_partition(folder) -> tuple[int, ...]:
    cfg = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    part = cfg.get("chunk_partition")
    if not part:
        raise ValueError(f"{folder} is not an AnyFlow-FAR folder (its transformer has no chunk_partition)")
    return tuple(int(c) for c in part)


def stage1_config(cfg: Stage2Config) -> Stage1Config:
    """The co-trained Stage-1 objective's config; its student spec is the Stage-2 student's."""
    part = tuple(cfg.chunk_partition) or (_student_partition(cfg.student) if cfg.causal else ())
    s1 = dict(
        teacher=cfg.teacher, init=cfg.student, out=cfg.out, method="flowmap", data=cfg.data, num_frames=cfg.num_frames,
        causal=cfg.causal, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, shift=cfg.shift,
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_targets=tuple(cfg.lora_targets), seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, mixed_precision=cfg.mixed_precision,
    )
    if cfg.causal:
        # The reference's on-policy configs set bidirectional_modeling_prob: 0, so the co-trained
        # term has no auxiliary bidirectional pass; stage1={"bidirectional_aux_prob": 0.1} keeps it.
        s1.update(chunk_partition=part, min_chunks=min(3, len(part)), bidirectional_aux_prob=0.0)
    s1.update(cfg.stage1)
    return Stage1Config(**s1)


def student_spec(cfg: Stage2Config):
    return stage1_student_spec(stage1_config(cfg))


class Stage2Method:
    """Student, teacher and critic, and Algorithm 2's two updaters: generator, then critic."""

    weights = ("student", "ema_g")  # checkpoint keys of the student's tensors and their EMA

    def __init__(self, cfg: Stage2Config, rank: int = 0, world_size: int = 1):
        if cfg.rollout not in ("flowmap", "consistency"):
            raise ValueError(f"rollout must be 'flowmap' or 'consistency', got {cfg.rollout!r}")
        if cfg.grad_accum < 1 or cfg.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not cfg.step_budgets or min(cfg.step_budgets) < 1:
            raise ValueError(f"step_budgets must be integers >= 1, got {list(cfg.step_budgets)}")
        check_real_score(cfg.real_score, cfg.data)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.name, self.title, self.shown = "stage2", f"stage2:{cfg.rollout}", ("loss_dmd", "loss_critic")
        self.ranks = RankSlice(rank, world_size)
        self.device = torch.device("cpu")
        self.env = None
        torch.manual_seed(cfg.seed)  # LoRA initialisation: identical runs, identical adapters

        s1 = stage1_config(cfg)
        self.partition = tuple(s1.chunk_partition) if cfg.causal else ()
        self.student, self.pipe = build_student(stage1_student_spec(s1))
        self.data = training_batches(self.pipe, cfg.data, cfg.num_frames, cfg.seed)
        self.stage1 = Stage1Loss(s1, self.student, self.data, ranks=self.ranks)
        if cfg.causal:
            prepare_far_for_rollout(self.student)

        src = load_model(cfg.teacher)
        if src.kind != "teacher":
            raise ValueError(f"{cfg.teacher}: the real score must be a Wan teacher folder, got a {src.kind} folder")
        self.teacher = src.transformer.float().eval().requires_grad_(False)
        if cfg.critic_lora_rank > 0:
            # One network, two scores: the base weights are the teacher (real score, adapters
            # off), base + LoRA is the critic (fake score). Saves a copy of the teacher.
            add_student_lora(self.teacher, cfg.critic_lora_rank, cfg.critic_lora_alpha or cfg.critic_lora_rank,
                             list(cfg.critic_lora_targets), train_embedders=False)
            self.critic = self.teacher
        else:
            self.critic = copy.deepcopy(self.teacher).requires_grad_(True)
        # The real score's seam: ``real_velocity(z, sigma, cond_embeds, null_embeds, prompts) ->
        # guided v`` (sigmas per sample, AnyFlow layout, no gradient). Any velocity field of the
        # teacher's latent space can stand here; real_score: empirical puts the toy world's exact flow.
        self.real_velocity = self.teacher_real_velocity
        self.empirical = empirical_real_score(cfg.real_score, cfg.data, self.pipe.vae, cfg.num_frames, cfg.real_score_clips)
        if self.empirical is not None:
            self.real_velocity = self.empirical_real_velocity
        self._build_updaters()

    @staticmethod
    def sampler(cfg: Stage2Config) -> str:
        # A consistency-trained student is served by the consistency sampler (Table 2 baselines).
        return "consistency" if cfg.rollout == "consistency" else "flowmap"

    def _build_updaters(self) -> None:
        """Over the current parameters (rebuilt after sharding, whose DTensors replace the plain ones)."""
        self.updaters = [
            Updater.from_config(self.student, self.generator_update_loss, self.cfg, tag="generator",
                                keys=("student", "opt_g", "ema_g", "sched_g")),
            Updater.from_config(self.critic, self.critic_update_loss, self.cfg, lr=self.cfg.critic_lr, tag="critic",
                                keys=("critic", "opt_c", "ema_c", "sched_c")),
        ]

    def prepare_for_training(self, env) -> None:
        """Devices, gradient checkpointing and FSDP2 for the student and the teacher / critic.

        The teacher carries the critic's adapters (one network, two scores), so sharding it shards
        both; a full-copy critic is sharded on its own.
        """
        s1 = self.stage1.cfg
        self.env, self.device = env, env.device
        prepare_student(self.student, env, s1)
        self.stage1.device = env.device
        if self.cfg.causal:  # the rollout's attention processors, for the device the student now lives on
            prepare_far_for_rollout(self.student)
        for net in {id(m): m for m in (self.teacher, self.critic)}.values():
            net.to(env.device)
            if self.cfg.gradient_checkpointing and net is not self.teacher:
                net.enable_gradient_checkpointing()
            shard(net, env, mixed_precision=s1.mixed_precision)
        self._build_updaters()

    # -- randomness ------------------------------------------------------------------------------
    def _shared(self, step: int, micro: int, stream: int) -> torch.Generator:
        return step_generator(self.cfg.seed, step, micro, stream)

    def _own(self, step: int, micro: int, stream: int) -> torch.Generator:
        """The per-sample noise stream. Every rank holds the same generator and draws for the whole
        global batch, keeping its own rows (:class:`RankSlice`)."""
        return step_generator(self.cfg.seed + _RANK_SEED_STRIDE, step, micro, stream)

    def _rank_slice(self, values: torch.Tensor) -> torch.Tensor:
        return self.ranks.take(values, self.cfg.batch_size)

    # -- the scores --------------------------------------------------------------------------------
    @contextmanager
    def _real(self):
        """The teacher's own weights: the critic's adapters switched off (and restored exactly)."""
        if self.critic is not self.teacher:
            yield
            return
        flags = [(p, p.requires_grad) for p in self.teacher.parameters()]
        self.teacher.disable_adapters()
        # peft's disable_adapters also freezes the adapters. Unfreeze them at once: switched off,
        # they take no part in the forward, and FSDP2 reads requires_grad at its lazy init (the
        # first forward, which is this one) to fix the gradient dtype of each group. Seeing no
        # trainable parameter there, it would leave the critic's bf16 gradients uncast for good.
        for p, f in flags:
            p.requires_grad_(f)
        try:
            yield
        finally:
            self.teacher.enable_adapters()
            for p, f in flags:
                p.requires_grad_(f)

    def teacher_real_velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                              null: torch.Tensor, prompts=None) -> torch.Tensor:
        """The default real score: the teacher (the critic's adapters off) with CFG,
        v = v_c + w (v_c - v_u), w = ``real_guidance`` (w = 3 is CFG 4 in the usual form,
        :mod:`anystep.flow.guidance`); both halves in one batched call."""
        b = z.shape[0]
        with self._real():
            v = teacher_velocity(self.teacher, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([cond, null])).float()
        v_c, v_u = v[:b], v[b:]
        return v_c + self.cfg.real_guidance * (v_c - v_u)

    def empirical_real_velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
                                null: torch.Tensor, prompts) -> torch.Tensor:
        """The toy world's exact flow of ``prompts`` with the same guidance: v_c + w (v_c - v_u) is
        CFG 1 + w in the usual form."""
        ids = self.empirical.prompt_ids(prompts)
        return self.empirical.velocity(z, sigma, ids, guidance=1.0 + self.cfg.real_guidance).to(z.device)

    @torch.no_grad()
    def real_x0(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, null: torch.Tensor,
                prompts=None) -> torch.Tensor:
        """x0 of the real score, from :attr:`real_velocity`."""
        return x0_from_velocity(z, self.real_velocity(z, sigma, cond, null, prompts), sigma)

    def critic_velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return teacher_velocity(self.critic, z, sigma, cond).float()

    @torch.no_grad()
    def fake_x0(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x0 of the fake score: the critic, no CFG."""
        return x0_from_velocity(z, self.critic_velocity(z, sigma, cond), sigma)

    # -- rollouts ------------------------------------------------------------------------------------
    def rollout(self, noise: torch.Tensor, cond: torch.Tensor, shared: torch.Generator, own: torch.Generator):
        """The student's rollout from ``noise`` in the caller's grad mode; choices from ``shared``."""
        cfg = self.cfg
        kw = dict(chunk_partition=self.partition or None, use_cache=cfg.use_kv_cache)
        if cfg.rollout == "flowmap":
            s, g = sample_budget_and_index(cfg.step_budgets, shared)
            return flowmap_backward_simulation(self.student, noise, cond, s, g, cfg.shift, **kw)
        s = cfg.consistency_steps
        k = int(torch.randint(s, (), generator=shared))
        return consistency_backward_simulation(self.student, noise, cond, s, k, cfg.shift, SlicedNoise(own, self.ranks), **kw)

    def batch(self, step: int, slot: int):
        """Generator micro-batches use slots 0..A-1 of the step, critic ones A..2A-1: fresh data each."""
        cfg = self.cfg
        return self.data.batch(step, cfg.batch_size, slot, 2 * cfg.grad_accum, self.rank, self.world_size)

    # -- the two updates -----------------------------------------------------------------------------
    def generator_loss(self, batch, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """DMD on the student's own rollout, plus the co-trained Stage-1 loss on the same ``batch``."""
        cfg = self.cfg
        shared, own = self._shared(step, micro, STREAM_GEN_SHARED), self._own(step, micro, STREAM_GEN_NOISE)
        x, prompts = batch
        dev = self.device
        cond, null = self.data.embed(prompts).to(dev), self.data.null(len(prompts)).to(dev)
        noise = self.ranks.randn(own, x.shape).to(dev)
        ro = self.rollout(noise, cond, shared, own)
        x_hat = ro.sample
        sigma = self._rank_slice(dmd_renoise_sigma(cfg.batch_size * self.world_size, cfg.shift, shared)).to(dev)
        z = add_noise(x_hat.detach(), self.ranks.randn(own, x_hat.shape).to(dev), sigma)
        x0_real = self.real_x0(z, sigma, cond, null, prompts)
        x0_fake = self.fake_x0(z, sigma, cond)
        grad = dmd_gradient(x_hat.detach(), x0_real, x0_fake)
        l_dmd = dmd_loss(x_hat, grad)
        loss = cfg.dmd_weight * l_dmd
        metrics = {"loss_dmd": l_dmd.item(), **{f"gen_{k}": v for k, v in ro.info.items()}}
        if cfg.stage1_weight > 0:
            l_s1, m1 = self.stage1(batch, step, micro)
            loss = loss + cfg.stage1_weight * l_s1
            metrics["loss_stage1"] = l_s1.item()
            metrics.update({f"stage1_{k}": v for k, v in m1.items()})
        return loss, metrics

    def critic_loss(self, batch, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        """Flow matching of the critic on a rollout made without gradient from ``batch``'s prompts."""
        cfg = self.cfg
        shared, own = self._shared(step, micro, STREAM_CRITIC_SHARED), self._own(step, micro, STREAM_CRITIC_NOISE)
        x, prompts = batch
        dev = self.device
        cond = self.data.embed(prompts).to(dev)
        noise = self.ranks.randn(own, x.shape).to(dev)
        with torch.no_grad():
            ro = self.rollout(noise, cond, shared, own)
        x_hat = ro.sample.detach()
        t = self._rank_slice(training_sigma(cfg.batch_size * self.world_size, cfg.shift, shared)).to(dev)
        e = self.ranks.randn(own, x_hat.shape).to(dev)
        v = self.critic_velocity(add_noise(x_hat, e, t), t, cond)
        loss = per_sample_mse(v, velocity_target(x_hat, e)).mean()
        return loss, {f"critic_{k}": val for k, val in ro.info.items()}

    def generator_update_loss(self, step: int, micro: int):
        return self.generator_loss(self.batch(step, micro), step, micro)

    def critic_update_loss(self, step: int, micro: int):
        return self.critic_loss(self.batch(step, self.cfg.grad_accum + micro), step, micro)

    # -- one update outside the loop (tests, cost measurements) -------------------------------------
    def _run(self, updaters, step: int) -> dict:
        rec, norms = run_updates(updaters, step, self.cfg.grad_accum, self.env, self.cfg.mixed_precision)
        return {**rec, **norms}

    def generator_step(self, step: int = 0) -> dict:
        """One generator update: only the student's parameters move."""
        return self._run(self.updaters[:1], step)

    def critic_step(self, step: int = 0) -> dict:
        """One critic update on a fresh batch: only the critic's parameters move."""
        return self._run(self.updaters[1:], step)

    def train_step(self, step: int = 0) -> dict:
        return self._run(self.updaters, step)

    # -- the final folder ----------------------------------------------------------------------------
    def save_folder(self, dest) -> Path:
        final = self.updaters[0].ema.ema_copy(self.student)
        return save_student(dest, final, self.pipe, shift=self.cfg.shift, sampler=self.sampler(self.cfg),
                            training=training_rows(self.cfg, "stage2"), lora=self.cfg.lora_rank > 0)

    def export_checkpoint(self, run_dir, dest) -> Path:
        module, pipe = load_trained_student(run_dir, student_spec(self.cfg), self.weights)
        return save_student(dest, module, pipe, shift=self.cfg.shift, sampler=self.sampler(self.cfg),
                            training=training_rows(self.cfg, "stage2"), lora=self.cfg.lora_rank > 0)


def train_stage2(cfg: Stage2Config) -> Path:
    """Run (or resume) Stage 2 and write ``out/model``, a diffusers folder of the student's EMA weights."""
    return run_method(Stage2Method, cfg)


METHOD = MethodInfo(Stage2Config, Stage2Method, train_stage2, "stage-2 model", student_spec)
