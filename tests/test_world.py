"""MovingDigits generator, the pixel codec and the text path."""

import types

import numpy as np
import pytest
from pathlib import Path
import torch

from anystep.data.moving_digits import (
    COLORS,
    DIRECTIONS,
    MovingDigits,
    WorldConfig,
    digit_images,
    make_prompt,
    opposite_direction,
    parse_prompt,
    split_indices,
)
from anystep.models.codec import SpaceToDepthCodec, fit_codec
from anystep.models.text import build_tiny_umt5, build_word_tokenizer, encode_prompts


def test_clip_generator_is_deterministic_and_labelled():
    a, b = MovingDigits("train", seed=3), MovingDigits("train", seed=3)
    for i in (0, 5, 1234):
        ca, cb = a[i], b[i]
        assert np.array_equal(ca.video, cb.video) and ca.prompt == cb.prompt
        assert ca.prompt == make_prompt(ca.color, ca.digit, ca.direction)
        assert parse_prompt(ca.prompt) == (ca.color, ca.digit, ca.direction)
        assert ca.video.shape == (7, 3, 32, 32) and ca.video.dtype == np.float32
        assert ca.video.min() >= -1 and ca.video.max() <= 1
    # Another seed is another stream of clips.
    other = MovingDigits("train", seed=4)
    assert any(not np.array_equal(other[i].video, a[i].video) for i in range(5))
    # Different indices give different clips.
    assert any(not np.array_equal(a[i].video, a[0].video) for i in range(1, 5))


def test_colour_and_motion_match_the_prompt():
    ds = MovingDigits("heldout", WorldConfig(num_frames=13))
    for i in range(40):
        clip = ds[i]
        v = (clip.video + 1) / 2  # [0, 1]
        # Only the prompt's colour channels are lit.
        lit = v.reshape(13, 3, -1).max(axis=(0, 2)) > 0.05
        assert lit.tolist() == [c > 0 for c in COLORS[clip.color]]
        # The centroid moves along the prompt's direction ("up" = toward row 0).
        mass = v.max(axis=1)
        rows, cols = np.mgrid[:32, :32]
        cen = np.array([[(m * rows).sum() / m.sum(), (m * cols).sum() / m.sum()] for m in mass])
        d = cen[-1] - cen[0]
        dr, dc = DIRECTIONS[clip.direction]
        assert np.sign(np.round(d[0])) == dr and np.sign(np.round(d[1])) == dc
        assert abs(np.abs(d).sum() - 12) < 1.0
        assert np.array_equal(clip.positions[-1] - clip.positions[0], 12 * np.array([dr, dc]))


def test_train_and_heldout_images_are_disjoint():
    tr, ho = split_indices("train"), split_indices("heldout")
    assert len(set(tr) & set(ho)) == 0 and len(tr) + len(ho) == 1797
    _, labels = digit_images("heldout")
    assert set(labels.tolist()) == set(range(10))


def test_world_config_validates_geometry():
    with pytest.raises(ValueError):
        WorldConfig(canvas=24, travel=12).validate()
    with pytest.raises(ValueError):
        parse_prompt("a purple seven moving left")


def test_codec_round_trip_is_exact():
    codec = SpaceToDepthCodec(patch=4)
    video = torch.rand(2, 3, 7, 32, 32) * 2 - 1
    lat = codec.space_to_depth(video)
    assert lat.shape == (2, 48, 7, 8, 8)
    assert torch.equal(codec.depth_to_space(lat), video)
    # Through the diffusers-facing API (moments -> posterior mean -> decode) too.
    post = codec.encode(video).latent_dist
    assert torch.equal(codec.decode(post.mode()).sample, video)


def test_codec_normalisation_and_folder(tmp_path):
    ds = MovingDigits("train")
    videos = torch.from_numpy(ds.batch(range(64))[0])
    codec = fit_codec(videos)
    z = codec.pixels_to_latents(videos)
    assert z.shape == (64, 7, 48, 8, 8)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    assert torch.allclose(codec.latents_to_pixels(z), videos, atol=1e-5)
    codec.save_pretrained(tmp_path / "vae")
    again = SpaceToDepthCodec.from_pretrained(tmp_path / "vae")
    assert again.config.latents_mean == codec.config.latents_mean
    with pytest.raises(ValueError, match="divisible"):
        codec.space_to_depth(torch.zeros(1, 3, 1, 30, 32))


