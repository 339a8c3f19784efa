"""The three samplers, as functions of a velocity function, a state and a time grid.

Pure: no model, no prompt, no cache -- the caller binds those into ``velocity(z, t, r)`` (a whole
clip, or the current chunk of a causal model over its KV cache, :mod:`anystep.models.causal_state`).
Times are sigmas (1 = noise, 0 = data), python floats, descending.

* :func:`flow_map_jumps` / :func:`flow_map_euler` -- flow-map jumps ``z_r = z_t - (t - r) u(z_t, t, r)``
  (paper Eq. 8): the AnyFlow sampler over the grid, and the executor of the Stage-2 rollout's plan;
* :func:`euler` -- Euler at r = t, optionally with classifier-free guidance (the teacher's sampler,
  and that of a student trained by plain flow matching);
* :func:`consistency_steps` / :func:`consistency_sample` -- predict x0, re-noise with fresh noise
  (the consistency baselines of Table 2; paper Sec. 4.2.2, Fig. 5a).

Arithmetic is fp32 whatever the model dtype (a 1 - 0.9375 step of a bf16 tensor loses digits).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from anystep.flow.guidance import guided_velocity
from anystep.flow.matching import x0_from_velocity
from anystep.flow.schedule import sampling_grid
from anystep.flow.stage2 import consistency_renoise

#: ``velocity(z, t, r) -> u`` with t, r sigmas (python floats) and the condition bound in.
VelocityFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def shifted_grid(steps: int, shift: float = 5.0) -> list[float]:
    """The ``steps + 1`` sampling times from 1 to 0 as python floats (:func:`sampling_grid`)."""
    return [float(v) for v in sampling_grid(steps, shift)]


def flow_map_jumps(
    velocity: VelocityFn, z: torch.Tensor, segments: Sequence[tuple[float, float]], detach: Collection[int] = ()
) -> list[torch.Tensor]:
    """Execute Eq. 8's jumps ``z_r = z_t - (t - r) u(z_t, t, r)`` in order; return each jump's output.

    ``detach``: indices of jumps whose velocity is cut from the graph (the jump still moves z).
    Only for tests and ablations -- it lets one check that each jump carries gradient.
    """
    states = []
    for i, (t, r) in enumerate(segments):
        if not t > r:
            raise ValueError(f"a flow-map jump must go from higher to lower noise, got t={t}, r={r}")
        u = velocity(z, float(t), float(r)).float()
        if i in detach:
            u = u.detach()
        z = z.float() - (float(t) - float(r)) * u
        states.append(z)
    return states


def flow_map_euler(velocity: VelocityFn, z: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Flow-map Euler over ``grid`` (the AnyFlow sampler): one jump per grid interval."""
    segments = [(t, r) for t, r in zip(grid[:-1], grid[1:]) if t != r]
    return flow_map_jumps(velocity, z, segments)[-1] if segments else z


def euler(velocity: VelocityFn, z: torch.Tensor, grid: Sequence[float], guidance: float | None) -> torch.Tensor:
    """Euler on ``grid`` with the velocity at r = t.

    With ``guidance`` the velocity sees the conditional and the null half as one batch, ``[z; z]``,
    and the step uses :func:`anystep.flow.guidance.guided_velocity`; with ``None`` it sees ``z``
    alone and its output is used as it is (guidance 1 skips the null half).
    """
    b = z.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        if guidance is None:
            u = velocity(z, float(t), float(t)).float()
        else:
            both = velocity(torch.cat([z, z]), float(t), float(t)).float()
            u = guided_velocity(both[:b], both[b:], guidance)
        z = z - (float(t) - float(t_next)) * u
    return z


def consistency_grid(steps: int, shift: float = 5.0) -> list[float]:
    """The ``steps`` start times tau_0..tau_{s-1} of the shifted grid (1000 sigma = 1000, 937.5,
    833.3, 625 for s = 4, shift 5); each step denoises to 0 from one of them."""
    return shifted_grid(steps, shift)[:-1]


def predict_x0(velocity: VelocityFn, z: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = z - sigma u(z, sigma, 0): the flow-map jump from sigma straight to data."""
    return x0_from_velocity(z.float(), velocity(z, float(sigma), 0.0).float(), float(sigma))


def consistency_steps(
    velocity: VelocityFn,
    noise: torch.Tensor,
    grid: Sequence[float],
    exit_index: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Steps 0..exit_index of consistency sampling from ``noise`` at grid[0]; returns every step's x0.

    Steps before ``exit_index`` run under ``no_grad`` and re-noise their x0 to the next grid time
    with fresh noise from ``generator`` (a ``torch.Generator`` or a rank-sliced source with
    ``randn``); the last step runs in the caller's grad mode, so its x0 (the returned list's last
    entry) carries gradient only through that one network call.
    """
    if not 0 <= exit_index < len(grid):
        raise ValueError(f"exit index must be in [0, {len(grid) - 1}], got {exit_index}")
    z = noise
    outs = []
    for i in range(exit_index):
        with torch.no_grad():
            x0 = predict_x0(velocity, z, grid[i])
            z = consistency_renoise(x0, grid[i + 1], generator=generator)
        outs.append(x0)
    outs.append(predict_x0(velocity, z, grid[exit_index]))
    return outs


def consistency_sample(velocity: VelocityFn, z: torch.Tensor, grid: Sequence[float],
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The consistency sampler: every step of ``grid`` (:func:`consistency_grid`), the last x0."""
    return consistency_steps(velocity, z, grid, len(grid) - 1, generator)[-1]
