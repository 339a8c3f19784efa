"""Any-step generation from a model folder: one path for every kind of model and sampler.

The folder says how it is sampled (:mod:`anystep.models.loaded`); :func:`generate_latents` binds
the network and the prompts into a velocity function and runs the folder's sampler
(:mod:`anystep.flow.solvers`) on the shifted grid ``shift(linspace(1, 0, N + 1))``:

* a teacher, or a student trained by plain flow matching: Euler with classifier-free guidance at
  r = t (2 network calls a step; default scale 4);
* an AnyFlow student: flow-map Euler ``z_r = z_t - (t - r) u(z_t, t, r)``, no guidance (1 call a step);
* a consistency student: predict x0 and re-noise, at any step count.

A bidirectional model denoises the whole clip at once; an AnyFlow-FAR model generates chunk by
chunk over its KV cache (:class:`anystep.models.causal_state.CausalRolloutState`), each chunk with
the same sampler, optionally continuing given first chunks (image- / video-to-video) and reporting
every finished chunk. Sampling teacher and students on one grid keeps "teacher at 4 x 2 NFE vs
AnyFlow at 4 NFE" a like-for-like comparison.

Initial noise is drawn per clip from ``seed`` (clip i of a batch uses ``seed + i``), so a clip
does not depend on what else is in its batch; the consistency sampler's re-noising comes from one
generator seeded with ``seed``, drawn chunk after chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.utils import logging as dlogging

from anystep.flow.solvers import consistency_grid, consistency_sample, euler, flow_map_euler, shifted_grid
from anystep.models.causal_state import CausalRolloutState
from anystep.models.loaded import LoadedModel, load_model
from anystep.models.students import check_chunk_partition
from anystep.models.text import encode_prompts
from anystep.models.velocity import bidirectional_velocity, teacher_velocity

__all__ = ["DEFAULT_TEACHER_GUIDANCE", "LoadedModel", "generate", "generate_latents", "initial_noise",
           "latents_to_video", "load_model", "nfe"]

DEFAULT_TEACHER_GUIDANCE = 4.0


def initial_noise(shape_one: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """(n, *shape_one) standard normal noise in the AnyFlow layout (frames, channels, h, w), clip i
    drawn from generator seed ``seed + i`` in diffusers' pipeline layout (channels, frames, h, w): a
    pipeline called with ``generator=torch.Generator().manual_seed(seed + i)`` starts from the same
    noise."""
    f, c = shape_one[:2]
    pipeline_shape = (c, f, *shape_one[2:])
    return torch.stack([torch.randn(pipeline_shape, generator=torch.Generator().manual_seed(seed + i)).transpose(0, 1)
                        for i in range(n)])


def guidance_of(model: LoadedModel, guidance_scale: float | None) -> float | None:
    """The CFG scale the model is sampled with (usual form, :mod:`anystep.flow.guidance`), None for
    none. Teachers and flow-matching students default to 4 and take 1 as "no null half";
    flow-map and consistency students are guidance-fused and refuse a scale."""
    if model.kind == "teacher" or model.sampler == "euler_cfg":
        g = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)
        return g if g > 1.0 else None
    if guidance_scale not in (None, 1.0):
        raise ValueError(f"{model.folder} is a guidance-fused {model.sampler} student: a guidance scale applies to "
                         "teachers and flow-matching students only")
    return None


def nfe(model: LoadedModel, steps: int, guidance_scale: float | None = None) -> int:
    """Network evaluations per clip: guided models pay two a step."""
    return steps * (2 if guidance_of(model, guidance_scale) is not None else 1)


def _solver(model: LoadedModel, steps: int, seed: int, guidance: float | None):
    """``(velocity, z_noise) -> z_clean`` with the folder's sampler."""
    if model.sampler == "consistency":
        grid = consistency_grid(steps, model.shift)
        gen = torch.Generator().manual_seed(int(seed))
        return lambda velocity, z: consistency_sample(velocity, z, grid, gen)
    grid = shifted_grid(steps, model.shift)
    if model.kind == "teacher" or model.sampler == "euler_cfg":
        return lambda velocity, z: euler(velocity, z, grid, guidance)
    return lambda velocity, z: flow_map_euler(velocity, z, grid)