def test_anchored_codec_negates_frame_zero_and_round_trips(tmp_path):
    ds = MovingDigits("train")
    videos = torch.from_numpy(ds.batch(range(16))[0])
    plain, anchored = fit_codec(videos), fit_codec(videos, anchor_first_frame=True)
    z0, z1 = plain.pixels_to_latents(videos), anchored.pixels_to_latents(videos)
    # Frame 0 is the plain latent negated (in the normalised space the transformer sees); every
    # later frame is untouched, so the two codecs differ only in where the clip starts.
    assert torch.allclose(z1[:, 0], -z0[:, 0], atol=1e-5)
    assert torch.equal(z1[:, 1:], z0[:, 1:])
    assert torch.allclose(anchored.latents_to_pixels(z1), videos, atol=1e-5)
    # A clip played backwards no longer encodes to the reversed latents: the anchor is at its start.
    rev = anchored.pixels_to_latents(videos.flip(1))
    assert not torch.allclose(rev, z1.flip(1), atol=1e-2)
    # The diffusers-facing path (encode -> moments -> decode) and a saved folder agree.
    post = anchored.encode(videos.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    assert torch.allclose(anchored.decode(post).sample, videos.permute(0, 2, 1, 3, 4), atol=1e-6)
    anchored.save_pretrained(tmp_path / "vae")
    again = SpaceToDepthCodec.from_pretrained(tmp_path / "vae")
    assert again.config.anchor_first_frame and torch.equal(again.pixels_to_latents(videos), z1)


def test_offset_anchor_shifts_frame_zero_by_one_std_and_round_trips(tmp_path):
    ds = MovingDigits("train")
    videos = torch.from_numpy(ds.batch(range(16))[0])
    plain, offset = fit_codec(videos), fit_codec(videos, first_frame_offset=1.0)
    z0, z1 = plain.pixels_to_latents(videos), offset.pixels_to_latents(videos)
    # Frame 0 keeps its shape (the same latent up to a constant of one normalised unit); the rest
    # are untouched, and decoding removes the shift exactly.
    assert torch.allclose(z1[:, 0] - z0[:, 0], torch.ones_like(z0[:, 0]), atol=1e-5)
    assert torch.equal(z1[:, 1:], z0[:, 1:])
    assert torch.allclose(offset.latents_to_pixels(z1), videos, atol=1e-5)
    assert not torch.allclose(offset.pixels_to_latents(videos.flip(1)), z1.flip(1), atol=1e-2)
    post = offset.encode(videos.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    assert torch.allclose(offset.decode(post).sample, videos.permute(0, 2, 1, 3, 4), atol=1e-6)
    offset.save_pretrained(tmp_path / "vae")
    again = SpaceToDepthCodec.from_pretrained(tmp_path / "vae")
    assert again.config.first_frame_offset == 1.0 and torch.equal(again.pixels_to_latents(videos), z1)
    # Both anchors at once compose: negate, then shift; decoding undoes them in reverse order.
    both = fit_codec(videos, anchor_first_frame=True, first_frame_offset=1.0)
    zb = both.pixels_to_latents(videos)
    assert torch.allclose(zb[:, 0], 1.0 - z0[:, 0], atol=1e-5)
    assert torch.allclose(both.latents_to_pixels(zb), videos, atol=1e-5)


def test_tokenizer_and_text_encoder(tmp_path):
    from transformers import AutoTokenizer

    tok = build_word_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok2("a red three moving left").input_ids
    assert len(ids) == 6 and ids[-1] == tok2.eos_token_id and tok2.unk_token_id not in ids
    enc = build_tiny_umt5(len(tok))
    emb = encode_prompts(tok, enc, ["a red three moving left", "a red four moving left", ""])
    assert emb.shape == (3, 8, 64)
    assert torch.all(emb[0, 6:] == 0) and torch.all(emb[2, 1:] == 0)
    assert (emb[0] - emb[1]).abs().max() > 1e-3


class _FakeVelocity(torch.nn.Module):
    """A stand-in for the teacher's transformer: ``pool`` -> x0 = frame mean of z / (1 - sigma)
    (unbiased for a static clip), else a frame-by-frame map (x0 = (1 - sigma) z)."""

    def __init__(self, pool: bool):
        super().__init__()
        self.pool = pool

    def forward(self, z, timestep, emb):
        s = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        v = (z - z.mean(dim=2, keepdim=True) / (1 - s)) / s if self.pool else z
        return types.SimpleNamespace(sample=v)


@pytest.mark.parametrize("pool", [False, True])
def test_temporal_gain_probe(pool):
    """The teacher's temporal probe: 0 for a frame-by-frame denoiser; for the one that averages the
    frames of a static clip, the x0 error falls by the frame count F (noise variance 1/F), so the
    gain is F - 1."""
    from anystep.train.teacher import temporal_gain

    n, f = 4, 7
    x = torch.randn(n, 1, 48, 8, 8).expand(n, f, 48, 8, 8).contiguous()
    sigma = torch.full((n,), 0.7)
    z = (1 - 0.7) * x + 0.7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    tok = build_word_tokenizer()
    gain = temporal_gain(_FakeVelocity(pool), tok, build_tiny_umt5(len(tok)), x, z, sigma, ["a red one moving up"] * n)
    if pool:
        assert gain == pytest.approx(f - 1, rel=0.05)
    else:
        assert abs(gain) < 1e-6


def test_teacher_lr_schedule_warmup_stable_cooldown():
    from anystep.train.common import warmup_cooldown_lambda

    # warm-up 2, total 10, cooldown 4: ramps over steps 0-1, flat, then (10 - step) / 4 from step 6.
    f = warmup_cooldown_lambda(2, 10, 4)
    assert [f(s) for s in range(11)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0]
    # No cooldown: the plain warm-up schedule, constant forever.
    g = warmup_cooldown_lambda(2, 10, 0)
    assert [g(s) for s in (0, 1, 9, 10_000)] == [0.5, 1, 1, 1]
    # Before its cooldown starts, a longer run's schedule is the shorter constant run's schedule,
    # which is what lets a finished constant-lr checkpoint be resumed into a cooldown.
    h = warmup_cooldown_lambda(2, 100, 20)
    assert [h(s) for s in range(80)] == [g(s) for s in range(80)]
    # Driven through torch's LambdaLR, the optimiser sees the same multipliers.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [2.0 * f(s) for s in range(10)]


def test_teacher_clip_length_mix_is_a_function_of_the_step():
    from anystep.train.teacher import TeacherConfig, clip_length

    cfg = TeacherConfig(num_frames=7, long_num_frames=13, long_frac=0.3, seed=4)
    lengths = [clip_length(cfg, s) for s in range(2000)]
    assert set(lengths) == {7, 13}
    assert abs(lengths.count(13) / len(lengths) - 0.3) < 0.05
    assert lengths == [clip_length(cfg, s) for s in range(2000)]  # a resumed run replays the same lengths
    assert {clip_length(TeacherConfig(num_frames=7), s) for s in range(50)} == {7}


def test_teacher_fine_tune_starts_from_init_and_trains_on_long_clips(tmp_path, monkeypatch):
    """init= loads the weights (a zero learning rate leaves them untouched) and long_frac=1 feeds
    every step long clips."""
    from conftest import make_tiny_teacher

    from anystep.data import moving_digits as md
    from anystep.train.teacher import TeacherConfig, train_teacher

    make_tiny_teacher(tmp_path / "a", steps=2)
    seen = []
    real_batch = md.MovingDigits.batch

    def spy(self, idx):
        videos, prompts = real_batch(self, idx)
        seen.append(videos.shape[1])
        return videos, prompts

    monkeypatch.setattr(md.MovingDigits, "batch", spy)
    train_teacher(TeacherConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a"), steps=2,
                                batch_size=2, lr=0.0, long_num_frames=13, long_frac=1.0, probe_every=1000,
                                ckpt_every=1000))
    from anystep.sampling import load_model
    from anystep.train.checkpoint import read_meta

    a, b = load_model(tmp_path / "a" / "model").transformer, load_model(tmp_path / "b" / "model").transformer
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert read_meta(tmp_path / "b")["step"] == 2
    # The two training batches are long and the end-of-run probe reads 7-frame clips; the codec comes
    # from the checkpoint, so no clips are read to fit one.
    assert seen == [13, 13, 7]


def test_teacher_fine_tune_from_a_folder_with_the_anchored_codec(tmp_path):
    """init= also takes a teacher folder (the shipped models/toy-teacher is one): a zero learning
    rate keeps its weights, and anchor_first_frame / first_frame_offset reach the written folder's codec."""
    from conftest import make_tiny_teacher

    from anystep.sampling import load_model
    from anystep.train.teacher import TeacherConfig, train_teacher

    src = load_model(make_tiny_teacher(tmp_path / "a", steps=2))  # seed 0's codec statistics
    assert not src.codec.config.anchor_first_frame
    out = train_teacher(TeacherConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a" / "model"), steps=1,
                                      batch_size=2, lr=0.0, anchor_first_frame=True, first_frame_offset=0.5, seed=5,
                                      probe_every=1000, ckpt_every=1000))
    got = load_model(out)
    assert got.codec.config.anchor_first_frame and got.codec.config.first_frame_offset == 0.5
    assert got.codec.config.pixel_mean == src.codec.config.pixel_mean  # the folder's latent space is kept
    assert got.codec.config.basis == src.codec.config.basis
    for (k, v), w in zip(src.transformer.state_dict().items(), got.transformer.state_dict().values()):
        assert torch.equal(v, w), k
    for (k, v), w in zip(src.pipe.text_encoder.state_dict().items(), got.pipe.text_encoder.state_dict().values()):
        assert torch.equal(v, w), k


