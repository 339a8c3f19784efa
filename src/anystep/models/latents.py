"""Pixels -> normalised latents through whichever codec a model folder carries.

The toy ``SpaceToDepthCodec`` and diffusers' ``AutoencoderKLWan`` share the Wan convention: the
transformer lives in ``(posterior_mean - latents_mean) / latents_std``. Training data is encoded
with the posterior *mean* (not a sample), so a clip always maps to the same latent and a resumed
run reads exactly the latents it would have read.
"""

from __future__ import annotations

import torch


def temporal_factor(vae) -> int:
    """Pixel frames per latent frame after the first (4 for Wan, 1 for the toy codec)."""
    return int(vae.config.scale_factor_temporal)


def latent_frames(vae, num_frames: int) -> int:
    """Latent frame count of ``num_frames`` pixel frames (Wan rule: the first frame stands alone)."""
    ft = temporal_factor(vae)
    if (num_frames - 1) % ft:
        raise ValueError(f"{num_frames} frames do not fit this codec: need 1 + {ft}k frames")
    return (num_frames - 1) // ft + 1


@torch.no_grad()
def encode_pixels(vae, video: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) pixels in [-1, 1] -> normalised latents (B, f, Z, h, w), the AnyFlow layout."""
    if hasattr(vae, "pixels_to_latents"):
        return vae.pixels_to_latents(video)
    latent_frames(vae, video.shape[1])  # a clear error before the VAE's own shape failure
    dtype = next(vae.parameters()).dtype
    x = video.permute(0, 2, 1, 3, 4).to(dtype)
    z = vae.encode(x).latent_dist.mean.float()
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return ((z - mean) / std).permute(0, 2, 1, 3, 4)
