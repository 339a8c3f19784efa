"""Any-step generation from a model folder, through diffusers' own pipelines.

* a teacher (``WanPipeline`` folder): Euler on the shifted grid with classifier-free guidance
  (2 network calls a step);
* an AnyFlow student (``AnyFlowPipeline`` folder): flow-map Euler ``z_r = z_t - (t - r) u(z_t, t, r)``
  on the shifted grid, no guidance (1 call a step);
* an AnyFlow-FAR student (``AnyFlowFARPipeline``): the same, chunk by chunk over the KV cache.

Initial noise is drawn per clip from ``seed`` (clip i of a batch uses ``seed + i``), so a clip
does not depend on what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anystep.models.folders import load_pipeline, read_sampler

DEFAULT_TEACHER_GUIDANCE = 4.0


@dataclass
class LoadedModel:
    pipe: object
    kind: str  # "teacher" | "anyflow" | "anyflow_far"
    folder: str
    sampler: str = "flowmap"  # students: "flowmap" (flow-map Euler) | "consistency" (x0 + re-noise)

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def codec(self):
        return self.pipe.vae

    @property
    def max_sequence_length(self) -> int:
        return int(min(getattr(self.pipe.tokenizer, "model_max_length", 512) or 512, 512))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F_latent, C, h, w) of one clip, the AnyFlow layout."""
        vae = self.pipe.vae
        ft = int(vae.config.scale_factor_temporal)
        fs = int(vae.config.scale_factor_spatial)
        if height % fs or width % fs:
            raise ValueError(f"frame size {height}x{width} is not divisible by the codec's spatial factor {fs}")
        cfg = self.transformer.config
        p = cfg.patch_size
        if (height // fs) % p[1] or (width // fs) % p[2]:
            raise ValueError(
                f"latent size {height // fs}x{width // fs} is not divisible by the transformer patch {tuple(p[1:])}"
            )
        f_lat = (num_frames - 1) // ft + 1
        return f_lat, int(cfg.in_channels), height // fs, width // fs


def load_model(folder) -> LoadedModel:
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    # Loading bars and the "vae is not an AutoencoderKLWan" notice (the toy codec is a deliberate
    # stand-in) are noise on a command line.
    old_d, old_t = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    try:
        pipe = load_pipeline(folder)
    finally:
        dlogging.set_verbosity(old_d)
        tlogging.set_verbosity(old_t)
        dlogging.enable_progress_bar()
        tlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    kind = {"WanPipeline": "teacher", "AnyFlowPipeline": "anyflow", "AnyFlowFARPipeline": "anyflow_far"}[
        type(pipe).__name__
    ]
    sampler = read_sampler(folder) if kind != "teacher" else "euler_cfg"
    return LoadedModel(pipe=pipe, kind=kind, folder=str(folder), sampler=sampler)


def initial_noise(shape_one: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """(n, *shape_one) standard normal noise, clip i drawn from generator seed ``seed + i``."""
    return torch.stack([torch.randn(shape_one, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def generate_latents(*args, **kwargs) -> torch.Tensor:
    """Normalised latents (B, F, C, h, w) for ``prompts`` at ``steps`` sampling steps."""
    from diffusers.utils import logging as dlogging

    # The stock pipelines warn that a temporal factor of 1 "rounds" num_frames; we pass latents
    # directly, so the frame count is exactly the one asked for.
    old = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        return _generate_latents(*args, **kwargs)
    finally:
        dlogging.set_verbosity(old)


@torch.no_grad()
def _generate_latents(
    model: LoadedModel,
    prompts: list[str],
    steps: int,
    seed: int = 0,
    num_frames: int = 7,
    height: int = 32,
    width: int = 32,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    shape = model.latent_shape(num_frames, height, width)
    if noise is None:
        noise = initial_noise(shape, len(prompts), seed)
    common = dict(
        prompt=list(prompts),
        num_inference_steps=steps,
        output_type="latent",
        max_sequence_length=model.max_sequence_length,
        return_dict=False,
    )
    if model.kind == "teacher":
        g = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else guidance_scale
        return _teacher_euler_cfg(model, prompts, steps, noise, g)
    g = 1.0 if guidance_scale is None else guidance_scale
    if model.sampler == "euler_cfg":
        return _student_euler_cfg(model, prompts, steps, noise, DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else guidance_scale)
    if model.sampler == "consistency":
        from anystep.rollout.consistency import consistency_generate_latents

        return consistency_generate_latents(model, prompts, steps, seed, num_frames, height, width, noise=noise)
    if model.kind == "anyflow":
        out = model.pipe(latents=noise.permute(0, 2, 1, 3, 4), guidance_scale=g, **common)[0]
        return out.permute(0, 2, 1, 3, 4)
    if model.kind == "anyflow_far":
        # Chunk by chunk over the KV cache, `steps` flow-map steps per chunk. On CPU this runs
        # FlexAttention unfused (forward only; fine under no_grad). The partition is the one the
        # student was built with and must cover exactly the clip's latent frames. The stock
        # KV-cache step attends to its zero alignment padding; masking it makes sampling use the
        # attention the student is trained with (see anystep.models.students).
        import warnings

        from anystep.models.students import check_chunk_partition, mask_far_inference_padding

        mask_far_inference_padding(model.transformer)
        partition = list(model.transformer.config.chunk_partition)
        try:
            check_chunk_partition(partition, num_frames, int(model.codec.config.scale_factor_temporal))
        except ValueError as e:
            raise ValueError(f"{model.folder}: {e}") from None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            # use_kv_cache stated, not defaulted: diffusers 0.42.1's use_kv_cache=False path unpacks two
            # values from a training forward that returns one and fails.
            out = model.pipe(
                latents=noise.permute(0, 2, 1, 3, 4), guidance_scale=g, chunk_partition=partition, use_kv_cache=True,
                **common,
            )[0]
        return out.permute(0, 2, 1, 3, 4)
    raise ValueError(f"unknown model kind {model.kind!r}")


def _student_euler_cfg(model: LoadedModel, prompts, steps: int, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    from anystep.models.text import encode_prompts
    from anystep.rollout.euler import euler_cfg_sample

    pipe = model.pipe
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(prompts), model.max_sequence_length)
    null = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), model.max_sequence_length)
    shift = float(getattr(pipe.scheduler.config, "shift", 5.0))
    return euler_cfg_sample(model.transformer, noise, cond, null, steps, guidance, shift)


def _teacher_euler_cfg(model: LoadedModel, prompts, steps: int, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """Euler with classifier-free guidance on the same shifted grid the flow-map students use.

    ``WanPipeline``'s default scheduler puts its N timesteps on ``linspace(1, 1/1000, N)`` and adds a
    final jump to 0; sampling teacher and students on one grid, ``shift(linspace(1, 0, N + 1))``,
    keeps "teacher at 4 x 2 NFE vs AnyFlow at 4 NFE" a like-for-like comparison. Text goes through
    the pipeline's own ``encode_prompt``.
    """
    from anystep.flow.schedule import sampling_grid
    from anystep.models.students import teacher_velocity
    from anystep.rollout.euler import euler_sample

    pipe = model.pipe
    shift = float(getattr(pipe.scheduler.config, "shift", 5.0))
    guided = guidance > 1.0
    cond, null = pipe.encode_prompt(
        prompt=list(prompts),
        negative_prompt=[""] * len(prompts),
        do_classifier_free_guidance=guided,
        max_sequence_length=model.max_sequence_length,
        device=noise.device,
    )
    embeds = torch.cat([cond, null]) if guided else cond
    grid = [float(v) for v in sampling_grid(steps, shift)]

    def velocity(z, t, _r):
        return teacher_velocity(pipe.transformer, z, t, embeds)

    return euler_sample(velocity, noise.float(), grid, guidance if guided else None)


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


def nfe(model: LoadedModel, steps: int, guidance_scale: float | None = None) -> int:
    """Network evaluations per clip: teachers (and flow-matching students) with guidance pay two a step."""
    if model.kind == "teacher" or model.sampler == "euler_cfg":
        g = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else guidance_scale
        return steps * (2 if g > 1.0 else 1)
    return steps
