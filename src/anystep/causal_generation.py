"""Chunk-by-chunk generation with an AnyFlow-FAR model: text-, image- and video-to-video.

The causal student generates its clip one chunk at a time over the KV cache, so a finished chunk
is final and can be shown (written) before the next one starts. Conditioning frames (one image:
I2V; the first frames of a clip: V2V) are encoded with the folder's codec and stand in for the
first whole chunks; generation continues after them, exactly as diffusers' ``AnyFlowFARPipeline``
does with ``video_latents`` (flow-map Euler on the shifted grid, ``steps`` jumps a chunk, the
cache re-encoded at t = r = 0 after every chunk). Tests check both paths give the same clip.

Each chunk is sampled with the folder's own sampler, as :func:`anystep.sampling.generate` does for
a whole clip: flow-map jumps (AnyFlow), Euler with classifier-free guidance at r = t (a FAR student
trained by plain flow matching), or denoise-to-x0 and re-noise (the consistency baselines).
"""

from __future__ import annotations

from anystep.errors import UserError

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from anystep.flow.schedule import sampling_grid


class ConditioningError(UserError, ValueError):
    """Conditioning frames that cannot be used (one-line message)."""


def read_frames(path) -> torch.Tensor:
    """An image (one frame) or a video file -> pixels (F, 3, H, W) in [-1, 1]."""
    import imageio.v2 as imageio

    path = Path(path)
    if not path.is_file():
        raise ConditioningError(f"conditioning file not found: {path}")
    try:
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
            frames = np.asarray(imageio.imread(path))[None]
        else:
            frames = np.stack([np.asarray(f) for f in imageio.get_reader(path)])
    except Exception as e:  # imageio raises many types for unreadable files
        raise ConditioningError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if frames.ndim == 3:  # greyscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    frames = frames[..., :3].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


def context_latents(model, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Encode conditioning pixels (F, 3, H, W) and keep the whole chunks they cover: (1, f, C, h, w)."""
    from anystep.models.latents import encode_pixels, temporal_factor

    if frames.shape[-2:] != (height, width):
        raise ConditioningError(f"conditioning frames are {frames.shape[-2]}x{frames.shape[-1]}, the clip is {height}x{width}")
    ft = temporal_factor(model.codec)
    usable = ((frames.shape[0] - 1) // ft) * ft + 1  # the codec's 1 + k * ft rule
    lat = encode_pixels(model.codec, frames[:usable][None])
    part = list(model.transformer.config.chunk_partition)
    covered, n = 0, 0
    while n < len(part) and covered + part[n] <= lat.shape[1]:
        covered += part[n]
        n += 1
    if n == 0:
        raise ConditioningError(f"{frames.shape[0]} conditioning frame(s) do not cover the first chunk ({part[0]} latent frames)")
    if n == len(part):
        raise ConditioningError("the conditioning frames cover the whole clip: nothing is left to generate")
    return lat[:, :covered]


@torch.no_grad()
def generate_causal(model, prompts: list[str], steps: int, seed: int = 0, num_frames: int = 7, height: int = 32,
                    width: int = 32, context: torch.Tensor | None = None,
                    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                    guidance_scale: float | None = None) -> torch.Tensor:
    """Normalised latents (B, F, C, h, w) of a FAR model's clip, chunk by chunk.

    ``context`` (1 or B, f, C, h, w) fixes the first whole chunks; ``on_chunk(k, latents_so_far)``
    is called after every chunk. The initial noise is the one :func:`anystep.sampling.generate_latents`
    draws (clip i from seed ``seed + i``). ``guidance_scale`` applies to a student sampled with
    Euler + CFG (default 4.0); flow-map students are guidance-fused and take none."""
    from anystep.models.text import encode_prompts
    from anystep.rollout.flowmap import CausalRolloutState
    from anystep.sampling import DEFAULT_TEACHER_GUIDANCE, initial_noise

    if model.kind != "anyflow_far":
        raise ConditioningError(f"chunk-by-chunk generation needs an AnyFlow-FAR folder, got a {model.kind!r} folder")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pipe = model.pipe
    part = tuple(int(c) for c in model.transformer.config.chunk_partition)
    shape = model.latent_shape(num_frames, height, width)
    if shape[0] != sum(part):
        raise ValueError(f"{shape[0]} latent frames do not match the chunk partition {list(part)} (sum {sum(part)})")
    noise = initial_noise(shape, len(prompts), seed)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(prompts), model.max_sequence_length)
    shift = float(getattr(pipe.scheduler.config, "shift", 5.0))
    n_ctx = 0
    if context is not None:
        context = context.expand(len(prompts), *context.shape[1:]).float()
        while n_ctx < len(part) and sum(part[: n_ctx + 1]) <= context.shape[1]:
            n_ctx += 1
    guided = model.sampler == "euler_cfg"
    if guided:
        # The conditional and the null half run as one batch and share every committed chunk.
        null = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), model.max_sequence_length)
        cond = torch.cat([cond, null])
    state = CausalRolloutState(model.transformer, cond, part, (cond.shape[0], *noise.shape[1:]))
    g = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)
    sample_chunk = _chunk_sampler(model.sampler, state, steps, shift, seed, g)
    chunks = []
    for k in range(len(part)):
        sl = state.chunk_slice(k)
        z = context[:, sl] if k < n_ctx else sample_chunk(noise[:, sl].float())
        chunks.append(z)
        state.commit(torch.cat([z, z]) if guided else z)
        if on_chunk is not None:
            on_chunk(k, torch.cat(chunks, dim=1))
    return torch.cat(chunks, dim=1)


def _chunk_sampler(sampler: str, state, steps: int, shift: float, seed: int, guidance: float):
    """``z_noise -> z_clean`` for the current chunk of ``state`` with the folder's sampler."""
    if sampler == "euler_cfg":
        from anystep.rollout.euler import euler_sample

        grid = [float(v) for v in sampling_grid(steps, shift)]
        return lambda z: euler_sample(state.velocity, z, grid, guidance)
    if sampler == "consistency":
        from anystep.rollout.consistency import consistency_grid, consistency_steps

        grid = consistency_grid(steps, shift)
        # One re-noising stream over the chunks, drawn in the order the whole-clip sampler draws it.
        gen = torch.Generator().manual_seed(int(seed))
        return lambda z: consistency_steps(state.velocity, z, grid, len(grid) - 1, gen)[-1]
    grid = [float(v) for v in sampling_grid(steps, shift)]

    def flowmap(z):
        for t, r in zip(grid[:-1], grid[1:]):
            if t != r:
                z = z - (t - r) * state.velocity(z, t, r).float()
        return z

    return flowmap
