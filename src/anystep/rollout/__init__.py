"""Training rollouts (docs/design.md section 2, ``rollout/``): the student's own samples, with gradient.

* :mod:`anystep.rollout.flowmap` -- flow-map backward simulation (paper Eq. 8, Algorithm 2), three
  jumps with gradient at any step budget; bidirectional and causal (KV cache).
* :mod:`anystep.rollout.consistency` -- consistency backward simulation (the Self-Forcing / rCM
  baseline of Table 2) and the consistency sampler.
"""

from anystep.rollout.consistency import (
    consistency_backward_simulation,
    consistency_generate_latents,
    consistency_grid,
    consistency_sample,
    consistency_steps,
    predict_x0,
)
from anystep.rollout.flowmap import (
    CausalRolloutState,
    Rollout,
    causal_flowmap_rollout,
    flow_map_jumps,
    flowmap_backward_simulation,
    flowmap_rollout,
    prepare_far_for_rollout,
)

__all__ = [
    "CausalRolloutState",
    "Rollout",
    "causal_flowmap_rollout",
    "consistency_backward_simulation",
    "consistency_generate_latents",
    "consistency_grid",
    "consistency_sample",
    "consistency_steps",
    "flow_map_jumps",
    "flowmap_backward_simulation",
    "flowmap_rollout",
    "predict_x0",
    "prepare_far_for_rollout",
]
