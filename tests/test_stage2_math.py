"""Stage-2 math: backward-simulation plans (Eq. 8), DMD gradient (Eq. 5), consistency re-noising."""

import pytest
import torch

from anystep.flow.schedule import sampling_grid
from anystep.flow.stage2 import (
    REFERENCE_STEP_BUDGETS,
    consistency_renoise,
    dmd_gradient,
    dmd_loss,
    flow_map_segments,
    sample_budget_and_index,
)
from anystep.flow.matching import x0_from_velocity


def test_segments_cover_the_trajectory_and_skip_equal_ends():
    for s in (1, 2, 4, 16, 50):
        grid = sampling_grid(s)
        for g in range(s):
            plan = flow_map_segments(s, g)
            segs = plan.segments
            assert segs[0][0] == 1.0 and segs[-1][1] == 0.0
            assert all(a > b for a, b in segs)  # no identity jumps left
            assert all(segs[i][1] == segs[i + 1][0] for i in range(len(segs) - 1))  # contiguous
            # The target step is exactly one grid step.
            assert (float(grid[g]), float(grid[g + 1])) in segs
            assert len(segs) == 3 - (g == 0) - (g == s - 1)
    assert flow_map_segments(1, 0).segments == ((1.0, 0.0),)
    with pytest.raises(ValueError):
        flow_map_segments(4, 4)


def test_budget_and_index_are_reproducible_and_uniform():
    draws = [sample_budget_and_index(REFERENCE_STEP_BUDGETS, torch.Generator().manual_seed(k)) for k in range(4000)]
    assert draws[:10] == [sample_budget_and_index(REFERENCE_STEP_BUDGETS, torch.Generator().manual_seed(k)) for k in range(10)]
    assert {s for s, _ in draws} == set(REFERENCE_STEP_BUDGETS)
    assert all(0 <= g < s for s, g in draws)
    g4 = [g for s, g in draws if s == 4]
    assert set(g4) == {0, 1, 2, 3}
    assert abs(sum(g4) / len(g4) - 1.5) < 0.15


def test_x0_from_velocity_inverts_noising():
    x, e = torch.randn(3, 5), torch.randn(3, 5)
    s = torch.tensor([0.2, 0.5, 0.9])
    z = (1 - s[:, None]) * x + s[:, None] * e
    assert torch.allclose(x0_from_velocity(z, e - x, s), x, atol=1e-6)


def test_dmd_gradient_matches_an_independent_computation():
    torch.manual_seed(0)
    x_hat = torch.randn(2, 3, 4, requires_grad=True)
    real, fake = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    grad = dmd_gradient(x_hat.detach(), real, fake)
    for i in range(2):
        w = (x_hat[i].detach().double() - real[i].double()).abs().mean()
        assert torch.allclose(grad[i], (fake[i].double() - real[i].double()) / w)
    loss = dmd_loss(x_hat, grad)
    assert loss.dtype == torch.float64
    loss.backward()
    # d/dx mean((x - sg(x - g))^2) = 2 g / N: the update moves x_hat away from fake, towards real.
    assert torch.allclose(x_hat.grad.double(), 2 * grad / x_hat.numel())
    step = -x_hat.grad
    assert torch.sum(step.double() * (real - fake).double()) > 0
    assert torch.allclose(loss, grad.pow(2).mean())


def test_dmd_gradient_handles_an_exact_sample():
    x = torch.zeros(1, 4)
    grad = dmd_gradient(x, x.clone(), torch.ones(1, 4))
    assert torch.all(torch.isfinite(grad)) and torch.all(grad == 0)


def test_consistency_renoise_uses_fresh_noise():
    x0 = torch.zeros(2, 3)
    a = consistency_renoise(x0, 0.5, torch.Generator().manual_seed(0))
    b = consistency_renoise(x0, 0.5, torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)
    assert torch.allclose(consistency_renoise(x0 + 1, 0.0), x0 + 1)
