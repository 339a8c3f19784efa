"""Classifier-free guidance, in one convention: the usual form ``v_u + w (v_c - v_u)``.

w = 1 is the conditional velocity alone; the reference recipe's real score and the teacher's
default sampler use w = 4. The paper's Stage-2 real score is often written
``v_c + w' (v_c - v_u)`` with w' = 3: the same family, since ``v_c + w' (v_c - v_u) =
v_u + (1 + w') (v_c - v_u)``, so w' = 3 is w = 4. Guidance-fused training (Eq. 6,
:func:`anystep.flow.stage1.guidance_fused_velocity`) at g = 3 makes the student's prediction stand
for ``v_u + 3 (v_c - v_u)``, the field the consistency ODE-init regresses too.
"""

from __future__ import annotations

import torch


def guided_velocity(v_cond: torch.Tensor, v_null: torch.Tensor, scale: float) -> torch.Tensor:
    """``v_u + w (v_c - v_u)`` with w = ``scale`` (1 = no guidance)."""
    return v_null + scale * (v_cond - v_null)
