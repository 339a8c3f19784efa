"""Training rollouts (docs/design.md section 2, ``rollout/``): the student's own samples, with gradient.

* :mod:`anystep.rollout.flowmap` -- flow-map backward simulation (paper Eq. 8, Algorithm 2), three
  jumps with gradient at any step budget; bidirectional and causal (KV cache).
* :mod:`anystep.rollout.consistency` -- consistency backward simulation (the Self-Forcing / rCM
  baseline of Table 2).

Sampling (no gradient, every step) is :mod:`anystep.sampling` over :mod:`anystep.flow.solvers`.
"""

from anystep.rollout.consistency import consistency_backward_simulation
from anystep.rollout.flowmap import (
    Rollout,
    causal_flowmap_rollout,
    flowmap_backward_simulation,
    flowmap_rollout,
)

__all__ = [
    "Rollout",
    "causal_flowmap_rollout",
    "consistency_backward_simulation",
    "flowmap_backward_simulation",
    "flowmap_rollout",
]
