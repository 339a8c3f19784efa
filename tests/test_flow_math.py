"""Pure Stage-1 math (Alg. 1): samplers, guidance fusion, finite difference, weights."""

import math

import pytest
import torch

from anystep.flow.schedule import add_noise, sampling_grid, shift_sigma
from anystep.flow.stage1 import (
    SAMPLE_BOUNDARY,
    SAMPLE_GENERAL,
    SAMPLE_TO_ZERO,
    adaptive_weights,
    finite_difference_derivative,
    finite_difference_inputs,
    flow_map_target,
    guidance_fused_velocity,
    loss_weight,
    sample_t_r,
    sample_types,
)


def test_shift_and_grid_match_the_diffusers_scheduler():
    from diffusers import FlowMapEulerDiscreteScheduler

    s = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(shift_sigma(s), 5 * s / (1 + 4 * s))
    sch = FlowMapEulerDiscreteScheduler(shift=5.0)
    for n in (1, 2, 4, 7):
        sch.set_timesteps(n)
        assert torch.allclose(sampling_grid(n).float(), sch.sigmas.float(), atol=1e-6)
    # The 4-step grid of the reference consistency baseline, in timesteps.
    assert torch.allclose(sampling_grid(4)[:4] * 1000, torch.tensor([1000, 937.5, 833.333, 625], dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize("n", range(1, 9))
def test_sample_types_split(n):
    types = sample_types(n)
    nb = int((types == SAMPLE_BOUNDARY).sum())
    assert nb >= 1
    assert nb == max(1, round(n * 0.5))
    assert int((types == SAMPLE_TO_ZERO).sum()) == min(n - nb, round(n * 0.25))
    # Order by position: boundary, then r = 0, then general.
    assert torch.equal(types, types.sort().values)


def test_sample_types_large_batch_fractions():
    types = sample_types(32)
    assert [int((types == k).sum()) for k in (SAMPLE_BOUNDARY, SAMPLE_TO_ZERO, SAMPLE_GENERAL)] == [16, 8, 8]


def test_t_r_sampler():
    types = sample_types(40000)
    g = torch.Generator().manual_seed(0)
    t, r = sample_t_r(types, shift=1.0, generator=g)
    assert torch.all(t >= r)
    b, z, gen = types == SAMPLE_BOUNDARY, types == SAMPLE_TO_ZERO, types == SAMPLE_GENERAL
    assert torch.equal(t[b], r[b]) and torch.all(r[z] == 0) and torch.all(t[gen] > r[gen])
    # Unshifted t is the max of two uniforms: density 2t, mean 2/3; r has mean 1/3.
    assert abs(t.mean().item() - 2 / 3) < 0.01
    assert abs(r[gen].mean().item() - 1 / 3) < 0.02
    t5, _ = sample_t_r(types, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t5, shift_sigma(t.double()).float(), atol=1e-6)


def test_guidance_fusion_algebra():
    torch.manual_seed(0)
    uc, un = torch.randn(3, 4), torch.randn(3, 4)
    g = 3.0
    u = guidance_fused_velocity(uc, un, g)
    # Solving u = u_tgt for u_c gives the guided velocity: u_c = u_null + g (u_tgt - u_null) ...
    # equivalently the fused prediction equals the target when u_c is the CFG-guided field.
    target = torch.randn(3, 4)
    uc_star = g * target + (1 - g) * un
    assert torch.allclose(guidance_fused_velocity(uc_star, un, g), target, atol=1e-6)
    assert torch.allclose(u, (uc - (1 - g) * un) / g)
    # Gradient flows only through u_cond.
    uc.requires_grad_(True)
    un.requires_grad_(True)
    guidance_fused_velocity(uc, un, g).sum().backward()
    assert torch.allclose(uc.grad, torch.full_like(uc, 1 / g)) and un.grad is None
    # g = 1 is plain conditional training.
    assert torch.allclose(guidance_fused_velocity(uc.detach(), un.detach(), 1.0), uc.detach())


def test_finite_difference_exact_on_a_known_field():
    """For u(z, t) = a * t^2 + b * <z>, along z_s = (1-s) x + s e the total derivative is
    2 a t + b <v>; the central difference is exact for quadratics."""
    torch.manual_seed(0)
    x, e = torch.randn(2, 5), torch.randn(2, 5)
    t = torch.tensor([0.7, 0.3])
    z = add_noise(x, e, t)
    v = e - x
    a, b = 1.7, -0.4

    def u(zz, tt):
        return a * tt[:, None] ** 2 + b * zz.mean(1, keepdim=True) + 0 * zz

    zp, zm, tp, tm = finite_difference_inputs(z, v, t, eps=0.005)
    dudt = finite_difference_derivative(u(zp, tp), u(zm, tm), eps=0.005, g=1.0)
    exact = 2 * a * t[:, None] + b * v.mean(1, keepdim=True)
    assert torch.allclose(dudt, exact.expand_as(dudt), atol=1e-4)
    # The guidance scale divides the derivative.
    assert torch.allclose(finite_difference_derivative(u(zp, tp), u(zm, tm), 0.005, g=3.0), dudt / 3, atol=1e-5)


def test_target_reduces_to_velocity_on_the_boundary():
    v, d = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.9, 0.5, 0.5, 0.2])
    r = torch.tensor([0.9, 0.1, 0.5, 0.0])
    tgt = flow_map_target(v, d, t, r)
    assert torch.allclose(tgt[[0, 2]], v[[0, 2]])
    assert torch.allclose(tgt[1], v[1] - 0.4 * d[1])


