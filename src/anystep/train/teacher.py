"""Teacher training: plain flow matching of a tiny ``WanTransformer3DModel`` on MovingDigits.

Logit-normal time with the shift, 10% null-prompt dropout, AdamW, EMA. The text encoder can be
trained jointly (the toy text path starts from random weights, so it has to learn what the words
mean); the trained encoder ships inside the teacher folder and stays frozen for every later stage.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from transformers import UMT5EncoderModel

from anystep.config import ConfigError
from anystep.data.moving_digits import MovingDigits, WorldConfig, make_prompt, opposite_direction, parse_prompt
from anystep.flow.matching import per_sample_mse, squared_error, training_sigma, velocity_target, x0_from_velocity
from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS, add_noise
from anystep.models.card import training_rows
from anystep.models.codec import SpaceToDepthCodec, fit_codec, project_codec
from anystep.models.folders import save_teacher_folder
from anystep.models.text import build_tiny_umt5, build_word_tokenizer, encode_prompts
from anystep.models.toy import build_toy_transformer, project_transformer
from anystep.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, read_meta
from anystep.train.common import warmup_cooldown_lambda
from anystep.train.loop import run_method
from anystep.train.registry import MethodInfo
from anystep.train.updater import Updater


@dataclass
class TeacherConfig:
    out: str = "runs/teacher"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup: int = 200
    # Linear decay of the learning rate to zero over the last `cooldown` steps (0: constant).
    cooldown: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 500
    shift: float = 5.0
    # Fraction of each batch whose t is drawn uniformly in (0, 1) instead of logit-normal + shift.
    # On a 32x32 canvas the shifted logit-normal puts ~5% of samples below sigma 0.5, where the
    # digit's shape forms; the uniform share covers that range (see README, teacher provenance).
    uniform_t_frac: float = 0.0
    null_prob: float = 0.1  # share of prompts replaced by the null prompt (the unconditional branch)
    train_text_encoder: bool = True  # train the tiny UMT5 jointly (students keep it frozen)
    # Experimental: weight of a hinge term asking the flow-matching error with the true prompt to
    # sit below the error with the direction reversed (left <-> right, up <-> down) by a relative
    # margin. See README, teacher provenance: plain flow matching leaves the teacher blind to the sign.
    sign_weight: float = 0.0  # experimental: weight of the direction-sign hinge (0: off)
    sign_margin: float = 0.02  # the sign hinge's relative margin
    # Keep the jointly trained text encoder from merging the two directions of an axis: a hinge
    # asking the embedding distance between a prompt and its direction-reversed twin to be at least
    # `text_sep_ratio` x the distance to a prompt with another colour, digit or axis. A teacher that
    # ignores the sign merged "left" and "right" (README, teacher provenance), which leaves every
    # student, whose encoder is the teacher's frozen one, no word to learn the sign from.
    text_sep_weight: float = 0.0
    text_sep_ratio: float = 0.5  # the separation hinge's ratio
    text_lr_mult: float = 1.0  # the text encoder's learning rate as a multiple of lr
    num_frames: int = 7
    # A share of the steps trains on longer clips, so the teacher that scores causal students'
    # 13-frame rollouts (DMD's real score, the FAR fine-tune's target) has seen that length.
    # Each step's length is a function of (seed, step) alone, so a resumed run replays it.
    long_num_frames: int = 0
    long_frac: float = 0.0  # share of the steps on long_num_frames clips
    # A fine-tuning phase: start model, text encoder and their EMAs from this teacher checkpoint
    # (or from a teacher folder's weights, e.g. the shipped models/toy-teacher) with a fresh
    # optimiser and schedule (the step counter restarts at 0).
    init: str = ""  # fine-tune: start from this teacher checkpoint or folder, fresh optimiser and schedule
    # The codec marks the first latent frame as the Wan VAE's causal encoder does (codec.py): an
    # absolute temporal anchor for a transformer whose positions are all relative.
    anchor_first_frame: bool = False
    # The gentler anchor (codec.py): frame 0 shifted by this many channel stds, its shape kept.
    first_frame_offset: float = 0.0
    # 0: the exact codec (48 channels a 4x4 block). N: each normalised block projected onto its N
    # leading directions, fitted on training clips (codec.py), so that the transformer's output can
    # span a whole token (toy.output_span). With `init` an exact-codec folder, the codec is fitted
    # and the folder's transformer carried over to it (toy.project_transformer) before training.
    codec_channels: int = 28
    seed: int = 0
    log_every: int = 25
    log_to: tuple[str, ...] = ("tensorboard",)  # besides metrics.jsonl: tensorboard (RUN/tensorboard/), wandb; none: neither
    probe_every: int = 250  # steps between text-sensitivity probes (logged beside the loss)
    ckpt_every: int = 500
    threads: int = 0
    transformer: dict = field(default_factory=dict)  # overrides of the toy WanTransformer3DModel config


def _latents(codec, videos: np.ndarray) -> torch.Tensor:
    return codec.pixels_to_latents(torch.from_numpy(videos))


@torch.no_grad()
def prompt_sensitivity(model, tokenizer, text_encoder, codec, world: WorldConfig, seed: int = 123, n: int = 32):
    """Relative change of the velocity prediction when one prompt word is swapped.

    A cheap go/no-go signal: a teacher that ignores the digit or direction word shows ~0 there
    while colour is large (docs/design.md section 4). ``sign`` swaps the direction for its opposite
    (left <-> right, up <-> down): a teacher that knows the axis of motion but not which way along it
    scores ~0 there while ``direction`` is large.
    """
    ds = MovingDigits("train", world, seed=seed)
    videos, prompts = ds.batch(range(n))
    x = _latents(codec, videos)
    g = torch.Generator().manual_seed(seed)
    sigma = torch.full((n,), 0.7)
    z = add_noise(x, torch.randn(x.shape, generator=g), sigma)
    rng = np.random.default_rng(seed)

    def swapped(kind):
        out = []
        for p in prompts:
            c, d, m = parse_prompt(p)
            if kind == "color":
                c = rng.choice([o for o in world.colors if o != c])
            elif kind == "digit":
                d = int(rng.choice([o for o in range(10) if o != d]))
            elif kind == "sign":
                m = opposite_direction(m)
            else:
                m = rng.choice([o for o in world.directions if o != m])
            out.append(make_prompt(c, d, m))
        return out

    def pred(ps):
        emb = encode_prompts(tokenizer, text_encoder, ps)
        return model(z.permute(0, 2, 1, 3, 4), sigma * NUM_TRAIN_TIMESTEPS, emb).sample

    base = pred(prompts)
    scale = base.pow(2).mean().sqrt()
    out = {k: float((pred(swapped(k)) - base).pow(2).mean().sqrt() / scale) for k in ("color", "digit", "direction", "sign")}
    out["temporal"] = temporal_gain(model, tokenizer, text_encoder, x, z, sigma, prompts)
    return out


@torch.no_grad()
def temporal_gain(model, tokenizer, text_encoder, x, z, sigma, prompts) -> float:
    """How much the other frames help: x0 error of each frame denoised alone over the error with
    the whole clip, minus 1. Every frame is a shifted copy of the others, so a denoiser that pools
    over time gains a lot; one that denoises frame by frame scores ~0 (the shipped teacher: ~0.05
    at sigma 0.7 -- see README, teacher provenance)."""
    n, f = x.shape[:2]
    emb = encode_prompts(tokenizer, text_encoder, prompts)

    def x0_error(zz, ss, ee):
        v = model(zz.permute(0, 2, 1, 3, 4), ss * NUM_TRAIN_TIMESTEPS, ee).sample.permute(0, 2, 1, 3, 4)
        return (x0_from_velocity(zz, v, ss) - x.reshape(zz.shape)).pow(2).mean()

    whole = x0_error(z, sigma, emb)
    alone = x0_error(z.reshape(n * f, 1, *z.shape[2:]), sigma.repeat_interleave(f), emb.repeat_interleave(f, 0))
    return float(alone / whole - 1.0)


def sign_hinge(model, tokenizer, text_encoder, z, sigma, target, pred, prompts, margin: float) -> torch.Tensor:
    """Mean over prompted clips of ``relu(L_true - (1 - margin) L_reversed)``: the per-clip
    flow-matching error with the true prompt should beat the error with the direction reversed.

    The reversed prompt describes the same clip played backwards, so only a model that ties the
    direction word to the order of frames can win this. Null-prompt rows are left out.
    """
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        return pred.new_zeros(())
    flipped = []
    for i in keep:
        c, d, m = parse_prompt(prompts[i])
        flipped.append(make_prompt(c, d, opposite_direction(m)))
    idx = torch.tensor(keep)
    emb_f = encode_prompts(tokenizer, text_encoder, flipped)
    pred_f = model(z[idx].permute(0, 2, 1, 3, 4), sigma[idx] * NUM_TRAIN_TIMESTEPS, emb_f).sample.permute(0, 2, 1, 3, 4)
    err_t = per_sample_mse(pred[idx], target[idx])
    err_f = per_sample_mse(pred_f, target[idx])
    return F.relu(err_t - (1.0 - margin) * err_f).mean()


def text_separation_hinge(tokenizer, text_encoder, prompts, ratio: float, world: WorldConfig,
                          rng: np.random.Generator) -> torch.Tensor:
    """Mean over prompted rows of ``relu(ratio * d_ref - d_rev) / d_ref``.

    ``d_rev`` is the RMS distance between the embeddings of a prompt and of its direction-reversed
    twin; ``d_ref`` (no gradient) the distance to the prompt with one other word swapped - another
    colour, digit or axis, drawn from ``rng``. Null-prompt rows are left out.
    """
    keep = [p for p in prompts if p]
    if not keep:
        return torch.zeros(())
    rev, ref = [], []
    for p in keep:
        c, d, m = parse_prompt(p)
        rev.append(make_prompt(c, d, opposite_direction(m)))
        slot = int(rng.integers(3))
        if slot == 0:
            c = str(rng.choice([o for o in world.colors if o != c]))
        elif slot == 1:
            d = int(rng.choice([o for o in range(10) if o != d]))
        else:
            m = str(rng.choice([o for o in world.directions if o not in (m, opposite_direction(m))]))
        ref.append(make_prompt(c, d, m))
    e = encode_prompts(tokenizer, text_encoder, keep + rev + ref).float()
    n = len(keep)
    base, e_rev, e_ref = e[:n], e[n : 2 * n], e[2 * n :]
    d_rev = (base - e_rev).pow(2).flatten(1).mean(1).add(1e-12).sqrt()  # finite gradient at a merged pair
    d_ref = (base - e_ref).pow(2).flatten(1).mean(1).sqrt().detach()
    return (F.relu(ratio * d_ref - d_rev) / d_ref.clamp_min(1e-8)).mean()


def _init_weights(path: str, both: torch.nn.Module) -> dict | None:
    """Start a fine-tuning phase: ``both`` (transformer and text encoder) from a teacher folder (its
    weights are the EMA weights it was exported with, and start the EMA too) or from a teacher
    run's checkpoint (its weights; returns its EMA shadow to start the EMA from)."""
    try:
        if has_checkpoint(path):
            weights = {n: p.detach() for n, p in both.named_parameters() if p.requires_grad}
            ema = {n: torch.empty_like(p) for n, p in weights.items()}
            load_checkpoint(path, {"model": weights, "ema": ema}, single_process=True)
            return ema
        # The weights only (the config check made sure it is a teacher folder): one whose text
        # padding predates today's is a valid starting point.
        both["transformer"].load_state_dict(
            WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer").state_dict())
        both["text_encoder"].load_state_dict(
            UMT5EncoderModel.from_pretrained(str(path), subfolder="text_encoder").state_dict())
        return None
    except (RuntimeError, OSError, CheckpointError) as e:
        kinds = [k for k in ("Missing key", "Unexpected key", "size mismatch") if k in str(e)]
        raise CheckpointError(f"init={path} does not fit this run's transformer or text encoder "
                              f"({', '.join(kinds) or type(e).__name__}); match `transformer` to it") from None


def clip_length(cfg: TeacherConfig, step: int) -> int:
    """Frames in the training batch of ``step``: ``long_num_frames`` with probability ``long_frac``."""
    if cfg.long_num_frames <= 0 or cfg.long_frac <= 0:
        return cfg.num_frames
    u = np.random.default_rng([cfg.seed, step, 0x5EED]).random()
    return cfg.long_num_frames if u < cfg.long_frac else cfg.num_frames


class TeacherMethod:
    """Flow matching of the toy teacher and (optionally) its text encoder: one updater over both.

    Draws come from torch's global generator, seeded once (the recipe the shipped teacher was
    trained with); the checkpoint carries its state, so a resumed run draws what an uninterrupted
    one would have. The logged ``loss`` is the flow-matching term; the experimental hinges are
    logged beside it and added to what is minimised.
    """

    name = title = "teacher"
    shown = ("loss",)

    def __init__(self, cfg: TeacherConfig, rank: int = 0, world_size: int = 1):
        if world_size > 1:
            raise ValueError("the toy teacher trains in one process")
        self.cfg = cfg
        self.world = WorldConfig(num_frames=cfg.num_frames)
        self.data = MovingDigits("train", self.world, seed=cfg.seed)
        self.long_data = None
        if cfg.long_num_frames > 0 and cfg.long_frac > 0:
            long_world = WorldConfig(num_frames=cfg.long_num_frames)
            long_world.validate()
            self.long_data = MovingDigits("train", long_world, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        resume = has_checkpoint(cfg.out)
        init = cfg.init if cfg.init and not resume else ""
        # A resumed run or a fine-tune keeps the latent space its weights were trained in: the codec
        # a checkpoint records, or a teacher folder's own; a fresh run fits one on training clips.
        if resume or (init and has_checkpoint(init)):
            codec_cfg = read_meta(cfg.out if resume else init)["codec"]
        elif init:
            codec_cfg = dict(SpaceToDepthCodec.from_pretrained(Path(init) / "vae").config)
        else:
            codec_cfg = None
        if codec_cfg is not None:
            self.codec = SpaceToDepthCodec.from_config({**codec_cfg, "anchor_first_frame": cfg.anchor_first_frame,
                                                        "first_frame_offset": cfg.first_frame_offset})
        else:
            self.codec = fit_codec(torch.from_numpy(self.data.batch(range(256))[0]),
                                   anchor_first_frame=cfg.anchor_first_frame, first_frame_offset=cfg.first_frame_offset)
        if self.codec.projected and cfg.codec_channels != self.codec.config.channels:
            where = cfg.out if resume else init
            raise ConfigError(f"{where} trained on a codec of {self.codec.config.channels} channels; "
                              f"set codec_channels: {self.codec.config.channels} (or start from an exact-codec folder)")
        if resume and not self.codec.projected and cfg.codec_channels > 0:
            raise ConfigError(f"{cfg.out} trained on the exact codec; resume it with codec_channels: 0")
        project = cfg.codec_channels > 0 and not self.codec.projected
        if project and not init:  # a fresh run: the projected codec from the start, nothing to carry over
            self.codec = self._projected(self.codec, cfg.codec_channels)
            project = False
        if project and has_checkpoint(init):
            raise ConfigError(f"codec_channels={cfg.codec_channels} carries a teacher folder over to a projected "
                              f"codec; init={init} is a run checkpoint: export it first (anystep export)")
        self.tokenizer = build_word_tokenizer()
        self.text_encoder = build_tiny_umt5(len(self.tokenizer), seed=cfg.seed)
        self.text_encoder.requires_grad_(cfg.train_text_encoder)
        z = self.codec.config.z_dim
        with warnings.catch_warnings():
            if project:  # the exact-codec width only holds the init weights until they are carried over
                warnings.simplefilter("ignore")
            self.model = build_toy_transformer(**{"in_channels": z, "out_channels": z, **cfg.transformer})
        self.both = torch.nn.ModuleDict({"transformer": self.model, "text_encoder": self.text_encoder})
        ema = _init_weights(init, self.both) if init else None
        if project:  # carry the init folder's transformer over to the projected codec
            self.codec = self._projected(self.codec, cfg.codec_channels)
            self.model = project_transformer(self.model, torch.tensor(self.codec.config.basis))
            self.both = torch.nn.ModuleDict({"transformer": self.model, "text_encoder": self.text_encoder})
        self.model.train()
        self._build_updaters()
        if ema is not None:
            for k, v in ema.items():
                self.updaters[0].ema.shadow[k].copy_(v)

    def _projected(self, exact: SpaceToDepthCodec, channels: int) -> SpaceToDepthCodec:
        """The exact codec's projected twin, its basis fitted on 1024 training clips."""
        return project_codec(exact, torch.from_numpy(self.data.batch(range(1024))[0]), channels)

    def _build_updaters(self) -> None:
        c = self.cfg
        groups = [{"params": list(self.model.parameters()), "lr": c.lr}]
        if c.train_text_encoder:
            groups.append({"params": list(self.text_encoder.parameters()), "lr": c.lr * c.text_lr_mult})
        self.updaters = [Updater.from_config(self.both, self.loss, c, groups=groups,
                                             lr_lambda=warmup_cooldown_lambda(c.warmup, c.steps, c.cooldown))]

    def prepare_for_training(self, env) -> None:
        """One process on the CPU: nothing to place or shard."""

    def batch(self, step: int):
        """(pixels, prompts) of ``step``: clips ``[step * B, (step + 1) * B)`` of the stream."""
        idx = np.arange(step * self.cfg.batch_size, (step + 1) * self.cfg.batch_size)
        src = self.long_data if clip_length(self.cfg, step) != self.cfg.num_frames else self.data
        return src.batch(idx)

    def loss(self, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        return self.loss_on(self.batch(step), step)

    def loss_on(self, batch, step: int) -> tuple[torch.Tensor, dict]:
        cfg, model, tokenizer, text_encoder = self.cfg, self.model, self.tokenizer, self.text_encoder
        videos, prompts = batch
        drop = torch.rand(len(prompts)) < cfg.null_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x = _latents(self.codec, videos)
        noise = torch.randn_like(x)
        sigma = training_sigma(len(x), cfg.shift)
        n_uniform = int(round(cfg.uniform_t_frac * len(x)))
        if n_uniform:
            sigma[:n_uniform] = torch.rand(n_uniform)
        z = add_noise(x, noise, sigma)
        with torch.set_grad_enabled(cfg.train_text_encoder):
            emb = encode_prompts(tokenizer, text_encoder, prompts)
        pred = model(z.permute(0, 2, 1, 3, 4), sigma * NUM_TRAIN_TIMESTEPS, emb).sample.permute(0, 2, 1, 3, 4)
        target = velocity_target(x, noise)
        # A mean over every element (equal-sized clips: the mean of per_sample_mse, up to rounding).
        loss = squared_error(pred, target).mean()
        total, metrics = loss, {"loss": loss.item()}
        if cfg.sign_weight > 0:
            sign = sign_hinge(model, tokenizer, text_encoder, z, sigma, target, pred, prompts, cfg.sign_margin)
            total = total + cfg.sign_weight * sign
            metrics["sign_hinge"] = sign.item()
        if cfg.text_sep_weight > 0 and cfg.train_text_encoder:
            rng = np.random.default_rng([cfg.seed, step, 0x7E47])
            sep = text_separation_hinge(tokenizer, text_encoder, prompts, cfg.text_sep_ratio, self.world, rng)
            total = total + cfg.text_sep_weight * sep
            metrics["text_sep_hinge"] = sep.item()
        return total, metrics

    def extra_metrics(self, step: int) -> dict | None:
        """The prompt-sensitivity probe every ``probe_every`` steps and at the end."""
        if step % self.cfg.probe_every and step != self.cfg.steps:
            return None
        self.model.eval()
        probe = prompt_sensitivity(self.model, self.tokenizer, self.text_encoder, self.codec, self.world)
        self.model.train()
        return {f"probe_{k}": v for k, v in probe.items()}

    def extra_state(self) -> tuple[dict, dict]:
        """The global generator's state (tensors) and the codec (JSON) the weights are trained in."""
        return {"rng": torch.get_rng_state()}, {"codec": {k: v for k, v in self.codec.config.items() if not k.startswith("_")}}

    def load_extra_state(self, tensors: dict, meta: dict) -> None:
        torch.set_rng_state(tensors["rng"])

    def save_folder(self, dest) -> Path:
        final = self.updaters[0].ema.ema_copy(self.both).eval()
        return save_teacher_folder(dest, final["transformer"], final["text_encoder"], self.tokenizer, self.codec,
                                   shift=self.cfg.shift, training=training_rows(self.cfg, "teacher"))


def train_teacher(cfg: TeacherConfig) -> Path:
    return run_method(TeacherMethod, cfg)


METHOD = MethodInfo(TeacherConfig, TeacherMethod, train_teacher, "teacher")