def test_teacher_fine_tune_from_a_checkpoint_keeps_its_codec(tmp_path):
    """A checkpoint records its codec, so a fine-tune with another seed stays in the latent space
    the weights were trained in (it used to refit the statistics from the new seed's clips)."""
    from conftest import make_tiny_teacher

    from anystep.sampling import load_model
    from anystep.train.teacher import TeacherConfig, train_teacher

    from anystep.train.checkpoint import read_meta

    src = load_model(make_tiny_teacher(tmp_path / "a", steps=1))
    assert read_meta(tmp_path / "a")["codec"]["pixel_mean"] == list(src.codec.config.pixel_mean)
    fresh = load_model(train_teacher(TeacherConfig(out=str(tmp_path / "c"), steps=1, batch_size=2, seed=5,
                                                   probe_every=1000, ckpt_every=1000)))
    assert fresh.codec.config.pixel_mean != src.codec.config.pixel_mean  # seed 5 alone fits other stats
    assert fresh.codec.config.basis != src.codec.config.basis  # and another basis
    got = load_model(train_teacher(TeacherConfig(out=str(tmp_path / "b"), init=str(tmp_path / "a"),
                                                 steps=1, batch_size=2, seed=5, probe_every=1000, ckpt_every=1000)))
    for key in ("pixel_mean", "pixel_std", "basis", "latents_mean", "latents_std"):
        assert got.codec.config[key] == src.codec.config[key], key


