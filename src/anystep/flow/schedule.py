"""Time conventions and grids (docs/design.md section 3).

sigma in [0, 1] (1 = pure noise); model timestep = 1000 * sigma. Noising z = (1 - s) x + s e,
data velocity v = e - x. Every schedule in the method (training t/r, DMD re-noise, critic,
sampling grid) goes through the same shift s -> k s / (1 + (k - 1) s), k = 5 by default.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor, shift: float = 5.0) -> torch.Tensor:
    """The SD3 / Wan time shift; identity for ``shift == 1``."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_grid(num_steps: int, shift: float = 5.0, dtype=torch.float64) -> torch.Tensor:
    """``num_steps + 1`` sigmas from 1 to 0: ``linspace(1, 0, N + 1)`` then shifted.

    The same grid as diffusers' ``FlowMapEulerDiscreteScheduler.set_timesteps(N)`` with ``shift``.
    """
    if num_steps < 1:
        raise ValueError(f"number of steps must be >= 1, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype), shift)


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_sigma = (1 - sigma) x + sigma e, with sigma broadcast from the batch dimension."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (1 - s) * x + s * noise
