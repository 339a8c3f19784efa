"""A model folder opened for use: the diffusers pipeline, what kind of model it holds and how it
is sampled. Training, data and evaluation open folders through here; generating from one is
:mod:`anystep.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.utils import logging as dlogging
from transformers.utils import logging as tlogging

from anystep.models.folders import load_pipeline, read_sampler

KINDS = {"WanPipeline": "teacher", "AnyFlowPipeline": "anyflow", "AnyFlowFARPipeline": "anyflow_far"}


@dataclass
class LoadedModel:
    pipe: object
    kind: str  # "teacher" | "anyflow" | "anyflow_far"
    folder: str
    # students: "flowmap" (flow-map Euler) | "consistency" (x0 + re-noise) | "euler_cfg" (flow matching)
    sampler: str = "flowmap"

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def codec(self):
        return self.pipe.vae

    @property
    def max_sequence_length(self) -> int:
        """Rows our code encodes prompts to (the toy's compact rows; Wan's 512)."""
        from anystep.models.text import text_rows

        return text_rows(self.pipe.tokenizer, self.transformer)

    @property
    def shift(self) -> float:
        return float(getattr(self.pipe.scheduler.config, "shift", 5.0))

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
    kind = KINDS[type(pipe).__name__]
    sampler = read_sampler(folder) if kind != "teacher" else "euler_cfg"
    return LoadedModel(pipe=pipe, kind=kind, folder=str(folder), sampler=sampler)