def test_order_symmetry_probe_sees_what_the_rotary_positions_see():
    """scripts/teacher_sign_gap.py's reordering probe: mirrored token order is an involution that
    keeps each patch token whole, and the time-reversal figure is the one computed directly."""
    import importlib.util

    from anystep.models.toy import build_toy_transformer

    spec = importlib.util.spec_from_file_location("sign_gap", Path(__file__).parents[1] / "scripts" / "teacher_sign_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.arange(2 * 3 * 5 * 8 * 8, dtype=torch.float32).reshape(2, 3, 5, 8, 8)
    for dim in (2, 3, 4):
        assert torch.equal(mod._mirror_tokens(mod._mirror_tokens(x, dim, (1, 2, 2)), dim, (1, 2, 2)), x)
    m = mod._mirror_tokens(x, 4, (1, 2, 2))
    # Columns 0-1 (token 0) move to 6-7 in their own order; frames come back reversed for dim 2.
    assert torch.equal(m[..., 6:8], x[..., 0:2]) and torch.equal(m[..., 0:2], x[..., 6:8])
    assert torch.equal(mod._mirror_tokens(x, 2, (1, 2, 2)), x.flip(2))
    torch.manual_seed(0)
    net = build_toy_transformer(num_layers=1).eval()
    emb = torch.randn(2, 8, 64)
    sym = mod.order_symmetry(net, emb, num_frames=5)
    assert set(sym) == {"time reversed", "rows mirrored", "columns mirrored", "frames shuffled"}
    assert all(v > 1e-5 for v in sym.values())  # a random rotary network is not exactly order-blind
    # Against an independent computation on the same input: play the clip backwards and back.
    c = net.config.in_channels
    z = torch.randn(2, c, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 700.0)
    with torch.no_grad():
        base = net(z, t, emb).sample
        back = net(z.flip(2), t, emb).sample.flip(2)
    assert abs(sym["time reversed"] - float((back - base).norm() / base.norm())) < 1e-6
    # Another latent grid (not the toy's 8x8): mirroring the columns of a 4x12 grid, computed directly.
    wide = mod.order_symmetry(net, emb, num_frames=5, latent_hw=(4, 12))
    z = torch.randn(2, c, 5, 4, 12, generator=torch.Generator().manual_seed(0))
    mirror = lambda v: v.unflatten(-1, (6, 2)).flip(-2).flatten(-2)  # 6 tokens of 2 columns, reversed
    with torch.no_grad():
        base = net(z, t, emb).sample
        back = mirror(net(mirror(z), t, emb).sample)
    assert abs(wide["columns mirrored"] - float((back - base).norm() / base.norm())) < 1e-6


def test_reversed_direction_is_the_same_clip_played_backwards():
    """Why a time-equivariant denoiser can learn the axis of motion from the prompt but not the sign:
    a clip played backwards is exactly the clip of the opposite direction (same image, same path)."""
    world = WorldConfig(num_frames=7)
    ds = MovingDigits("train", world)
    for direction in ("left", "right", "up", "down", "up-left", "down-right"):
        opp = opposite_direction(direction)
        assert opposite_direction(opp) == direction and opp != direction
        fwd = ds.render(3, "green", direction, cross=5)
        back = ds.render(3, "green", opp, cross=5)
        assert np.array_equal(fwd.video[::-1], back.video)


class _TextBlindVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, z, timestep, emb):
        return types.SimpleNamespace(sample=self.w * z)


