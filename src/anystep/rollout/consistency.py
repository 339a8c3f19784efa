"""Consistency backward simulation: the training rollout of the baseline AnyFlow replaces.

Paper Sec. 4.2.2 ("Limitations of Consistency Backward Simulation", Fig. 5a) and Table 2;
docs/design.md section 3. This is the Self-Forcing / rCM style rollout: on the shifted grid
tau_0 = 1 > tau_1 > ... > tau_{s-1} (> tau_s = 0; for s = 4 the timesteps 1000, 937.5, 833.3, 625),
every step predicts the clean clip

    x0_i = z_i - tau_i u(z_i, tau_i, 0)      (a flow-map jump to 0; for a consistency model the
                                              same "denoise to data" call)

and re-noises it with *fresh* noise to the next grid time, z_{i+1} = (1 - tau_{i+1}) x0_i +
tau_{i+1} e (:func:`anystep.flow.solvers.consistency_steps`, the sampler's own steps). In training an exit index
k ~ U{0..s-1} is drawn; steps before k run without gradient (the truncated gradient of Fig. 5a),
step k runs with gradient and its x0 is the sample DMD scores. The fresh noise is what moves these
trajectories off the PF-ODE, which is why the sampler degrades as steps are added (the paper's
central comparison) -- and why rolling out a large step count costs k + 1 network calls, against
three for flow-map backward simulation.

Causal students run the same steps chunk by chunk over the KV cache
(:class:`anystep.models.causal_state.CausalRolloutState`); each finished chunk's x0 goes into the
context without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anystep.flow.solvers import consistency_grid, consistency_steps
from anystep.models.causal_state import CausalRolloutState
from anystep.models.velocity import bidirectional_velocity, is_causal
from anystep.rollout.flowmap import Rollout


def consistency_backward_simulation(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    exit_index: int,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    *,
    chunk_partition: Sequence[int] | None = None,
    use_cache: bool = True,
) -> Rollout:
    """The baseline's training rollout for either kind of student (see the module docstring).

    ``generator`` draws the re-noising noise; give each rank its own. ``sample`` is the exit
    step's x0 (with gradient when the caller has it on); ``states`` are all steps' x0.
    """
    grid = consistency_grid(steps, shift)
    if is_causal(student):
        part = tuple(chunk_partition or student.config.chunk_partition)
        state = CausalRolloutState(student, cond, part, tuple(noise.shape), use_cache=use_cache)
        chunks, states = [], []
        for k in range(len(part)):
            outs = consistency_steps(state.velocity, noise[:, state.chunk_slice(k)], grid, exit_index, generator)
            states.extend(outs)
            chunks.append(outs[-1])
            state.commit(outs[-1])
        sample = torch.cat(chunks, dim=1)
    else:
        states = consistency_steps(bidirectional_velocity(student, cond), noise, grid, exit_index, generator)
        sample = states[-1]
    segments = tuple((t, 0.0) for t in grid[: exit_index + 1])
    return Rollout(sample, states, segments, {"steps": steps, "exit_index": exit_index})
