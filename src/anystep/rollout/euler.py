"""Euler sampling with classifier-free guidance for a student trained by plain flow matching.

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


def _euler(velocity, z: torch.Tensor, grid, guidance: float) -> torch.Tensor:
    b = z.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        u = velocity(torch.cat([z, z]), float(t), float(t)).float()
        u_c, u_u = u[:b], u[b:]
        z = z - (float(t) - float(t_next)) * (u_u + guidance * (u_c - u_u))
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
        return _euler(bidirectional_velocity(student, both), noise, grid, guidance)
    part = tuple(chunk_partition or student.config.chunk_partition)
    b = noise.shape[0]
    state = CausalRolloutState(student, both, part, (2 * b, *noise.shape[1:]))
    chunks = []
    for k in range(len(part)):
        chunk = _euler(state.velocity, noise[:, state.chunk_slice(k)], grid, guidance)
        chunks.append(chunk)
        state.commit(torch.cat([chunk, chunk]))
    return torch.cat(chunks, dim=1)