def test_sign_hinge_charges_a_sign_blind_model_the_margin():
    """A model that ignores the prompt has equal errors with the true and the reversed direction, so
    the hinge is exactly ``margin`` x its mean error; null-prompt rows are left out; gradient reaches
    the model."""
    from anystep.train.teacher import sign_hinge

    tok = build_word_tokenizer()
    enc = build_tiny_umt5(len(tok))
    model = _TextBlindVelocity()
    g = torch.Generator().manual_seed(0)
    z, target = torch.randn(4, 7, 48, 4, 4, generator=g), torch.randn(4, 7, 48, 4, 4, generator=g)
    sigma = torch.full((4,), 0.6)
    prompts = ["a red one moving up", "", "a blue two moving left", "a green nine moving down"]
    pred = model(z.permute(0, 2, 1, 3, 4), sigma * 1000, None).sample.permute(0, 2, 1, 3, 4)
    h = sign_hinge(model, tok, enc, z, sigma, target, pred, prompts, margin=0.1)
    err = (pred - target).pow(2).flatten(1).mean(1)[[0, 2, 3]]
    assert h.item() == pytest.approx(0.1 * err.mean().item(), rel=1e-5)
    h.backward()
    assert model.w.grad is not None and model.w.grad.abs() > 0
    assert sign_hinge(model, tok, enc, z, sigma, target, pred, [""] * 4, margin=0.1).item() == 0.0


