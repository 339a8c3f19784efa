"""Teacher training: plain flow matching of a tiny ``WanTransformer3DModel`` on MovingDigits.

Logit-normal time with the shift, 10% null-prompt dropout, AdamW, EMA. The text encoder can be
trained jointly (the toy text path starts from random weights, so it has to learn what the words
mean); the trained encoder ships inside the teacher folder and stays frozen for every later stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from anystep.data.moving_digits import MovingDigits, WorldConfig, make_prompt, opposite_direction, parse_prompt, DIGIT_WORDS
from anystep.flow.matching import per_sample_mse, squared_error, training_sigma, velocity_target, x0_from_velocity
from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS, add_noise
from anystep.models.codec import SpaceToDepthCodec, fit_codec
from anystep.models.text import build_tiny_umt5, build_word_tokenizer, encode_prompts
from anystep.models.toy import TOY_TRANSFORMER, build_toy_transformer
from anystep.train.checkpoint import CheckpointError
from anystep.train.common import EMA, JsonlLogger, atomic_torch_save, rng_state, set_rng_state, warmup_cooldown_lambda
from anystep.models.card import training_rows
from anystep.train.registry import MethodInfo


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
    null_prob: float = 0.1
    train_text_encoder: bool = True
    # Experimental: weight of a hinge term asking the flow-matching error with the true prompt to
    # sit below the error with the direction reversed (left <-> right, up <-> down) by a relative
    # margin. See README, teacher provenance: plain flow matching leaves the teacher blind to the sign.
    sign_weight: float = 0.0
    sign_margin: float = 0.02
    # Keep the jointly trained text encoder from merging the two directions of an axis: a hinge
    # asking the embedding distance between a prompt and its direction-reversed twin to be at least
    # `text_sep_ratio` x the distance to a prompt with another colour, digit or axis. A teacher that
    # ignores the sign merged "left" and "right" (README, teacher provenance), which leaves every
    # student, whose encoder is the teacher's frozen one, no word to learn the sign from.
    text_sep_weight: float = 0.0
    text_sep_ratio: float = 0.5
    text_lr_mult: float = 1.0
    num_frames: int = 7
    # A share of the steps trains on longer clips, so the teacher that scores causal students'
    # 13-frame rollouts (DMD's real score, the FAR fine-tune's target) has seen that length.
    # Each step's length is a function of (seed, step) alone, so a resumed run replays it.
    long_num_frames: int = 0
    long_frac: float = 0.0
    # A fine-tuning phase: start model, text encoder and their EMAs from this teacher checkpoint
    # (or from a teacher folder's weights, e.g. the shipped models/toy-teacher) with a fresh
    # optimiser and schedule (the step counter restarts at 0).
    init: str = ""
    # The codec marks the first latent frame as the Wan VAE's causal encoder does (codec.py): an
    # absolute temporal anchor for a transformer whose positions are all relative.
    anchor_first_frame: bool = False
    # The gentler anchor (codec.py): frame 0 shifted by this many channel stds, its shape kept.
    first_frame_offset: float = 0.0
    seed: int = 0
    log_every: int = 25
    probe_every: int = 250
    ckpt_every: int = 500
    threads: int = 0
    transformer: dict = field(default_factory=dict)


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


def _init_state(path: str) -> dict:
    """Weights to start a fine-tuning phase from: a teacher checkpoint, or a teacher folder (its
    weights are the EMA weights it was exported with, so they start both the model and its EMA)."""
    if not Path(path).is_dir():
        return torch.load(path, weights_only=False)
    from anystep.models.folders import load_pipeline

    pipe = load_pipeline(path)
    model_sd = pipe.transformer.state_dict()
    text_sd = pipe.text_encoder.state_dict()
    shadow = lambda sd, mod: {k: sd[k] for k, _ in mod.named_parameters()}  # noqa: E731
    return {
        "model": model_sd,
        "text_encoder": text_sd,
        "ema": {"decay": 0.0, "start": 0, "shadow": shadow(model_sd, pipe.transformer)},
        "ema_text": {"decay": 0.0, "start": 0, "shadow": shadow(text_sd, pipe.text_encoder)},
    }


def clip_length(cfg: TeacherConfig, step: int) -> int:
    """Frames in the training batch of ``step``: ``long_num_frames`` with probability ``long_frac``."""
    if cfg.long_num_frames <= 0 or cfg.long_frac <= 0:
        return cfg.num_frames
    u = np.random.default_rng([cfg.seed, step, 0x5EED]).random()
    return cfg.long_num_frames if u < cfg.long_frac else cfg.num_frames


def train_teacher(cfg: TeacherConfig) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    world = WorldConfig(num_frames=cfg.num_frames)
    data = MovingDigits("train", world, seed=cfg.seed)
    long_data = None
    if cfg.long_num_frames > 0 and cfg.long_frac > 0:
        long_world = WorldConfig(num_frames=cfg.long_num_frames)
        long_world.validate()
        long_data = MovingDigits("train", long_world, seed=cfg.seed)
    torch.manual_seed(cfg.seed)

    # Codec statistics from a fixed sample of training clips; a fine-tune of a teacher folder keeps
    # that folder's statistics (its weights were trained in those latents).
    # A resumed run or a fine-tune keeps the latent space its weights were trained in: a teacher
    # folder's codec, or the codec a checkpoint recorded (checkpoints written before 2026-12-02 did
    # not record one and are refitted from this run's seed).
    ckpt_path = out / "checkpoint.pt"
    resume = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    init = _init_state(cfg.init) if cfg.init and resume is None else None
    codec_cfg = (resume or init or {}).get("codec")
    if codec_cfg is None and cfg.init and Path(cfg.init).is_dir():
        codec_cfg = dict(SpaceToDepthCodec.from_pretrained(Path(cfg.init) / "vae").config)
    if codec_cfg is not None:
        codec = SpaceToDepthCodec.from_config({**codec_cfg, "anchor_first_frame": cfg.anchor_first_frame,
                                               "first_frame_offset": cfg.first_frame_offset})
    else:
        codec = fit_codec(torch.from_numpy(data.batch(range(256))[0]), anchor_first_frame=cfg.anchor_first_frame,
                          first_frame_offset=cfg.first_frame_offset)
    tokenizer = build_word_tokenizer()
    text_encoder = build_tiny_umt5(len(tokenizer), seed=cfg.seed)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    model = build_toy_transformer(**cfg.transformer)
    model.train()

    params = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if cfg.train_text_encoder:
        params.append({"params": list(text_encoder.parameters()), "lr": cfg.lr * cfg.text_lr_mult})
    trainable = [p for g in params for p in g["params"]]
    opt = torch.optim.AdamW(params, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cooldown_lambda(cfg.warmup, cfg.steps, cfg.cooldown))
    ema = EMA(model, cfg.ema_decay, cfg.ema_start)
    ema_text = EMA(text_encoder, cfg.ema_decay, cfg.ema_start) if cfg.train_text_encoder else None

    step = 0
    if init is not None:
        try:
            model.load_state_dict(init["model"])
            text_encoder.load_state_dict(init["text_encoder"])
        except RuntimeError as e:
            if created and not any(out.iterdir()):
                out.rmdir()  # a refused run leaves no folder behind
            kinds = [k for k in ("Missing key", "Unexpected key", "size mismatch") if k in str(e)]
            raise CheckpointError(f"init={cfg.init} does not fit this run's transformer or text encoder "
                                  f"({', '.join(kinds) or type(e).__name__}); match `transformer` to it") from None
        ema.load_state_dict(init["ema"])
        ema.start = cfg.ema_start
        if ema_text is not None and init.get("ema_text"):
            ema_text.load_state_dict(init["ema_text"])
            ema_text.start = cfg.ema_start
    if resume is not None:
        state = resume
        model.load_state_dict(state["model"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        from anystep.train.runfolder import apply_resumed_hyperparams

        lrs = [cfg.lr] + ([cfg.lr * cfg.text_lr_mult] if cfg.train_text_encoder else [])
        apply_resumed_hyperparams(opt, sched, lrs, cfg.betas, cfg.weight_decay)
        ema.load_state_dict(state["ema"])
        if ema_text is not None:
            ema_text.load_state_dict(state["ema_text"])
        step = state["step"]
        set_rng_state(state["rng"])
    logger = JsonlLogger(out / "metrics.jsonl")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def save_ckpt():
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "ema": ema.state_dict(),
                "ema_text": ema_text.state_dict() if ema_text else None,
                "step": step,
                "rng": rng_state(),
                "codec": {k: v for k, v in codec.config.items() if not k.startswith("_")},
            },
            ckpt_path,
        )

    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", dynamic_ncols=True)
    while step < cfg.steps:
        idx = np.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size)
        src = long_data if clip_length(cfg, step) != cfg.num_frames else data
        videos, prompts = src.batch(idx)
        drop = torch.rand(len(prompts)) < cfg.null_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        x = _latents(codec, videos)
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
        loss_total = loss
        sign_term = sep_term = None
        if cfg.sign_weight > 0:
            sign_term = sign_hinge(model, tokenizer, text_encoder, z, sigma, target, pred, prompts, cfg.sign_margin)
            loss_total = loss_total + cfg.sign_weight * sign_term
        if cfg.text_sep_weight > 0 and cfg.train_text_encoder:
            rng = np.random.default_rng([cfg.seed, step, 0x7E47])
            sep_term = text_separation_hinge(tokenizer, text_encoder, prompts, cfg.text_sep_ratio, world, rng)
            loss_total = loss_total + cfg.text_sep_weight * sep_term
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        ema.update(model, step)
        if ema_text is not None:
            ema_text.update(text_encoder, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        rec = {"step": step, "loss": loss.item(), "grad_norm": float(gn), "lr": sched.get_last_lr()[0], "time": time.time() - t0}
        if sign_term is not None:
            rec["sign_hinge"] = sign_term.item()
        if sep_term is not None:
            rec["text_sep_hinge"] = sep_term.item()
        if step % cfg.probe_every == 0 or step == cfg.steps:
            model.eval()
            rec.update({f"probe_{k}": v for k, v in prompt_sensitivity(model, tokenizer, text_encoder, codec, world).items()})
            model.train()
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
        if step % cfg.log_every == 0 or "probe_color" in rec:
            logger.log(rec)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_ckpt()
    bar.close()

    from anystep.models.folders import save_teacher_folder

    final_model = ema.ema_copy(model).eval()
    final_text = (ema_text.ema_copy(text_encoder) if ema_text else text_encoder).eval()
    save_teacher_folder(out / "model", final_model, final_text, tokenizer, codec, shift=cfg.shift,
                        training=training_rows(cfg, "teacher"))
    return out / "model"


METHOD = MethodInfo(TeacherConfig, None, train_teacher, "teacher")
