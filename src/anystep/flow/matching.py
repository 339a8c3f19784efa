"""The straight noising path and flow matching on it (docs/design.md section 3; docs/method.md).

z_s = (1 - s) x + s e (:func:`anystep.flow.schedule.add_noise`); its velocity is v = e - x, and
from any velocity prediction the clean clip is x0 = z - s v. Flow matching regresses a velocity
prediction on v at a logit-normal, shifted s -- the teacher's loss, the plain flow-matching
baseline of Table 2, and the Stage-2 critic's. Pure tensor functions.
"""

from __future__ import annotations

import torch

from anystep.flow.schedule import shift_sigma


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = e - x, the velocity of the straight path (dz/ds)."""
    return noise - x


def x0_from_velocity(z: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = z - sigma v for z = (1 - sigma) x + sigma e and v = e - x; ``sigma`` a number or one per
    sample (B,)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.view(-1, *([1] * (z.ndim - 1))).to(z.dtype)
    return z - sigma * v


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(pred - target)^2 elementwise, in fp32 whatever the compute dtype."""
    return (pred.float() - target.float()).pow(2)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, (B,): the per-sample loss every method weights or averages."""
    return squared_error(pred, target).flatten(1).mean(1)


def logit_normal_sigma(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0):
    """sigma = sigmoid(N(mean, std)): the SD3 / Wan logit-normal time density (before the shift)."""
    return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)


def training_sigma(n: int, shift: float = 5.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flow matching's time: logit-normal, then the shift."""
    return shift_sigma(logit_normal_sigma(n, generator=generator), shift)
