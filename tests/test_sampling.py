"""Teacher sampling through diffusers' WanPipeline equals an independent Euler + CFG loop."""

import pytest
import torch

from anystep.flow.schedule import sampling_grid
from anystep.models.velocity import teacher_velocity
from anystep.models.text import encode_prompts
from anystep.sampling import generate, generate_latents, initial_noise, load_model, nfe
from anystep.models.toy import TOY_TRANSFORMER

TOY_CHANNELS = TOY_TRANSFORMER["in_channels"]  # latent channels of the shipped toy


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
    z = initial_noise((7, TOY_CHANNELS, 8, 8), len(prompts), 5)
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


def test_consistency_folders_use_the_consistency_sampler(teacher, tmp_path):
    from anystep.models.folders import ModelFolderError, SAMPLER_FILE, save_anyflow_folder
    from anystep.models.students import student_from_teacher

    pipe = teacher.pipe
    student = student_from_teacher(pipe.transformer).eval()
    flow = save_anyflow_folder(tmp_path / "flow", student, pipe.text_encoder, pipe.tokenizer, pipe.vae)
    cons = save_anyflow_folder(tmp_path / "cons", student, pipe.text_encoder, pipe.tokenizer, pipe.vae, sampler="consistency")
    mf, mc = load_model(flow), load_model(cons)
    assert (mf.sampler, mc.sampler) == ("flowmap", "consistency")
    prompts = ["a red one moving left", "a blue two moving up"]
    z_c = generate_latents(mc, prompts, steps=3, seed=5)
    z_f = generate_latents(mf, prompts, steps=3, seed=5)
    mf.sampler = "consistency"  # the same weights under the other sampler
    assert torch.equal(z_c, generate_latents(mf, prompts, steps=3, seed=5))
    mf.sampler = "flowmap"
    # Same weights, same initial noise: the samplers agree at one step and part ways after.
    assert not torch.allclose(z_c, z_f, atol=1e-3)
    assert torch.allclose(generate_latents(mc, prompts, steps=1, seed=5), generate_latents(mf, prompts, steps=1, seed=5), atol=1e-4)
    (cons / SAMPLER_FILE).write_text('{"sampler": "magic"}')
    with pytest.raises(ModelFolderError, match="unknown sampler"):
        load_model(cons)


def test_flow_matching_students_sample_like_the_teacher(teacher, tmp_path):
    """An AnyFlow copy of the teacher under the euler_cfg sampler reproduces the teacher's Euler + CFG
    (it evaluates at r = t, where the copy equals the teacher); a causal one runs chunk by chunk."""
    from anystep.models.folders import save_anyflow_folder
    from anystep.models.students import student_from_teacher

    pipe = teacher.pipe
    fm = save_anyflow_folder(tmp_path / "fm", student_from_teacher(pipe.transformer).eval(), pipe.text_encoder,
                             pipe.tokenizer, pipe.vae, sampler="euler_cfg")
    m = load_model(fm)
    prompts = ["a red one moving left", "a blue two moving up"]
    assert nfe(m, 3) == 6
    assert torch.allclose(generate_latents(m, prompts, steps=3, seed=2), generate_latents(teacher, prompts, steps=3, seed=2), atol=1e-4)
    far = student_from_teacher(pipe.transformer, causal=True, chunk_partition=(1, 3, 3)).eval()
    mf = load_model(save_anyflow_folder(tmp_path / "far", far, pipe.text_encoder, pipe.tokenizer, pipe.vae, sampler="euler_cfg"))
    z = generate_latents(mf, prompts, steps=2, seed=2)
    assert z.shape == (2, 7, TOY_CHANNELS, 8, 8) and torch.isfinite(z).all()
