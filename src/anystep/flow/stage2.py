"""Stage 2 math: flow-map backward simulation (Eq. 8, Alg. 2), the DMD gradient (Eq. 5), and the
consistency baseline's re-noising (docs/design.md section 3). Pure functions, no module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anystep.flow.schedule import sampling_grid, shift_sigma

REFERENCE_STEP_BUDGETS = (2, 4, 8, 16, 50)


@dataclass(frozen=True)
class BackwardSimPlan:
    """One rollout's choice: budget ``s``, gradient index ``g`` and the jumps actually taken."""

    steps: int
    grad_index: int
    segments: tuple[tuple[float, float], ...]  # (t, r) sigma pairs, equal-end jumps removed


def sample_budget_and_index(budgets, generator: torch.Generator) -> tuple[int, int]:
    """s ~ U(budgets), g ~ U{0..s-1} (Alg. 2). Draw from a generator seeded identically on every rank."""
    budgets = list(budgets)
    if not budgets or min(budgets) < 1:
        raise ValueError(f"step budgets must be a non-empty list of integers >= 1, got {budgets}")
    s = budgets[int(torch.randint(len(budgets), (), generator=generator))]
    g = int(torch.randint(s, (), generator=generator))
    return s, g


def flow_map_segments(steps: int, grad_index: int, shift: float = 5.0) -> BackwardSimPlan:
    """Eq. 8's decomposition of an ``steps``-step Euler rollout into three flow-map jumps.

    On the shifted grid tau_0 = 1 > tau_1 > ... > tau_s = 0, the rollout jumps
    tau_0 -> tau_g (shortcut over the first g steps), tau_g -> tau_{g+1} (the target step of size
    1/s before the shift) and tau_{g+1} -> 0 (shortcut over the rest). By composition of flow maps
    this stands in for the whole s-step trajectory at the cost of three network calls whatever s
    is. A jump with equal ends is the identity and is skipped (g = 0 or g = s - 1).
    """
    if not 0 <= grad_index < steps:
        raise ValueError(f"gradient index must be in [0, {steps - 1}], got {grad_index}")
    grid = sampling_grid(steps, shift)
    pts = [1.0, float(grid[grad_index]), float(grid[grad_index + 1]), 0.0]
    segs = tuple((a, b) for a, b in zip(pts[:-1], pts[1:]) if a != b)
    return BackwardSimPlan(steps, grad_index, segs)


def dmd_renoise_sigma(n: int, shift: float = 5.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """sigma ~ U(0, 1) then the shift: where DMD re-noises the rollout (Eq. 5's t in [0, T])."""
    return shift_sigma(torch.rand(n, generator=generator, dtype=torch.float64), shift).float()


def dmd_gradient(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 5's KL gradient in x0 form, normalised per sample (DMD's adaptive scale).

    (x0_fake - x0_real) points from the data distribution towards the generator's; dividing by
    mean |x_hat - x0_real| makes the step size independent of how far off the sample is. NaN/inf
    (an all-exact sample) become 0.
    """
    dims = tuple(range(1, x_hat.ndim))
    scale = (x_hat.double() - x0_real.double()).abs().mean(dim=dims, keepdim=True)
    grad = (x0_fake.double() - x0_real.double()) / scale
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x_hat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """MSE(x_hat, sg(x_hat - grad)) in fp64: its gradient w.r.t. x_hat is 2 grad / numel, i.e. the
    DMD update direction, and the loss value is mean(grad^2) (a readable scale)."""
    x = x_hat.double()
    target = (x - grad.double()).detach()
    return torch.nn.functional.mse_loss(x, target)


def draw_randn(source, shape, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise from a ``torch.Generator`` (or None) or from any object with
    ``randn(shape, dtype)`` (training's rank-sliced global draws)."""
    if source is None or isinstance(source, torch.Generator):
        return torch.randn(shape, generator=source, dtype=dtype)
    return source.randn(shape, dtype)


def consistency_renoise(x0: torch.Tensor, sigma_next: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Consistency sampling's step: predict x0, then re-noise it with *fresh* noise to the next time.

    The fresh noise is what moves consistency trajectories off the PF-ODE (paper Fig. 2a).
    """
    noise = draw_randn(generator, x0.shape, x0.dtype).to(x0.device)
    return (1 - sigma_next) * x0 + sigma_next * noise


CONSISTENCY_REFERENCE_GRID_TIMESTEPS = (1000.0, 937.5, 833.3, 625.0)