@pytest.mark.parametrize("kind", ["beta", "uniform", "normal"])
def test_loss_weights_have_mean_one(kind):
    t = torch.rand(1000)
    w = loss_weight(t, kind)
    assert abs(w.mean().item() - 1) < 1e-5 and torch.all(w >= 0)


def test_beta_weight_shape():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    w = loss_weight(t, "beta")
    raw = t * (1 - t).sqrt()
    assert torch.allclose(w, raw / raw.mean())
    assert w[0] == 0 and w[-1] == 0
    # Beta(2, 1.5) mode: (a-1)/(a+b-2) = 1/1.5 = 2/3.
    grid = torch.linspace(0, 1, 3001)
    assert abs(grid[loss_weight(grid, "beta").argmax()].item() - 2 / 3) < 1e-3
    with pytest.raises(ValueError):
        loss_weight(t, "cosine")


def test_adaptive_weights():
    loss = torch.tensor([1.0, 3.0, 0.5, 2.0])
    boundary = torch.tensor([True, True, False, False])
    w = adaptive_weights(loss, boundary, c=1e-5)
    assert torch.allclose(w[:2], torch.ones(2))
    assert torch.allclose(w[2:], 2.0 / (loss[2:] + 1e-5))
    # After weighting, every non-boundary sample contributes the boundary mean.
    assert torch.allclose((w * loss)[2:], torch.full((2,), 2.0), atol=1e-4)
    # A globally reduced mean overrides the local one.
    assert torch.allclose(adaptive_weights(loss, boundary, boundary_mean=torch.tensor(4.0))[2], torch.tensor(4.0 / 0.50001))
    with pytest.raises(ValueError):
        adaptive_weights(loss, torch.zeros(4, dtype=torch.bool))
    assert all(math.isfinite(x) for x in adaptive_weights(torch.zeros(3), torch.tensor([True, False, False])).tolist())


def _reference_loss_by_loop(mse, w, boundary, c=1e-5):
    """The reference Stage-1 loss tail written out sample by sample: l_i = w_i mse_i; mu = mean
    of l over the boundary samples; every other l_i times mu / (l_i + c) with that factor frozen.
    Returns per-sample (value, d value / d mse_i)."""
    n = len(mse)
    l = [w[i] * mse[i] for i in range(n)]
    bl = [l[i] for i in range(n) if boundary[i]]
    mu = sum(bl) / len(bl)
    vals, grads = [], []
    for i in range(n):
        if boundary[i]:
            vals.append(l[i])
            grads.append(w[i])
        else:
            factor = mu / (l[i] + c)
            vals.append(l[i] * factor)
            grads.append(w[i] * factor)
    return vals, grads


