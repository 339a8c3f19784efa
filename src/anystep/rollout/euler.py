"""Euler sampling with classifier-free guidance: the teacher's sampler, and the one of a student
trained by plain flow matching.

The flow-matching baseline of Table 2 is a velocity model: it is trained at r = t only, so it is
sampled like the teacher -- Euler on the shifted grid with ``u_null + w (u_cond - u_null)`` at
(t, t) -- not with flow-map jumps (which would query it at r != t, where it was never trained).
For a causal (FAR) student the clip is generated chunk by chunk over the KV cache; the conditional
and null halves run as one batch and share every committed chunk.
"""

from __future__ import annotations

import torch

from anystep.flow.schedule import sampling_grid
from anystep.rollout.flowmap import CausalRolloutState, bidirectional_velocity, is_causal


def euler_sample(velocity, z: torch.Tensor, grid, guidance: float | None) -> torch.Tensor:
    """Euler on ``grid`` (sigmas from 1 down to 0) with the velocity ``velocity(z, t, r)`` at r = t.

    With ``guidance`` the velocity sees the conditional and the null half as one batch,
    ``[z; z]``, and the step uses ``u_null + w (u_cond - u_null)``; with ``None`` it sees ``z``
    alone and its output is used as it is (a teacher at guidance 1 skips the null half).
    """
    b = z.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        if guidance is None:
            u = velocity(z, float(t), float(t)).float()
        else:
            both = velocity(torch.cat([z, z]), float(t), float(t)).float()
            u_c, u_u = both[:b], both[b:]
            u = u_u + guidance * (u_c - u_u)
        z = z - (float(t) - float(t_next)) * u
    return z


@torch.no_grad()
def euler_cfg_sample(student, noise: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, steps: int,
                     guidance: float = 4.0, shift: float = 5.0, chunk_partition=None) -> torch.Tensor:
    """``steps`` Euler steps from ``noise`` (B, F, C, h, w) with CFG ``guidance`` (usual form: 1 = none)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = [float(v) for v in sampling_grid(steps, shift)]
    both = torch.cat([cond, null])
    noise = noise.float()
    if not is_causal(student):
        return euler_sample(bidirectional_velocity(student, both), noise, grid, guidance)
    part = tuple(chunk_partition or student.config.chunk_partition)
    b = noise.shape[0]
    state = CausalRolloutState(student, both, part, (2 * b, *noise.shape[1:]))
    chunks = []
    for k in range(len(part)):
        chunk = euler_sample(state.velocity, noise[:, state.chunk_slice(k)], grid, guidance)
        chunks.append(chunk)
        state.commit(torch.cat([chunk, chunk]))
    return torch.cat(chunks, dim=1)
