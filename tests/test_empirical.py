"""The exact empirical-flow teacher (docs/design.md section 5): its posterior mean against a plain
computation, a training clip at many steps, the blurred mean at one step, and its batched form
(per-sample t and prompt) against the pure function."""

import math

import numpy as np
import pytest
import torch

from anystep.flow.empirical import EmpiricalFlow, empirical_posterior_mean, empirical_velocity, prompt_clips
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


@pytest.fixture(scope="module")
def flow(tiny_teacher):
    return EmpiricalFlow.from_folder(tiny_teacher, clips_per_prompt=8)


def test_batched_posterior_means_match_the_pure_function_per_sample(flow):
    """Per-sample t and prompt in one batch against empirical_posterior_mean on each prompt's own
    clips (conditional) and on the whole set with a uniform prior (unconditional)."""
    prompts = ["a green seven moving up", "a red zero moving left", "a green seven moving up"]
    ids = flow.prompt_ids(prompts)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.9, 0.5, 0.2])
    x = flow.bank[ids * flow.k].view(3, *flow.latent_shape)
    z = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=g)
    mean_c, mean_u = flow.posterior_means(z, t, ids)
    own = flow.bank.view(len(flow.prompts), flow.k, -1)
    for b in range(3):
        want_c = empirical_posterior_mean(z[b : b + 1].flatten(1).double(), float(t[b]), own[ids[b]].double())
        want_u = empirical_posterior_mean(z[b : b + 1].flatten(1).double(), float(t[b]), flow.bank.double())
        assert (mean_c[b].flatten() - want_c[0]).abs().max() < 1e-4
        assert (mean_u[b].flatten() - want_u[0]).abs().max() < 1e-4
    # The guided x0 is z - t v for the guided velocity, written without the division by t.
    v = flow.velocity(z, t, ids, guidance=4.0)
    x0 = flow.x0(z, t, ids, guidance=4.0)
    assert (z - t.view(-1, 1, 1, 1, 1) * v - x0).abs().max() < 1e-3
    with pytest.raises(ValueError, match="knows the world"):
        flow.prompt_ids(["a magenta one moving up"])


def test_empirical_flow_lands_on_a_clip_of_the_prompt_and_one_step_is_their_mean(flow, tiny_teacher):
    from anystep.eval.clip_analysis import clip_scores
    from anystep.sampling import initial_noise, latents_to_video, load_model

    prompt = "a green seven moving up"
    own = flow.bank.view(len(flow.prompts), flow.k, -1)[flow.index[prompt]]
    noise = initial_noise(flow.latent_shape, 1, 5)
    one = flow.sample(noise, [prompt], 1)
    assert (one.flatten(1)[0] - own.mean(0)).abs().max() < 1e-4  # t = 1: the posterior is the prior
    for guidance in (None, 4.0):
        many = flow.sample(noise, [prompt], 20, guidance).flatten(1)
        assert (own - many).abs().max(1).values.min() < 1e-2
    video = latents_to_video(load_model(tiny_teacher), flow.sample(noise, [prompt], 20))[0].numpy()
    # The clip set is the world's: rendered in the prompt's colour and direction, of its digit.
    assert len(prompt_clips(prompt, flow.world)) > flow.k
    assert clip_scores(video, prompt)["total"] > 95


def test_posterior_means_ignore_a_training_steps_bf16_autocast(flow):
    """A training step runs its loss under bf16 autocast (CUDA, one process); the real score must
    not: |z.x| ~ 2e4 in bf16 would scramble the posterior. CPU autocast stands in for CUDA's."""
    prompts = ["a green seven moving up", "a red zero moving left"]
    ids = flow.prompt_ids(prompts)
    x = flow.bank[ids * flow.k].view(2, *flow.latent_shape)
    t = torch.tensor([0.6, 0.3])
    z = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    plain = flow.x0(z, t, ids, guidance=4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = flow.x0(z, t, ids, guidance=4.0)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    with pytest.raises(ValueError, match="expects"):
        flow.halves_velocity(ids)(z, 0.5)  # Euler without guidance passes z, not [z; z]