def _ratio_first_by_loop(mse, w, boundary, c=1e-5):
    n = len(mse)
    mu = sum(mse[i] for i in range(n) if boundary[i]) / sum(1 for b in boundary if b)
    return [mse[i] * w[i] * (1.0 if boundary[i] else mu / (mse[i] + c)) for i in range(n)]


def test_stage1_weighting_matches_the_reference_formula():
    from anystep.flow.stage1 import adaptive_base_loss, weighted_stage1_loss

    g = torch.Generator().manual_seed(3)
    n = 8
    mse = (torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.01).requires_grad_(True)
    t = shift_sigma(torch.rand(n, generator=g, dtype=torch.float64))
    w = loss_weight(t, "beta").double()
    boundary = torch.tensor([True, True, True, False, False, True, False, False])
    out = weighted_stage1_loss(mse, w, boundary, order="wt_first")
    out.sum().backward()
    vals, grads = _reference_loss_by_loop(mse.tolist(), w.tolist(), boundary.tolist())
    assert torch.allclose(out.detach(), torch.tensor(vals, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(mse.grad, torch.tensor(grads, dtype=torch.float64), rtol=1e-12)
    # The point of the order: the gradient of a t != r sample does not depend on its w(t) ...
    w2 = w.clone()
    w2[3] *= 7.0
    mse.grad = None
    weighted_stage1_loss(mse, w2, boundary, order="wt_first").sum().backward()
    g_ref = torch.tensor(grads, dtype=torch.float64)
    assert mse.grad[3] == pytest.approx(g_ref[3].item(), rel=1e-4)  # equal up to the c = 1e-5 term
    # ... while the earlier order scales it by w(t).
    assert torch.allclose(weighted_stage1_loss(mse, w, boundary, order="ratio_first"),
                          torch.tensor(_ratio_first_by_loop(mse.tolist(), w.tolist(), boundary.tolist()), dtype=torch.float64))
    assert not torch.allclose(weighted_stage1_loss(mse, w, boundary, order="ratio_first"), out.detach())


def test_stage1_weighting_on_a_slice_without_boundary_samples():
    """Two ranks of a global batch of 8 where the second rank holds no boundary sample: with mu
    taken over the global batch (what the all-reduce hands over), each rank's per-sample losses
    are the reference loop's on the whole batch, and finite."""
    from anystep.flow.stage1 import adaptive_base_loss, weighted_stage1_loss

    g = torch.Generator().manual_seed(4)
    mse = torch.rand(8, generator=g, dtype=torch.float64) + 0.05
    w = loss_weight(shift_sigma(torch.rand(8, generator=g, dtype=torch.float64)), "beta").double()
    boundary = sample_types(8) == SAMPLE_BOUNDARY
    assert boundary[:4].all() and not boundary[4:].any()
    vals, _ = _reference_loss_by_loop(mse.tolist(), w.tolist(), boundary.tolist())
    for order in ("wt_first", "ratio_first"):
        base = adaptive_base_loss(mse, w, order)
        mu = base[boundary].mean()
        got = torch.cat([weighted_stage1_loss(mse[s], w[s], boundary[s], order, boundary_mean=mu)
                         for s in (slice(0, 4), slice(4, 8))])
        assert torch.isfinite(got).all()
        if order == "wt_first":
            assert torch.allclose(got, torch.tensor(vals, dtype=torch.float64), rtol=1e-12)
    with pytest.raises(ValueError):  # no boundary sample and no global mu: refuse, never NaN
        weighted_stage1_loss(mse[4:], w[4:], boundary[4:])
    with pytest.raises(ValueError):
        adaptive_base_loss(mse, w, "paper")
    # Without Eq. 7 both orders are w(t) * mse.
    for order in ("wt_first", "ratio_first"):
        assert torch.allclose(weighted_stage1_loss(mse, w, boundary, order, adaptive=False), mse * w)
