"""Chunk-by-chunk FAR generation (T2V / I2V / V2V) against diffusers' AnyFlowFARPipeline."""

import numpy as np
import pytest
import torch

from anystep.conditioning import context_latents, read_frames
from anystep.cli import main
from anystep.data.moving_digits import MovingDigits
from anystep.sampling import generate_latents, initial_noise, load_model

PART = (1, 3, 3)
PROMPTS = ["a red one moving left", "a blue two moving up"]


@pytest.fixture(scope="module")
def far(tmp_path_factory):
    from conftest import make_tiny_teacher

    from anystep.models.students import student_folder_from_teacher

    root = tmp_path_factory.mktemp("far")
    teacher = make_tiny_teacher(root / "t", steps=2)
    return load_model(student_folder_from_teacher(teacher, root / "far", causal=True, chunk_partition=PART))


def test_text_to_video_matches_the_pipeline(far):
    seen = []
    ours = generate_latents(far, PROMPTS, steps=3, seed=4, on_chunk=lambda k, lat: seen.append((k, lat.shape[1])))
    noise = initial_noise(ours.shape[1:], len(PROMPTS), 4)
    ref = far.pipe(prompt=PROMPTS, latents=noise.permute(0, 2, 1, 3, 4), num_inference_steps=3, output_type="latent",
                   return_dict=False, max_sequence_length=far.max_sequence_length, chunk_partition=list(PART),
                   guidance_scale=1.0, use_kv_cache=True)[0].permute(0, 2, 1, 3, 4)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert seen == [(0, 1), (1, 4), (2, 7)]  # one call per finished chunk, the clip growing


@pytest.mark.parametrize("sampler", ["euler_cfg", "consistency"])
def test_each_sampler_runs_chunk_by_chunk(far, sampler):
    """A FAR student trained by flow matching (Euler + CFG) or as a consistency baseline is sampled
    chunk by chunk with its own sampler."""
    import dataclasses

    model = dataclasses.replace(far, sampler=sampler)
    seen = []
    ours = generate_latents(model, PROMPTS, steps=3, seed=4, on_chunk=lambda k, lat: seen.append(k))
    assert seen == [0, 1, 2]
    flowmap = generate_latents(far, PROMPTS, steps=3, seed=4)
    assert not torch.allclose(ours, flowmap, atol=1e-3)  # the sampler really changed
    if sampler == "consistency":  # one step from pure noise: denoise-to-x0 is the flow-map jump 1 -> 0
        assert torch.equal(generate_latents(model, PROMPTS, 1, seed=4), generate_latents(far, PROMPTS, 1, seed=4))


def test_image_and_video_conditioning_match_the_pipeline(far):
    clip = torch.from_numpy(MovingDigits("heldout").clip_for("red", 1, "left", seed=0).video)  # (7, 3, 32, 32)
    for frames, n_ctx in ((clip[:1], 1), (clip[:5], 4)):  # I2V: first chunk; V2V: 5 frames cover chunks 0-1
        ctx = context_latents(far, frames, 32, 32)
        assert ctx.shape[1] == n_ctx
        ours = generate_latents(far, PROMPTS[:1], steps=2, seed=1, context=ctx)
        assert torch.equal(ours[:, :n_ctx], ctx)  # the given chunks are kept as they are
        noise = initial_noise(ours.shape[1:], 1, 1)
        ref = far.pipe(prompt=PROMPTS[:1], latents=noise.permute(0, 2, 1, 3, 4), video_latents=ctx, num_inference_steps=2,
                       output_type="latent", return_dict=False, max_sequence_length=far.max_sequence_length,
                       chunk_partition=list(PART), guidance_scale=1.0)[0].permute(0, 2, 1, 3, 4)
        assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_cli_image_to_video_writes_the_image_as_first_frame(far, tmp_path, capsys):
    import imageio.v2 as imageio

    clip = MovingDigits("heldout").clip_for("green", 3, "up", seed=2).video
    img = ((clip[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
    imageio.imwrite(tmp_path / "first.png", img)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", "--model", far.folder, "--prompt", "a green three moving up", "--steps", "2",
                 "--image", str(tmp_path / "first.png"), "--out", str(out)]) == 0
    assert "chunk 3/3 done" in capsys.readouterr().out
    frames = read_frames(out)
    assert frames.shape[0] == 7
    # The codec is exact, so the first frame is the image (up to mp4 compression).
    first = ((frames[0].permute(1, 2, 0).numpy() + 1) * 127.5)
    small = first.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3)) if first.shape[0] == 128 else first
    assert np.abs(small - img.astype(np.float32)).mean() < 12


def test_conditioning_bad_input(far, tmp_path, capsys):
    from conftest import make_tiny_teacher

    teacher = make_tiny_teacher(tmp_path / "t", steps=1)
    capsys.readouterr()  # the teacher's training bar
    png = tmp_path / "x.png"
    import imageio.v2 as imageio

    imageio.imwrite(png, np.zeros((32, 32, 3), np.uint8))
    imageio.imwrite(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    bad = [
        ["--model", str(teacher), "--image", str(png)],  # not a FAR model
        ["--model", far.folder, "--image", str(tmp_path / "missing.png")],
        ["--model", far.folder, "--image", str(tmp_path / "big.png")],  # wrong size
        ["--model", far.folder, "--image", str(png), "--video", str(png)],
    ]
    for extra in bad:
        assert main(["generate", "--prompt", "a red one moving left", "--steps", "1", "--out", str(tmp_path / "o.mp4"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(e.startswith("anystep: error:") for e in err)
    assert not (tmp_path / "o.mp4").exists()


def test_toybench_image_to_video_keeps_each_real_first_frame(far, tmp_path):
    """ToyBench I2V: every clip starts from the first frame of its own prompt's held-out real clip,
    and the record says so; a context that does not end a chunk is refused."""
    from anystep.data.moving_digits import WorldConfig
    from anystep.eval.toybench import real_clips_for, toybench_prompts
    from anystep.eval.toybench_run import run_toybench

    res = run_toybench(far.folder, steps=(2,), out_dir=tmp_path / "i2v", n_prompts=4, n_show=4, context_frames=1)
    assert res["context_frames"] == 1
    shown = np.load(tmp_path / "i2v" / "samples_2.npy").astype(np.float32)
    real = real_clips_for(toybench_prompts(4, WorldConfig(num_frames=7)), WorldConfig(num_frames=7))
    # The codec is lossy (as the Wan VAE is): frame 0 is the real frame's round trip through it.
    codec = load_model(far.folder).codec
    kept = codec.latents_to_pixels(codec.pixels_to_latents(torch.from_numpy(real))).numpy()
    assert np.abs(shown[:, 0] - kept[:, 0]).max() < 1e-2  # float16 storage
    assert np.abs(shown[:, 1:] - real[:, 1:]).max() > 0.5  # the rest is generated
    with pytest.raises(ValueError, match=r"use one of \[1, 4\]"):
        run_toybench(far.folder, steps=(2,), out_dir=tmp_path / "bad", n_prompts=4, context_frames=2)