@torch.no_grad()
def generate_latents(
    model: LoadedModel,
    prompts: list[str],
    steps: int,
    seed: int = 0,
    num_frames: int = 7,
    height: int = 32,
    width: int = 32,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Normalised latents (B, F, C, h, w) for ``prompts`` at ``steps`` sampling steps.

    FAR models only: ``context`` (1 or B, f, C, h, w) fixes the first whole chunks
    (:func:`anystep.conditioning.context_latents`); ``on_chunk(k, latents_so_far)`` is called after
    every chunk.
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    causal = model.kind == "anyflow_far"
    if (context is not None or on_chunk is not None) and not causal:
        raise ValueError(f"chunk-by-chunk generation needs an AnyFlow-FAR folder, got a {model.kind!r} folder")
    guidance = guidance_of(model, guidance_scale)
    shape = model.latent_shape(num_frames, height, width)
    if noise is None:
        noise = initial_noise(shape, len(prompts), seed)
    noise = noise.float()
    pipe, n = model.pipe, model.max_sequence_length
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(prompts), n)
    if guidance is not None:
        # The conditional and the null half run as one batch (and, causal, share every committed chunk).
        embeds = torch.cat([embeds, encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), n)])
    solve = _solver(model, steps, seed, guidance)
    if not causal:
        net = model.transformer
        if model.kind == "teacher":
            return solve(lambda z, t, _r: teacher_velocity(net, z, t, embeds), noise)
        return solve(bidirectional_velocity(net, embeds), noise)
    # The stock pipelines warn that a temporal factor of 1 "rounds" num_frames; the frame count here
    # is exactly the one asked for.
    old = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return _chunk_by_chunk(model, solve, noise, embeds, guidance is not None, num_frames, context, on_chunk)
    finally:
        dlogging.set_verbosity(old)


def _chunk_by_chunk(model: LoadedModel, solve, noise, embeds, guided: bool, num_frames: int, context, on_chunk):
    """A FAR model's clip, one chunk at a time: a finished chunk is final and goes into the cache."""
    part = tuple(int(c) for c in model.transformer.config.chunk_partition)
    try:
        check_chunk_partition(part, num_frames, int(model.codec.config.scale_factor_temporal))
    except ValueError as e:
        raise ValueError(f"{model.folder}: {e}") from None
    state = CausalRolloutState(model.transformer, embeds, part, (embeds.shape[0], *noise.shape[1:]))
    n_ctx = 0
    if context is not None:
        context = context.expand(noise.shape[0], *context.shape[1:]).float()
        while n_ctx < len(part) and sum(part[: n_ctx + 1]) <= context.shape[1]:
            n_ctx += 1
    chunks = []
    for k in range(len(part)):
        sl = state.chunk_slice(k)
        z = context[:, sl] if k < n_ctx else solve(state.velocity, noise[:, sl])
        chunks.append(z)
        state.commit(torch.cat([z, z]) if guided else z)
        if on_chunk is not None:
            on_chunk(k, torch.cat(chunks, dim=1))
    return torch.cat(chunks, dim=1)


def latents_to_video(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, F, C, h, w) -> pixels (B, F, 3, H, W) in [-1, 1] through the folder's codec."""
    vae = model.codec
    z = latents.permute(0, 2, 1, 3, 4).float()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(z * std + mean, return_dict=False)[0]
    return video.clamp(-1, 1).permute(0, 2, 1, 3, 4)


def generate(model: LoadedModel, prompts: list[str], steps: int, seed: int = 0, **kw) -> torch.Tensor:
    return latents_to_video(model, generate_latents(model, prompts, steps, seed=seed, **kw))
