"""Conditioning frames for an AnyFlow-FAR model: image- and video-to-video.

Conditioning frames (one image: I2V; the first frames of a clip: V2V) are encoded with the
folder's codec and stand in for the first whole chunks; :func:`anystep.sampling.generate_latents`
continues after them, exactly as diffusers' ``AnyFlowFARPipeline`` does with ``video_latents``.
Tests check both give the same clip.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

from anystep.errors import UserError
from anystep.models.latents import encode_pixels, temporal_factor


class ConditioningError(UserError, ValueError):
    """Conditioning frames that cannot be used (one-line message)."""


def read_frames(path) -> torch.Tensor:
    """An image (one frame) or a video file -> pixels (F, 3, H, W) in [-1, 1]."""
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
