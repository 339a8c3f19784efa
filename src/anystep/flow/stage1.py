"""Stage 1 forward flow-map training math (paper Sec. 4.2.1, Algorithm 1; docs/design.md section 3).

Pure tensor functions, no module state. Sigma convention: 1 = noise, 0 = data; a flow-map step is
``z_r = z_t - (t - r) u(z_t, t, r)``.
"""

from __future__ import annotations

import math

import torch

from anystep.flow.schedule import shift_sigma

SAMPLE_BOUNDARY, SAMPLE_TO_ZERO, SAMPLE_GENERAL = 0, 1, 2


def sample_types(global_batch: int, boundary_frac: float = 0.5, zero_frac: float = 0.25) -> torch.Tensor:
    """Sample type of every position of the *global* batch (Alg. 1 time sampler split).

    The first ``boundary_frac`` of positions are boundary samples (r = t), the next ``zero_frac``
    go to r = 0, the rest are general pairs. At least one boundary sample is always kept: the
    adaptive weight (Eq. 7) is normalised by the boundary loss, and a batch without one would
    divide by an empty mean (the reference code returns NaN there).
    """
    if global_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {global_batch}")
    n_boundary = max(1, int(round(global_batch * boundary_frac)))
    n_zero = min(global_batch - n_boundary, int(round(global_batch * zero_frac)))
    types = torch.full((global_batch,), SAMPLE_GENERAL, dtype=torch.long)
    types[:n_boundary] = SAMPLE_BOUNDARY
    types[n_boundary : n_boundary + n_zero] = SAMPLE_TO_ZERO
    return types


