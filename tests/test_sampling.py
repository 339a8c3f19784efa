"""Teacher sampling through diffusers' WanPipeline equals an independent Euler + CFG loop."""

import pytest
import torch

from anystep.flow.schedule import sampling_grid
from anystep.models.students import teacher_velocity
from anystep.models.text import encode_prompts
from anystep.sampling import generate, generate_latents, initial_noise, load_model, nfe


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import make_tiny_teacher

    out = tmp_path_factory.mktemp("t")
    return load_model(make_tiny_teacher(out, steps=3))


@pytest.mark.parametrize("steps, guidance", [(1, 4.0), (3, 4.0), (3, 1.0)])
def test_teacher_pipeline_matches_independent_euler_cfg(teacher, steps, guidance):
    prompts = ["a red three moving left", "a blue seven moving up"]
    got = generate_latents(teacher, prompts, steps, seed=5, guidance_scale=guidance)

    pipe = teacher.pipe
    z = initial_noise((7, 48, 8, 8), len(prompts), 5)
    with torch.no_grad():
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, teacher.max_sequence_length)
        null = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""] * len(prompts), teacher.max_sequence_length)
        grid = sampling_grid(steps, shift=5.0)
        for i in range(steps):
            t = grid[i].float().expand(len(prompts))
            vc = teacher_velocity(pipe.transformer, z, t, cond)
            v = vc
            if guidance > 1:
                vu = teacher_velocity(pipe.transformer, z, t, null)
                v = vu + guidance * (vc - vu)
            z = z + float(grid[i + 1] - grid[i]) * v
    assert got.shape == z.shape
    assert (got - z).abs().max() < 1e-4


def test_clip_does_not_depend_on_its_batch(teacher):
    both = generate(teacher, ["a red three moving left", "a blue seven moving up"], 2, seed=0)
    alone = generate(teacher, ["a blue seven moving up"], 2, seed=1)
    assert both.shape == (2, 7, 3, 32, 32)
    assert (both[1] - alone[0]).abs().max() < 1e-4


def test_nfe_counts_guidance(teacher):
    assert nfe(teacher, 50) == 100 and nfe(teacher, 4, guidance_scale=1.0) == 4


def test_bad_steps_and_canvas(teacher):
    with pytest.raises(ValueError, match=">= 1"):
        generate_latents(teacher, ["a red one moving up"], 0)
    with pytest.raises(ValueError, match="divisible"):
        generate_latents(teacher, ["a red one moving up"], 1, height=36)
