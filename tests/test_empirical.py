"""The exact empirical-flow teacher (docs/design.md section 5): its posterior mean against a plain
computation, a training clip at many steps, the blurred mean at one step."""

import math

import numpy as np
import pytest
import torch

from anystep.flow.empirical import EmpiricalTeacher, empirical_posterior_mean, empirical_velocity, prompt_clips
from anystep.flow.schedule import sampling_grid


def test_posterior_mean_matches_a_plain_computation():
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z = torch.randn(3, 5, generator=g, dtype=torch.float64)
    prior = torch.tensor([0.1, 0.3, 0.2, 0.1, 0.2, 0.1], dtype=torch.float64)
    for t in (1.0, 0.7, 0.2):
        got = empirical_posterior_mean(z, t, clips, prior.log())
        for b in range(3):
            # Gaussian densities N(z; (1 - t) x_i, t^2 I) times the prior, normalised, by hand.
            w = [prior[i].item() * math.exp(-sum((z[b, d].item() - (1 - t) * clips[i, d].item()) ** 2 for d in range(5))
                                            / (2 * t * t)) for i in range(6)]
            want = [sum(w[i] * clips[i, d].item() for i in range(6)) / sum(w) for d in range(5)]
            assert got[b].tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError):
        empirical_posterior_mean(z, 0.0, clips)


def _euler(clips, z, steps):
    grid = [float(v) for v in sampling_grid(steps, 5.0)]
    for t, t_next in zip(grid[:-1], grid[1:]):
        z = z - (t - t_next) * empirical_velocity(z, t, clips)
    return z


def test_many_steps_reach_a_training_clip_and_one_step_gives_the_mean():
    g = torch.Generator().manual_seed(1)
    clips = torch.randn(8, 40, generator=g, dtype=torch.float64)
    noise = torch.randn(16, 40, generator=g, dtype=torch.float64)
    one = _euler(clips, noise, 1)
    assert torch.allclose(one, clips.mean(0).expand_as(one), atol=1e-12)  # t = 1: the posterior is the prior
    many = _euler(clips, noise, 50)
    nearest = torch.cdist(many, clips).min(1).values
    assert nearest.max() < 1e-3 * clips.norm(dim=1).min()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from conftest import make_tiny_teacher

    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_empirical_teacher_on_movingdigits(tiny_teacher):
    """In a model folder's latent space: 1 step is the mean of the prompt's training clips (a blur of
    ~2,500 placements), 20 steps is one of those clips; CFG with the mixture keeps that."""
    from anystep.eval.clip_analysis import clip_scores

    teacher = EmpiricalTeacher(str(tiny_teacher), n_others=64)
    prompt = "a green seven moving up"
    clips = prompt_clips(prompt, teacher.world)
    assert len(clips) % (teacher.world.canvas - teacher.world.digit_size + 1) == 0 and len(clips) > 1000
    out = teacher.generate([(prompt, 5)], [1, 20])
    assert np.abs(out[1][0] - clips.mean(0)).max() < 1e-4
    d = np.abs(clips - out[20][0][None]).reshape(len(clips), -1).max(1)
    assert d.min() < 1e-3
    assert clip_scores(out[20][0], prompt)["total"] > 95 > clip_scores(out[1][0], prompt)["total"]
    guided = teacher.generate([(prompt, 5)], [20], guidance=4.0)[20][0]
    assert np.abs(clips - guided[None]).reshape(len(clips), -1).max(1).min() < 1e-2