def sample_t_r(
    types: torch.Tensor, shift: float = 5.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) sigmas for each sample type: t = max(u1, u2), r = min(u1, u2), then the shift.

    The density of t before the shift is 2t (the max of two uniforms, Fig. 10a's p(t)).
    Boundary samples get r = t, r = 0 samples keep only t.
    """
    n = types.shape[0]
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    t = shift_sigma(u.max(0).values, shift)
    r = shift_sigma(u.min(0).values, shift)
    r = torch.where(types == SAMPLE_BOUNDARY, t, r)
    r = torch.where(types == SAMPLE_TO_ZERO, torch.zeros_like(r), r)
    return t.float(), r.float()


def guidance_fused_velocity(u_cond: torch.Tensor, u_null: torch.Tensor, g: float = 3.0) -> torch.Tensor:
    """Eq. 6: u = (u_c - (1 - g) sg(u_null)) / g.

    Training the conditional prediction through this map makes the *guided* velocity
    ``u_null + g (u_c - u_null)`` the regression target's counterpart, so the student needs no CFG
    at test time while keeping the pretrained guidance scale's meaning.
    """
    return (u_cond - (1.0 - g) * u_null.detach()) / g


def finite_difference_inputs(
    z: torch.Tensor, v: torch.Tensor, t: torch.Tensor, eps: float = 0.005
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 4 evaluation points: z± = z ± eps v with t ± eps (sigma units).

    Moving z along the data velocity v = e - x keeps z± on the same straight noising path
    (z_s = (1 - s) x + s e has dz/ds = v), so the difference quotient is the total derivative
    du/dt along the path that the MeanFlow identity needs.
    """
    return z + eps * v, z - eps * v, t + eps, t - eps


def finite_difference_derivative(
    u_plus: torch.Tensor, u_minus: torch.Tensor, eps: float = 0.005, g: float = 3.0
) -> torch.Tensor:
    """Eq. 4 central difference, divided by g as in Alg. 1.

    ``u_plus``/``u_minus`` are the *conditional* outputs at z± ; dividing by g matches the scale of
    the guidance-fused prediction (Eq. 6), whose conditional part enters with weight 1/g.
    """
    return (u_plus - u_minus) / (2.0 * eps * g)


def flow_map_target(v: torch.Tensor, dudt: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Eq. 3 target: u_tgt = v - (t - r) du/dt, with t - r in sigma units like eps."""
    dt = (t - r).view(-1, *([1] * (v.ndim - 1))).to(v.dtype)
    return v - dt * dudt


def loss_weight(t: torch.Tensor, kind: str = "beta") -> torch.Tensor:
    """w(t) of Fig. 10, evaluated on the shifted t and normalised to mean 1 over the batch.

    ``beta``: t (1 - t)^0.5, the Beta(2, 1.5) density shape (reference default);
    ``uniform``: 1; ``normal``: N(0.5, 0.25) density shape.
    """
    t = t.double()
    if kind == "beta":
        w = t * (1 - t).clamp_min(0).sqrt()
    elif kind == "uniform":
        w = torch.ones_like(t)
    elif kind == "normal":
        w = torch.exp(-0.5 * ((t - 0.5) / 0.25) ** 2) / (0.25 * math.sqrt(2 * math.pi))
    else:
        raise ValueError(f"unknown loss weight {kind!r} (beta, uniform, normal)")
    mean = w.mean()
    if mean <= 0:  # every t at an end point where the Beta shape vanishes
        return torch.ones_like(t).float()
    return (w / mean).float()


def adaptive_weights(
    per_sample_loss: torch.Tensor, is_boundary: torch.Tensor, c: float = 1e-5, boundary_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 7: weight 1 on boundary samples, mu / (loss_i + c) elsewhere, all detached.

    ``mu`` is the mean loss over the boundary samples of the *global* batch; pass
    ``boundary_mean`` when it was all-reduced across ranks. Scaling every t != r loss to the
    boundary level keeps the well-trained instantaneous field (r = t) from being overwhelmed.
    Which loss Eq. 7 sees (before or after w(t)) is :func:`adaptive_base_loss`'s business.
    """
    loss = per_sample_loss.detach()
    if boundary_mean is None:
        if not bool(is_boundary.any()):
            raise ValueError("adaptive weighting needs at least one boundary (r = t) sample")
        boundary_mean = loss[is_boundary].mean()
    w = boundary_mean.detach() / (loss + c)
    return torch.where(is_boundary, torch.ones_like(w), w)


# Where w(t) (Fig. 10) sits relative to Eq. 7's ratio. The paper states both but not their order.
# "wt_first" is what the reference code does (NVlabs/AnyFlow, the loss tail of the Stage-1
#   trainers): l_i = w(t_i) mse_i, mu and the ratio taken on l, so w(t) cancels for t != r and only
#   shapes the boundary samples.
# "ratio_first" is anystep's earlier reading: Eq. 7 on the raw MSE, then w(t) on every sample; it
#   down-weights t != r samples at high t (where the Beta shape falls) relative to the reference.
ADAPTIVE_ORDERS = ("wt_first", "ratio_first")


def _check_order(order: str) -> None:
    if order not in ADAPTIVE_ORDERS:
        raise ValueError(f"adaptive_order must be one of {ADAPTIVE_ORDERS}, got {order!r}")


def adaptive_base_loss(mse: torch.Tensor, w_t: torch.Tensor, order: str = "wt_first") -> torch.Tensor:
    """The per-sample loss Eq. 7 normalises: ``w(t) * mse`` (``wt_first``) or ``mse`` (``ratio_first``).

    Its mean over the boundary samples of the global batch is the ``boundary_mean`` that
    :func:`weighted_stage1_loss` takes (all-reduce it across ranks first).
    """
    _check_order(order)
    return mse * w_t if order == "wt_first" else mse


def weighted_stage1_loss(
    mse: torch.Tensor, w_t: torch.Tensor, is_boundary: torch.Tensor, order: str = "wt_first", c: float = 1e-5,
    boundary_mean: torch.Tensor | None = None, adaptive: bool = True,
) -> torch.Tensor:
    """Per-sample Stage-1 loss: the Fig. 10 weight w(t) and Eq. 7's adaptive weight, in ``order``.

    ``boundary_mean``: the global-batch mean of :func:`adaptive_base_loss` over boundary samples
    (needed when this slice holds none). Without ``adaptive`` both orders give ``w(t) * mse``.
    """
    base = adaptive_base_loss(mse, w_t, order)
    if not adaptive:
        return mse * w_t
    a = adaptive_weights(base, is_boundary, c, boundary_mean=boundary_mean)
    return base * a if order == "wt_first" else base * a * w_t
