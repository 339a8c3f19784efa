"""Flow-map backward simulation: the student's own rollout, differentiable end to end.

Paper Sec. 4.2.2 ("Flow Map Backward Simulation"), Eq. 8 and Algorithm 2; docs/design.md section 3,
Stage 2. DMD (Eq. 5) needs a sample *from the student's own sampler* to score, and that sample
must carry gradient back to the student. A flow map ``u(z_t, t, r)`` jumps between any two times,
``z_r = z_t - (t - r) u(z_t, t, r | c)``, so by the composition property (Eq. 8) an ``s``-step
Euler rollout tau_0 = 1 > ... > tau_s = 0 can be stood in for by three jumps

    tau_0 -> tau_g  (shortcut over the first g steps)
    tau_g -> tau_{g+1}  (the sampled step itself)
    tau_{g+1} -> 0  (shortcut over the rest),

all with gradient, whatever ``s`` is -- which is why the cost is flat in the step budget (paper
Table 5). The plan (``s``, ``g`` and the jumps, equal-end jumps removed) comes from
:func:`anystep.flow.stage2.flow_map_segments`; here we only *execute* it. No classifier-free
guidance: the Stage-1 student is guidance-fused (Eq. 6) and samples without CFG.

Two executors:

* :func:`flowmap_rollout` -- a bidirectional ``AnyFlowTransformer3DModel``, the whole clip at once
  (:func:`anystep.models.velocity.flow_map_velocity`);
* :func:`causal_flowmap_rollout` -- an ``AnyFlowFARTransformer3DModel``, chunk by chunk over the
  KV cache (docs/design.md: "each chunk's three segments with gradient; the cache re-encoded without
  gradient at t = r = 0 after each chunk"). :class:`anystep.models.causal_state.CausalRolloutState`
  owns the cache; with ``use_cache=False`` it recomputes each chunk with the teacher-forced training
  forward over all previous chunks instead, the reference the cached rollout is tested against.

The jumps themselves are :func:`anystep.flow.solvers.flow_map_jumps`, the sampler's own.

Both run under whatever grad mode the caller has: with gradient for the generator step, under
``torch.no_grad()`` for the critic's rollouts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from anystep.flow.solvers import flow_map_jumps
from anystep.flow.stage2 import flow_map_segments
from anystep.models.causal_state import CausalRolloutState
from anystep.models.velocity import bidirectional_velocity, is_causal


@dataclass
class Rollout:
    """A rollout's result.

    ``sample``: the clean clip x^ (B, F, C, h, w) that DMD scores. ``states``: the output of every
    network-call step in execution order (for the causal rollouts chunk 0's steps first, each a
    chunk-sized tensor). ``segments``: the (t, r) jumps of one chunk. ``info``: what was drawn
    (budget ``s``, gradient / exit index) for logging.
    """

    sample: torch.Tensor
    states: list[torch.Tensor]
    segments: tuple[tuple[float, float], ...]
    info: dict = field(default_factory=dict)


def flowmap_rollout(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    segments: Sequence[tuple[float, float]],
    *,
    detach: Collection[int] = (),
) -> Rollout:
    """Bidirectional flow-map backward simulation from pure noise ``noise`` (B, F, C, h, w)."""
    if not segments:
        raise ValueError("a rollout needs at least one jump")
    states = flow_map_jumps(bidirectional_velocity(student, cond), noise, segments, detach)
    return Rollout(states[-1], states, tuple(segments))


def causal_flowmap_rollout(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    segments: Sequence[tuple[float, float]],
    chunk_partition: Sequence[int] | None = None,
    *,
    use_cache: bool = True,
    detach: Collection[int] = (),
) -> Rollout:
    """Causal flow-map backward simulation: for each chunk, the same jumps (with gradient) from
    that chunk's slice of ``noise``, then the finished chunk goes into the context (no gradient).

    ``chunk_partition`` defaults to the student's own. The returned ``sample`` is the concatenated
    chunks; it carries gradient through every chunk's jumps, each chunk's context detached.
    """
    if not segments:
        raise ValueError("a rollout needs at least one jump")
    part = tuple(chunk_partition or student.config.chunk_partition)
    state = CausalRolloutState(student, cond, part, tuple(noise.shape), use_cache=use_cache)
    chunks, states = [], []
    for k in range(len(part)):
        js = flow_map_jumps(state.velocity, noise[:, state.chunk_slice(k)], segments, detach)
        states.extend(js)
        chunks.append(js[-1])
        state.commit(js[-1])
    return Rollout(torch.cat(chunks, dim=1), states, tuple(segments))


def flowmap_backward_simulation(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    grad_index: int,
    shift: float = 5.0,
    *,
    chunk_partition: Sequence[int] | None = None,
    use_cache: bool = True,
) -> Rollout:
    """Algorithm 2's rollout for budget ``steps`` and gradient index ``grad_index`` on the shifted
    grid, for either kind of student (FAR students roll out chunk by chunk over the KV cache)."""
    plan = flow_map_segments(steps, grad_index, shift)
    if is_causal(student):
        out = causal_flowmap_rollout(student, noise, cond, plan.segments, chunk_partition, use_cache=use_cache)
    else:
        out = flowmap_rollout(student, noise, cond, plan.segments)
    out.info = {"steps": steps, "grad_index": grad_index}
    return out
