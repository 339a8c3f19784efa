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
student and the critic. Randomness comes from :func:`anystep.train.loop.step_generator`: the
choices every rank must agree on (s, g / k, the DMD sigmas, the critic's t, Stage 1's chunk count)
from streams shared by all ranks, the noise from per-rank streams -- so a resumed run draws
exactly what an uninterrupted one would have. Checkpoints are atomic and hold the student, the
critic, both optimisers, both EMAs and the step; the final folder is the student's EMA weights
written as a diffusers ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` folder.

Under torchrun the student and the teacher / critic are FSDP2-sharded
(:func:`anystep.distributed.shard`); every per-sample random number is drawn for the global batch
and sliced (:class:`anystep.train.loop.RankSlice`), so N ranks reproduce one process's run at the
same global batch. Checkpoints are DCP folders, resumable at any world size.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from anystep.flow.matching import per_sample_mse, training_sigma, velocity_target, x0_from_velocity
from anystep.flow.schedule import add_noise
from anystep.flow.stage2 import (
    REFERENCE_STEP_BUDGETS,
    dmd_gradient,
    dmd_loss,
    dmd_renoise_sigma,
    sample_budget_and_index,
)
from anystep.distributed import global_mean, setup
from anystep.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
    trainable_tensors,
)
from anystep.train.common import EMA, JsonlLogger, warmup_lambda
from anystep.train.progress import Progress
from anystep.train.loop import RankSlice, SlicedNoise, optimizer_step
from anystep.models.card import training_rows

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")

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
    dmd_weight: float = 1.0
    stage1_weight: float = 1.0  # co-trained Stage-1 loss on the same batch; 0 switches it off
    stage1: dict = field(default_factory=dict)  # overrides for the co-trained Stage1Config
    # critic = LoRA on the teacher (rank 0: a full copy of the teacher, fully trained)
    critic_lora_rank: int = 256
    critic_lora_alpha: int = 256
    critic_lora_targets: tuple[str, ...] = LORA_TARGETS
    # student LoRA (0 = full fine-tune), as in Stage 1
    lora_rank: int = 0
    lora_alpha: int = 0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lr: float = 2e-6
    critic_lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    ema_start: int = 200
    seed: int = 0
    log_every: int = 10
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


class _GivenBatch:
    """Stands in for ``ToyBatches`` inside the co-trained Stage1Method: ``batch()`` returns the
    generator step's own batch, so the Stage-1 loss sees the same clips and prompts."""

    def __init__(self, data):
        self._data = data
        self.current = None

    def batch(self, *args, **kwargs):
        if self.current is None:
            raise RuntimeError("no batch handed to the co-trained Stage-1 loss")
        return self.current

    def __getattr__(self, name):  # embed, null, world, ...
        return getattr(self._data, name)


class Stage2Trainer:
    """Student, teacher, critic, their optimisers and EMAs, and one Stage-2 iteration."""

    def __init__(self, cfg: Stage2Config, rank: int = 0, world_size: int = 1):
        from anystep.models.loaded import load_model
        from anystep.train.stage1 import Stage1Config, Stage1Method

        if cfg.rollout not in ("flowmap", "consistency"):
            raise ValueError(f"rollout must be 'flowmap' or 'consistency', got {cfg.rollout!r}")
        if cfg.grad_accum < 1 or cfg.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if not cfg.step_budgets or min(cfg.step_budgets) < 1:
            raise ValueError(f"step_budgets must be integers >= 1, got {list(cfg.step_budgets)}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        torch.manual_seed(cfg.seed)  # LoRA initialisation: identical runs, identical adapters

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
        self.stage1 = Stage1Method(Stage1Config(**s1), rank, world_size)
        self.data = self.stage1.data
        self.stage1.data = self._given = _GivenBatch(self.data)
        self.student = self.stage1.student
        self.pipe = self.stage1.pipe
        self.partition = part
        if cfg.causal:
            from anystep.models.causal_state import prepare_far_for_rollout

            # (Stage1Method has checked that the partition covers the clip's latent frames.)
            prepare_far_for_rollout(self.student)

        src = load_model(cfg.teacher)
        if src.kind != "teacher":
            raise ValueError(f"{cfg.teacher}: the real score must be a Wan teacher folder, got a {src.kind} folder")
        self.teacher = src.transformer.float().eval().requires_grad_(False)
        if cfg.critic_lora_rank > 0:
            from anystep.models.lora import add_student_lora

            # One network, two scores: the base weights are the teacher (real score, adapters
            # off), base + LoRA is the critic (fake score). Saves a copy of the teacher.
            add_student_lora(self.teacher, cfg.critic_lora_rank, cfg.critic_lora_alpha or cfg.critic_lora_rank,
                             list(cfg.critic_lora_targets), train_embedders=False)
            self.critic = self.teacher
        else:
            import copy

            self.critic = copy.deepcopy(self.teacher).requires_grad_(True)

        self._build_optimisers()
        self.step = 0
        self.out = Path(cfg.out)
        self.device = torch.device("cpu")
        self.env = None

    def _build_optimisers(self) -> None:
        """Optimisers, schedulers and EMAs over the current parameters (rebuilt after sharding, whose
        DTensor parameters replace the plain ones)."""
        cfg = self.cfg
        self.student_params = [p for p in self.student.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        if not self.student_params or not self.critic_params:
            raise ValueError("nothing to train: the student or the critic has no trainable parameter")
        self.opt_g = torch.optim.AdamW(self.student_params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.opt_c = torch.optim.AdamW(self.critic_params, lr=cfg.critic_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, warmup_lambda(cfg.warmup))
        self.sched_c = torch.optim.lr_scheduler.LambdaLR(self.opt_c, warmup_lambda(cfg.warmup))
        self.ema_g = EMA(self.student, cfg.ema_decay, cfg.ema_start)
        self.ema_c = EMA(self.critic, cfg.ema_decay, cfg.ema_start)

    def prepare_for_training(self, env) -> None:
        """Devices, gradient checkpointing and FSDP2 for the student and the teacher / critic.

        The teacher carries the critic's adapters (one network, two scores), so sharding it shards
        both; a full-copy critic is sharded on its own.
        """
        from anystep.distributed import shard

        self.env, self.device = env, env.device
        self.stage1.prepare_for_training(env)
        if self.cfg.causal:  # the rollout's attention processors, for the device the student now lives on
            from anystep.models.causal_state import prepare_far_for_rollout

            prepare_far_for_rollout(self.student)
        for net in {id(m): m for m in (self.teacher, self.critic)}.values():
            net.to(env.device)
            if self.cfg.gradient_checkpointing and net is not self.teacher:
                net.enable_gradient_checkpointing()
            shard(net, env, mixed_precision=self.stage1.cfg.mixed_precision)
        self._build_optimisers()

    # -- randomness ------------------------------------------------------------------------------
    def _shared(self, step: int, micro: int, stream: int) -> torch.Generator:
        from anystep.train.loop import step_generator

        return step_generator(self.cfg.seed, step, micro, stream)

    def _own(self, step: int, micro: int, stream: int) -> torch.Generator:
        """The per-sample noise stream. Every rank holds the same generator and draws for the whole
        global batch, keeping its own rows (:class:`RankSlice`)."""
        from anystep.train.loop import step_generator

        return step_generator(self.cfg.seed + _RANK_SEED_STRIDE, step, micro, stream)

    @property
    def ranks(self) -> RankSlice:
        return RankSlice(self.rank, self.world_size)

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

    @torch.no_grad()
    def real_x0(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """x0 of the real score: the teacher with CFG, v = v_c + w (v_c - v_u), w = ``real_guidance``."""
        from anystep.models.velocity import teacher_velocity

        b = z.shape[0]
        with self._real():
            v = teacher_velocity(self.teacher, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([cond, null])).float()
        v_c, v_u = v[:b], v[b:]
        return x0_from_velocity(z, v_c + self.cfg.real_guidance * (v_c - v_u), sigma)

    def critic_velocity(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        from anystep.models.velocity import teacher_velocity

        return teacher_velocity(self.critic, z, sigma, cond).float()

    @torch.no_grad()
    def fake_x0(self, z: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x0 of the fake score: the critic, no CFG."""
        return x0_from_velocity(z, self.critic_velocity(z, sigma, cond), sigma)

    # -- rollouts ------------------------------------------------------------------------------------
    def rollout(self, noise: torch.Tensor, cond: torch.Tensor, shared: torch.Generator, own: torch.Generator):
        """The student's rollout from ``noise`` in the caller's grad mode; choices from ``shared``."""
        from anystep.rollout import consistency_backward_simulation, flowmap_backward_simulation

        cfg = self.cfg
        kw = dict(chunk_partition=self.partition or None, use_cache=cfg.use_kv_cache)
        if cfg.rollout == "flowmap":
            s, g = sample_budget_and_index(cfg.step_budgets, shared)
            return flowmap_backward_simulation(self.student, noise, cond, s, g, cfg.shift, **kw)
        s = cfg.consistency_steps
        k = int(torch.randint(s, (), generator=shared))
        return consistency_backward_simulation(self.student, noise, cond, s, k, cfg.shift, SlicedNoise(own, self.ranks), **kw)

    def _batch(self, step: int, slot: int):
        """Generator micro-batches use slots 0..A-1 of the step, critic ones A..2A-1: fresh data each."""
        cfg = self.cfg
        return self.data.batch(step, cfg.batch_size, slot, 2 * cfg.grad_accum, self.rank, self.world_size)

    # -- the two updates -----------------------------------------------------------------------------
    def generator_loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        shared, own = self._shared(step, micro, STREAM_GEN_SHARED), self._own(step, micro, STREAM_GEN_NOISE)
        x, prompts = self._batch(step, micro)
        dev = self.device
        cond, null = self.data.embed(prompts).to(dev), self.data.null(len(prompts)).to(dev)
        noise = self.ranks.randn(own, x.shape).to(dev)
        ro = self.rollout(noise, cond, shared, own)
        x_hat = ro.sample
        sigma = self._rank_slice(dmd_renoise_sigma(cfg.batch_size * self.world_size, cfg.shift, shared)).to(dev)
        z = add_noise(x_hat.detach(), self.ranks.randn(own, x_hat.shape).to(dev), sigma)
        x0_real = self.real_x0(z, sigma, cond, null)
        x0_fake = self.fake_x0(z, sigma, cond)
        grad = dmd_gradient(x_hat.detach(), x0_real, x0_fake)
        l_dmd = dmd_loss(x_hat, grad)
        loss = cfg.dmd_weight * l_dmd
        metrics = {"loss_dmd": l_dmd.item(), **{f"gen_{k}": v for k, v in ro.info.items()}}
        if cfg.stage1_weight > 0:
            self._given.current = (x, prompts)
            try:
                l_s1, m1 = self.stage1.loss(step, micro)
            finally:
                self._given.current = None
            loss = loss + cfg.stage1_weight * l_s1
            metrics["loss_stage1"] = l_s1.item()
            metrics.update({f"stage1_{k}": v for k, v in m1.items()})
        return loss, metrics

    def critic_loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        shared, own = self._shared(step, micro, STREAM_CRITIC_SHARED), self._own(step, micro, STREAM_CRITIC_NOISE)
        x, prompts = self._batch(step, cfg.grad_accum + micro)
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

    def _update(self, loss_fn, params, opt, sched, ema, module, tag: str) -> dict:
        cfg = self.cfg
        total, metrics, gn = optimizer_step(module, params, opt, sched, loss_fn, self.step, cfg.grad_accum, cfg.grad_clip,
                                            self.env, cfg.mixed_precision, f"{tag} loss")
        ema.update(module, self.step + 1)
        return {f"loss_{tag}": total, f"grad_norm_{tag}": gn, **metrics}

    def generator_step(self) -> dict:
        """One generator update: only the student's parameters move."""
        return self._update(self.generator_loss, self.student_params, self.opt_g, self.sched_g, self.ema_g, self.student, "generator")

    def critic_step(self) -> dict:
        """One critic update on a fresh batch: only the critic's parameters move."""
        return self._update(self.critic_loss, self.critic_params, self.opt_c, self.sched_c, self.ema_c, self.critic, "critic")

    def train_step(self) -> dict:
        rec = self.generator_step()
        rec.update(self.critic_step())
        self.step += 1
        rec["loss"] = rec["loss_generator"]
        return rec

    # -- checkpoints ---------------------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {
            "student": trainable_tensors(self.student, self.student_params),
            "critic": trainable_tensors(self.critic, self.critic_params),
            "opt_g": optimizer_state(self.student, self.opt_g),
            "opt_c": optimizer_state(self.critic, self.opt_c),
            "ema_g": self.ema_g.shadow,
            "ema_c": self.ema_c.shadow,
        }

    def global_batch(self) -> int:
        """Samples per generator update over all ranks: a resume must keep it."""
        return self.cfg.batch_size * self.world_size * self.cfg.grad_accum

    def save(self) -> None:
        """Collective: a DCP checkpoint of everything that moves (:mod:`anystep.train.checkpoint`)."""
        meta = {"step": self.step, "config": asdict(self.cfg), "name": "stage2", "global_batch": self.global_batch(),
                "sched_g": self.sched_g.state_dict(), "sched_c": self.sched_c.state_dict()}
        save_checkpoint(self.out, self._tensors(), meta)

    def maybe_resume(self) -> bool:
        if not find_checkpoint(self.out):
            return False
        tensors = self._tensors()
        meta = load_checkpoint(self.out, tensors, expect_global_batch=self.global_batch())
        load_optimizer_state(self.student, self.opt_g, tensors["opt_g"])
        load_optimizer_state(self.critic, self.opt_c, tensors["opt_c"])
        self.sched_g.load_state_dict(meta["sched_g"])
        self.sched_c.load_state_dict(meta["sched_c"])
        from anystep.train.runfolder import apply_resumed_hyperparams

        apply_resumed_hyperparams(self.opt_g, self.sched_g, [self.cfg.lr], self.cfg.betas, self.cfg.weight_decay)
        apply_resumed_hyperparams(self.opt_c, self.sched_c, [self.cfg.critic_lr], self.cfg.betas, self.cfg.weight_decay)
        self.step = int(meta["step"])
        return True

    def final_student(self):
        """The student with its EMA weights (LoRA merged), ready to export."""
        final = self.ema_g.ema_copy(self.student).eval()
        if self.cfg.lora_rank > 0:
            from anystep.models.lora import merge_student_lora

            final = merge_student_lora(final)
        return final


def train_stage2(cfg: Stage2Config) -> Path:
    """Run (or resume) Stage 2 and write ``out/model``, a diffusers folder of the student's EMA weights."""
    from anystep.models.folders import save_anyflow_folder
    from anystep.train.loop import final_folder_from_checkpoint, write_resolved_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = setup()
    trainer = Stage2Trainer(cfg, env.rank, env.world_size)
    trainer.prepare_for_training(env)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    trainer.maybe_resume()
    logger = JsonlLogger(out / "metrics.jsonl" if env.is_main else None)
    t0 = time.time()
    progress = Progress(f"stage2:{cfg.rollout}", cfg.steps, trainer.step, enabled=env.is_main,
                        shown=("loss_dmd", "loss_critic"))
    while trainer.step < cfg.steps:
        rec = trainer.train_step()
        step = trainer.step
        progress.update(step, {k: v for k, v in rec.items() if k.startswith("loss")})
        if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
            norms = {k: rec.pop(k) for k in list(rec) if k.startswith("grad_norm_")}  # already global
            lr = trainer.sched_g.get_last_lr()[0]
            logger.log({"step": step, **global_mean({**rec, **progress.window(step, lr)}), **norms, "lr": lr,
                        "time": time.time() - t0})
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            trainer.save()
    progress.close(str(out / "checkpoint"))
    if env.distributed:
        return final_folder_from_checkpoint(cfg.out)
    pipe = trainer.pipe
    # A consistency-trained student is served by the consistency sampler (Table 2 baselines).
    sampler = "consistency" if cfg.rollout == "consistency" else "flowmap"
    return save_anyflow_folder(out / "model", trainer.final_student(), pipe.text_encoder, pipe.tokenizer, pipe.vae,
                               shift=cfg.shift, sampler=sampler, training=training_rows(cfg, "stage2"))
