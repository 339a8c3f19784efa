"""Stage 1: forward flow-map training (paper Sec. 4.2.1, Algorithm 1), and plain flow matching with
the same loop (the Table 2 baseline and the teacher fine-tune).

One step, per micro-batch of clean latents x with prompt embeddings c:

1. sample types by global-batch position (50% r = t, 25% r = 0, 25% general), (t, r) = shifted
   (max, min) of two uniforms;
2. z = (1 - t) x + t e, v = e - x;
3. u_c = u(z, t, r | c) with gradient;
4. one batched no-grad call for u_null = u(z, t, r | null) and the Eq. 4 finite-difference points
   u(z +- eps v, t +- eps, r | c) -- only for samples with t != r, where (t - r) du/dt is non-zero;
5. u = (u_c - (1 - g) sg(u_null)) / g (Eq. 6), u_tgt = v - (t - r) du/dt (Eq. 3);
6. per-sample fp32 MSE times w(t), then the adaptive weight (Eq. 7) on that weighted loss -- the
   reference code's order (``adaptive_order="wt_first"``; ``"ratio_first"`` is the earlier
   anystep order, Eq. 7 on the raw MSE and w(t) on top).

Causal students add, with probability ``bidirectional_aux_prob``, a plain flow-matching pass over
the whole clip as one bidirectional chunk, guidance-fused like the main loss (the reference's
``train_bidirection`` of the FAR trainer); Stage 2 switches it off by default, as the reference's
on-policy configs do (``bidirectional_modeling_prob: 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from anystep.flow.matching import per_sample_mse, training_sigma, velocity_target
from anystep.flow.schedule import add_noise
from anystep.flow.stage1 import (
    ADAPTIVE_ORDERS,
    SAMPLE_BOUNDARY,
    adaptive_base_loss,
    finite_difference_derivative,
    finite_difference_inputs,
    flow_map_target,
    guidance_fused_velocity,
    loss_weight,
    sample_t_r,
    sample_types,
    weighted_stage1_loss,
)
from anystep.data.shards import training_batches
from anystep.distributed import all_sum
from anystep.models.card import training_rows
from anystep.models.far_train import far_flow_map_velocity
from anystep.models.lora import REFERENCE_LORA_TARGETS
from anystep.models.velocity import flow_map_velocity, teacher_velocity
from anystep.train.loop import run_method
from anystep.train.registry import MethodInfo
from anystep.train.student import StudentSpec, build_student, is_wan, load_trained_student, prepare_student, save_student
from anystep.train.updater import RankSlice, Updater, step_generator

#: Causal students: the share of steps whose chunk count is drawn from U[min_chunks, n] (reference recipe).
CHUNK_SAMPLE_PROB = 0.5


@dataclass
class Stage1Config:
    teacher: str = "models/toy-teacher"
    init: str | None = None  # an AnyFlow folder to continue from instead of converting the teacher
    out: str = "runs/stage1"
    method: str = "flowmap"  # "flowmap" (Alg. 1) or "flow_matching" (baseline / teacher fine-tune)
    data: str = "moving_digits"  # or a folder of teacher-generated shards (`anystep synth`)
    num_frames: int = 7
    causal: bool = False  # AnyFlow-FAR student (clean-context teacher forcing over the chunk partition)
    chunk_partition: tuple[int, ...] = (1, 3, 3, 3, 3)
    min_chunks: int = 3  # causal: with prob chunk_sample_prob the chunk count is U[min_chunks, n], else min_chunks
    chunk_sample_prob: float = CHUNK_SAMPLE_PROB  # causal: probability of a random chunk count (see min_chunks)
    bidirectional_aux_prob: float = 0.1  # causal: extra flow-matching pass over the whole clip, one chunk
    bidirectional_aux_fused: bool = True  # the aux pass guidance-fused at `guidance` (reference); False: unguided
    steps: int = 600
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 1000
    shift: float = 5.0
    guidance: float = 3.0  # CFG scale fused into the student's target (Eq. 6)
    null_prob: float = 0.1  # share of prompts replaced by the null prompt (the unconditional branch)
    fd_eps: float = 0.005  # finite-difference step in sigma for du/dt (Eq. 4)
    loss_weight: str = "beta"  # beta | uniform | normal (Fig. 10)
    adaptive: bool = True  # Eq. 7's adaptive weight on t != r samples; False: w(t) alone
    adaptive_order: str = "wt_first"  # wt_first: w(t) before Eq. 7 (reference code) | ratio_first: Eq. 7, then w(t)
    adaptive_c: float = 1e-5  # Eq. 7's c, added to the denominator
    boundary_frac: float = 0.5  # share of the batch at r = t (plain flow matching, the boundary)
    zero_frac: float = 0.25  # share of the batch at r = 0; the rest are general (t, r) pairs
    timestep_cond: str = "interpolated"  # interpolated (gate 0.25 on emb'(r)) | zero_init (emb(t) + emb'(t - r))
    gate_value: float = 0.25
    lora_rank: int = 0  # 0 = full fine-tune
    lora_alpha: int = 0
    lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS
    seed: int = 0
    log_every: int = 10
    log_to: tuple[str, ...] = ("tensorboard",)  # besides metrics.jsonl: tensorboard (RUN/tensorboard/), wandb; none: neither
    ckpt_every: int = 100
    threads: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: bool = True  # bf16 compute with fp32 master weights and reductions, CUDA only


def flowmap_loss(net, x: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, cfg: Stage1Config,
                 gen: torch.Generator, types: torch.Tensor, ranks: RankSlice = RankSlice(),
                 reduce=all_sum) -> tuple[torch.Tensor, dict]:
    """Algorithm 1 on this rank's micro-batch. ``types`` from :func:`sample_types`, over the
    *global* batch; (t, r) and the noise are drawn for the global batch and sliced by ``ranks``.

    ``net(z, t, r, emb, clean) -> u`` returns u for the last ``u.shape[1]`` frames of the clip
    (all of them for a bidirectional student; the full-resolution chunks for a causal one, whose
    earlier frames are compressed clean context); ``clean`` is the clean clip for teacher forcing.
    ``reduce`` sums the boundary statistics over ranks: Eq. 7's mu is a global-batch mean, and a
    rank whose slice holds no boundary sample still gets a finite weight from it.
    """
    b, dev = x.shape[0], x.device
    t, r = sample_t_r(types, cfg.shift, generator=gen)
    # w(t) is normalised over the global batch: evaluate it on the global t, then slice.
    w_t = ranks.take(loss_weight(t, cfg.loss_weight), b).to(dev)
    t, r, types = ranks.take(t, b).to(dev), ranks.take(r, b).to(dev), ranks.take(types, b).to(dev)
    e = ranks.randn(gen, x.shape, x.dtype).to(dev)
    z = add_noise(x, e, t)
    v = velocity_target(x, e)
    is_b = types == SAMPLE_BOUNDARY

    u_c = net(z, t, r, cond, x).float()
    v = v[:, x.shape[1] - u_c.shape[1] :]

    fd = ~is_b  # (t - r) du/dt vanishes on the boundary: skip those finite-difference points
    with torch.no_grad():
        v_full = velocity_target(x[fd], e[fd])
        zp, zm, tp, tm = finite_difference_inputs(z[fd], v_full, t[fd], cfg.fd_eps)
        out = net(
            torch.cat([z, zp, zm]),
            torch.cat([t, tp, tm]),
            torch.cat([r, r[fd], r[fd]]),
            torch.cat([null, cond[fd], cond[fd]]),
            torch.cat([x, x[fd], x[fd]]),
        ).float()
        u_null = out[:b]
        n_fd = int(fd.sum())
        dudt = torch.zeros_like(u_c)
        if n_fd:
            dudt[fd] = finite_difference_derivative(out[b : b + n_fd], out[b + n_fd :], cfg.fd_eps, cfg.guidance)
        u_tgt = flow_map_target(v.float(), dudt, t, r)

    u = guidance_fused_velocity(u_c, u_null, cfg.guidance)
    per = per_sample_mse(u, u_tgt)
    base = adaptive_base_loss(per.detach(), w_t, cfg.adaptive_order)
    mu, loss_b, loss_g = _boundary_stats(base, per.detach(), is_b, ranks, reduce)
    loss = weighted_stage1_loss(per, w_t, is_b, cfg.adaptive_order, cfg.adaptive_c, boundary_mean=mu,
                                adaptive=cfg.adaptive).mean()
    metrics = {"loss_boundary": loss_b, "loss_general": loss_g}
    return loss, metrics


def _boundary_stats(base: torch.Tensor, d: torch.Tensor, is_b: torch.Tensor, ranks: RankSlice, reduce):
    """(mu, mean boundary MSE, mean other MSE) over the global batch; mu is the boundary mean of
    ``base`` (Eq. 7's input, :func:`adaptive_base_loss`), the logged means are of the raw MSE ``d``.

    One process: the plain means. N ranks: one reduction of
    [sum_b MSE, n_b, sum_other MSE, n_other, sum_b base].
    """
    if ranks.world_size == 1:
        if not bool(is_b.any()):
            raise ValueError("adaptive weighting needs at least one boundary (r = t) sample")
        return base[is_b].mean(), d[is_b].mean().item(), (d[~is_b].mean().item() if bool((~is_b).any()) else 0.0)
    stats = reduce(torch.stack([d[is_b].sum(), is_b.sum().to(d.dtype), d[~is_b].sum(), (~is_b).sum().to(d.dtype),
                                base[is_b].sum()]).cpu())
    if float(stats[1]) < 1:
        raise ValueError("adaptive weighting needs at least one boundary (r = t) sample in the global batch")
    mu = float(stats[4] / stats[1])
    return (torch.tensor(mu, device=d.device, dtype=d.dtype), float(stats[0] / stats[1]),
            (float(stats[2] / stats[3]) if float(stats[3]) > 0 else 0.0))


def flow_matching_loss(net, x, cond, null, cfg: Stage1Config, gen: torch.Generator,
                       ranks: RankSlice = RankSlice(), fused_guidance: float | None = None) -> tuple[torch.Tensor, dict]:
    """Plain flow matching at r = t (logit-normal t + shift): the baseline of Table 2.

    ``fused_guidance``: train the guidance-fused prediction (Eq. 6) with a no-grad null-prompt
    pass, as the causal auxiliary pass does in the reference; None trains the plain prediction.
    """
    b, dev = x.shape[0], x.device
    t = ranks.take(training_sigma(b * ranks.world_size, cfg.shift, gen), b).to(dev)
    e = ranks.randn(gen, x.shape, x.dtype).to(dev)
    z = add_noise(x, e, t)
    u = net(z, t, t, cond, x).float()
    if fused_guidance is not None:
        with torch.no_grad():
            u_null = net(z, t, t, null, x).float()
        u = guidance_fused_velocity(u, u_null, fused_guidance)
    v = velocity_target(x, e)[:, x.shape[1] - u.shape[1] :]
    return per_sample_mse(u, v).mean(), {}


def chunk_count(n_chunks: int, min_chunks: int, sample_prob: float, gen: torch.Generator) -> int:
    """Causal recipe: with prob ``sample_prob`` U[min_chunks, n_chunks], else min_chunks."""
    if float(torch.rand((), generator=gen)) < sample_prob:
        return int(torch.randint(min_chunks, n_chunks + 1, (), generator=gen))
    return min_chunks


class Stage1Loss:
    """Stage 1's objective on a given micro-batch, for any student module: Algorithm 1, or plain flow
    matching (``cfg.method``), with prompt dropout and, for a causal student, the chunk-count
    sampling and the auxiliary bidirectional pass. Stage 2 co-trains with it on its own batch."""

    def __init__(self, cfg: Stage1Config, student, data, wan: bool = False, ranks: RankSlice = RankSlice()):
        if cfg.adaptive_order not in ADAPTIVE_ORDERS:  # fail at start-up, not at the first step
            raise ValueError(f"adaptive_order must be one of {ADAPTIVE_ORDERS}, got {cfg.adaptive_order!r}")
        if cfg.method not in ("flowmap", "flow_matching"):
            raise ValueError(f"method must be 'flowmap' or 'flow_matching', got {cfg.method!r}")
        if cfg.causal and len(cfg.chunk_partition) < cfg.min_chunks:
            raise ValueError(f"chunk_partition {list(cfg.chunk_partition)} has fewer than min_chunks={cfg.min_chunks} chunks")
        self.cfg, self.student, self.data, self.ranks = cfg, student, data, ranks
        self.device = torch.device("cpu")  # the student's, set by the method's prepare_for_training
        self.reduce = all_sum  # sums Eq. 7's boundary statistics over ranks
        if wan:
            self.net = lambda z, t, r, emb, clean: teacher_velocity(self.student, z, t, emb)
        elif not cfg.causal:
            self.net = lambda z, t, r, emb, clean: flow_map_velocity(self.student, z, t, r, emb)

    def _causal_net(self, partition, teacher_forcing: bool = True):
        def net(z, t, r, emb, clean):
            return far_flow_map_velocity(
                self.student, z, t, r, emb, partition, clean_latents=clean if teacher_forcing else None
            )

        return net

    def __call__(self, batch, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        gen = step_generator(cfg.seed, step, micro)
        x, prompts = batch
        drop = self.ranks.rand(gen, len(prompts)) < cfg.null_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        cond, null = self.data.embed(prompts).to(self.device), self.data.null(len(prompts)).to(self.device)
        x = x.to(self.device)
        net = self.net if not cfg.causal else None
        aux = None
        if cfg.causal:
            # Chunk count and the auxiliary pass are drawn from a stream shared by all ranks.
            shared = step_generator(cfg.seed, step, micro, stream=1)
            k = chunk_count(len(cfg.chunk_partition), cfg.min_chunks, cfg.chunk_sample_prob, shared)
            part = tuple(cfg.chunk_partition[:k])
            if float(torch.rand((), generator=shared)) < cfg.bidirectional_aux_prob:
                # The whole clip, not the sampled chunk prefix: the reference runs this pass on
                # the latents before the chunk-count truncation.
                full = (x.shape[1],)
                aux = flow_matching_loss(self._causal_net(full, teacher_forcing=False), x, cond, null, cfg, gen, self.ranks,
                                         fused_guidance=cfg.guidance if cfg.bidirectional_aux_fused else None)[0]
            x = x[:, : sum(part)]
            net = self._causal_net(part)
        if cfg.method == "flow_matching":
            loss, m = flow_matching_loss(net, x, cond, null, cfg, gen, self.ranks)
            return (loss + aux if aux is not None else loss), m
        # The split is by position in the *global* batch; a rank's slice may hold no boundary
        # sample, and Eq. 7's mu then comes from the other ranks' (see flowmap_loss).
        types = sample_types(cfg.batch_size * self.ranks.world_size, cfg.boundary_frac, cfg.zero_frac)
        loss, m = flowmap_loss(net, x, cond, null, cfg, gen, types, self.ranks, self.reduce)
        if aux is not None:
            m["loss_bidirectional_aux"] = aux.item()
            loss = loss + aux
        return loss, m


def student_spec(cfg: Stage1Config) -> StudentSpec:
    return StudentSpec(source=cfg.init or cfg.teacher, causal=cfg.causal, chunk_partition=tuple(cfg.chunk_partition),
                       num_frames=cfg.num_frames, train_wan=cfg.method == "flow_matching", gate_value=cfg.gate_value,
                       timestep_cond=cfg.timestep_cond, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                       lora_targets=tuple(cfg.lora_targets))


class Stage1Method:
    """Stage 1 (or plain flow matching) of one student: one updater over the student."""

    weights = ("model", "ema")  # checkpoint keys of the student's tensors and their EMA

    def __init__(self, cfg: Stage1Config, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.name = self.title = f"stage1:{cfg.method}"
        self.shown = ("loss",)
        self.student, self.pipe = build_student(student_spec(cfg))
        self.wan = is_wan(self.student, self.pipe)
        self.data = training_batches(self.pipe, cfg.data, cfg.num_frames, cfg.seed)
        self.objective = Stage1Loss(cfg, self.student, self.data, self.wan, RankSlice(rank, world_size))
        self.updaters = [Updater.from_config(self.student, self.loss, cfg)]

    @staticmethod
    def sampler(cfg: Stage1Config) -> str:
        # A student trained by flow matching alone (the causal Table 2 baseline) knows only r = t.
        return "euler_cfg" if cfg.method == "flow_matching" else "flowmap"

    def prepare_for_training(self, env) -> None:
        prepare_student(self.student, env, self.cfg)
        self.objective.device = env.device
        self.updaters = [Updater.from_config(self.student, self.loss, self.cfg)]

    def batch(self, step: int, micro: int):
        return self.data.batch(step, self.cfg.batch_size, micro, self.cfg.grad_accum, self.rank, self.world_size)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        return self.objective(self.batch(step, micro), step, micro)

    def save_folder(self, dest) -> Path:
        final = self.updaters[0].ema.ema_copy(self.student)
        return save_student(dest, final, self.pipe, shift=self.cfg.shift, sampler=self.sampler(self.cfg), wan=self.wan,
                            training=training_rows(self.cfg, "stage1"), lora=self.cfg.lora_rank > 0)

    def export_checkpoint(self, run_dir, dest) -> Path:
        module, pipe = load_trained_student(run_dir, student_spec(self.cfg), self.weights)
        return save_student(dest, module, pipe, shift=self.cfg.shift, sampler=self.sampler(self.cfg),
                            wan=is_wan(module, pipe), training=training_rows(self.cfg, "stage1"), lora=self.cfg.lora_rank > 0)


def train_stage1(cfg: Stage1Config) -> Path:
    return run_method(Stage1Method, cfg)


METHOD = MethodInfo(Stage1Config, Stage1Method, train_stage1, "stage-1 model", student_spec)