def test_text_separation_hinge_pulls_merged_directions_apart():
    """An encoder that embeds "right" almost as "left" (and "down" as "up") pays about ``ratio``; a
    few gradient steps on the hinge alone move the reversed prompts apart; null rows are left out."""
    from anystep.train.teacher import text_separation_hinge

    tok = build_word_tokenizer()
    enc = build_tiny_umt5(len(tok))
    emb = enc.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb[ids("right")] = emb[ids("left")] + 1e-3 * torch.randn(emb.shape[1], generator=g)
        emb[ids("down")] = emb[ids("up")] + 1e-3 * torch.randn(emb.shape[1], generator=g)
    world = WorldConfig()
    prompts = ["a red one moving up", "", "a blue two moving left", "a green nine moving right"]

    def hinge(ratio, seed=0):
        return text_separation_hinge(tok, enc, prompts, ratio, world, np.random.default_rng(seed))

    assert hinge(0.5).item() == pytest.approx(0.5, abs=0.01)
    assert text_separation_hinge(tok, enc, [""] * 3, 0.5, world, np.random.default_rng(0)).item() == 0.0

    def reversed_distance():
        with torch.no_grad():
            e = encode_prompts(tok, enc, ["a red one moving left", "a red one moving right"])
        return float((e[0] - e[1]).pow(2).mean().sqrt())

    start = reversed_distance()
    assert start < 1e-3
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    for i in range(20):
        opt.zero_grad()
        hinge(0.5, seed=i).backward()
        opt.step()
    assert reversed_distance() > 50 * start
    assert hinge(0.5).item() < 0.4


def test_the_shipped_teacher_loads_and_its_codec_round_trips():
    """The shipped teacher is a WanPipeline folder whose codec shifts frame 0 by one std
    (docs/teacher.md, "The offset anchor") before projecting each block onto 28 directions, and real
    clips survive the round trip up to that projection."""
    from anystep.sampling import generate_latents, load_model

    offset = 1.0
    folder = Path(__file__).resolve().parents[1] / "models" / "toy-teacher"
    model = load_model(folder)
    assert model.kind == "teacher" and type(model.pipe).__name__ == "WanPipeline"
    codec = model.codec
    assert float(codec.config.first_frame_offset) == offset and not codec.config.anchor_first_frame
    assert codec.projected and codec.config.z_dim == 28
    videos = torch.from_numpy(MovingDigits("heldout").batch(range(4))[0])
    z = codec.pixels_to_latents(videos)
    back = codec.latents_to_pixels(z)
    # A small share of the clips' energy is lost (measured: 0.3%, mean |error| 0.003 of the [-1, 1] range).
    assert float(((back - videos) ** 2).sum() / ((videos + 1) ** 2).sum()) < 0.01
    assert float((back - videos).abs().mean()) < 0.01
    # Frame 0's normalised blocks sit `offset` above the later frames' (the digit covers little area).
    blocks = codec.unproject(z.permute(0, 2, 1, 3, 4))
    mean, std = codec._pixel_stats(blocks)
    norm = (blocks - mean) / std
    assert abs(float(norm[:, :, 0].mean() - norm[:, :, 1:].mean()) - offset) < 0.1
    lat = generate_latents(model, ["a red zero moving left"], 1, seed=0, num_frames=7)
    assert lat.shape == (1, 7, 28, 8, 8) and torch.isfinite(lat).all()


def test_teacher_resume_gives_the_same_next_loss(tmp_path):
    """The teacher draws from torch's global generator; its DCP checkpoint carries that state, so a
    run stopped after step 2 and resumed logs the step-3 loss of the uninterrupted run."""
    import json

    from anystep.train.teacher import TeacherConfig, train_teacher

    tiny = dict(batch_size=2, probe_every=1000, ckpt_every=2, transformer=dict(num_layers=1))
    train_teacher(TeacherConfig(out=str(tmp_path / "a"), steps=3, **tiny))
    train_teacher(TeacherConfig(out=str(tmp_path / "b"), steps=2, **tiny))
    train_teacher(TeacherConfig(out=str(tmp_path / "b"), steps=3, **tiny))
    last = [json.loads(open(tmp_path / r / "metrics.jsonl").read().splitlines()[-1]) for r in ("a", "b")]
    assert last[0]["step"] == last[1]["step"] == 3
    assert last[0]["loss"] == last[1]["loss"] and last[0]["grad_norm"] == last[1]["grad_norm"]
