"""The toy transformer's output span, the projected codec that gives it a whole token, and the
carry-over of a transformer trained on the exact codec (models/toy.py, models/codec.py)."""

import warnings
from pathlib import Path

import pytest
import torch

from anystep.data.moving_digits import MovingDigits
from anystep.models.codec import SpaceToDepthCodec, block_basis, fit_codec, project_codec
from anystep.models.toy import build_toy_transformer, output_span, project_transformer

ROOT = Path(__file__).parents[1]


def _perturbed(model):
    """A random toy whose blocks all matter (a fresh one's output layer is near zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tokens(x, c):
    """(B, C, F, h, w) -> (N, 4 C) in proj_out's row order: the 2x2 offsets, then the channel."""
    b, _, f, h, w = x.shape
    return x.double().reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1).reshape(-1, 4 * c)


def test_an_exact_codec_toy_passes_a_third_of_the_noise_through_any_sampler():
    with pytest.warns(UserWarning, match="spans 128 of a token's 192"):
        net = _perturbed(build_toy_transformer(num_layers=1, in_channels=48, out_channels=48))
    assert output_span(net) == (128, 192)
    # The directions proj_out's columns do not reach, from its QR factorisation.
    q, _ = torch.linalg.qr(net.proj_out.weight.detach().double(), mode="complete")
    perp = q[:, 128:] @ q[:, 128:].T
    emb = torch.randn(2, 8, 64)
    null = torch.zeros(2, 8, 64)
    z0 = torch.randn(2, 48, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (1, 5):
        sig = torch.linspace(1, 0, steps + 1)
        z = z0.clone()
        with torch.no_grad():
            for s, s_next in zip(sig[:-1], sig[1:]):
                t = torch.full((2,), float(s) * 1000)
                vc, vu = net(z, t, emb).sample, net(z, t, null).sample
                z = z + (s_next - s) * (vu + 4.0 * (vc - vu))  # Euler with CFG 4
        moved = (_tokens(z, 48) - _tokens(z0, 48)) @ perp
        b = net.proj_out.bias.detach().double() @ perp
        torch.testing.assert_close(moved, -b.expand_as(moved), atol=1e-5, rtol=0)
        # ...while the sample did move in the directions within reach.
        assert float(((_tokens(z, 48) - _tokens(z0, 48)) @ (torch.eye(192, dtype=torch.float64) - perp)).norm()) > 1.0
    e = _tokens(z0, 48)
    assert 0.3 < float(((e @ perp) ** 2).sum() / (e ** 2).sum()) < 0.37  # 64 of 192 directions


def test_the_default_toy_and_the_shipped_teacher_span_their_tokens():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = build_toy_transformer(num_layers=1)
    span, token = output_span(net)
    assert span == token == 4 * net.config.out_channels
    from diffusers import WanTransformer3DModel

    shipped = WanTransformer3DModel.from_pretrained(str(ROOT / "models" / "toy-teacher"), subfolder="transformer")
    w = shipped.proj_out.weight.detach().double()
    s = torch.linalg.svdvals(w)
    assert w.shape[0] == output_span(shipped)[1] and int((s > s.max() * 1e-4).sum()) == w.shape[0]
    codec = SpaceToDepthCodec.from_pretrained(str(ROOT / "models" / "toy-teacher" / "vae"))
    assert codec.projected and codec.config.z_dim == shipped.config.in_channels


@pytest.fixture(scope="module")
def clips():
    return torch.from_numpy(MovingDigits("train").batch(range(96))[0])


def test_projected_codec_is_the_exact_codec_seen_through_an_orthonormal_basis(clips, tmp_path):
    exact = fit_codec(clips, first_frame_offset=1.0)
    proj = project_codec(exact, clips, 20)
    again = fit_codec(clips, first_frame_offset=1.0, channels=20)
    assert again.config.basis == proj.config.basis  # refitting gives the same basis, signs included
    basis = torch.tensor(proj.config.basis, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(20, dtype=torch.float64), atol=1e-10, rtol=0)
    x = exact.pixels_to_latents(clips)  # (B, F, 48, h, w)
    y = proj.pixels_to_latents(clips)
    assert y.shape == (96, 7, 20, 8, 8)
    torch.testing.assert_close(y.double(), torch.einsum("kc,bfchw->bfkhw", basis, x.double()), atol=1e-4, rtol=1e-5)
    # Decoding is the exact codec's decoding of the projection, first-frame offset included.
    back = torch.einsum("kc,bfkhw->bfchw", basis, y.double()).float()
    torch.testing.assert_close(proj.latents_to_pixels(y), exact.latents_to_pixels(back), atol=1e-5, rtol=0)
    # No other 20 directions keep more of the blocks' energy than the fitted ones (a random basis).
    blocks = x.permute(0, 1, 3, 4, 2).reshape(-1, 48).double()
    rand, _ = torch.linalg.qr(torch.randn(48, 20, dtype=torch.float64))
    assert float((blocks @ basis.T).pow(2).sum()) > float((blocks @ rand).pow(2).sum())
    assert float((blocks @ basis.T).pow(2).sum() / blocks.pow(2).sum()) > 0.95
    # Encoding a decoded block is the identity before the [-1, 1] clamp of pixels (a projection),
    # and the diffusers-facing API agrees.
    yc = y.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(proj.project(proj.unproject(yc)), yc, atol=1e-4, rtol=1e-5)
    z = proj.encode(clips.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    torch.testing.assert_close(z, y.permute(0, 2, 1, 3, 4), atol=1e-5, rtol=0)
    proj.save_pretrained(tmp_path / "vae")
    loaded = SpaceToDepthCodec.from_pretrained(tmp_path / "vae")
    torch.testing.assert_close(loaded.pixels_to_latents(clips), y)
    with pytest.raises(ValueError, match="projected already"):
        project_codec(proj, clips, 10)
    with pytest.raises(ValueError, match="needs a basis"):
        SpaceToDepthCodec(channels=20)
    skew = [list(map(float, row)) for row in (basis * 1.01)]  # a hand-edited basis that no longer round-trips
    with pytest.raises(ValueError, match="not orthonormal"):
        SpaceToDepthCodec(**{**{k: v for k, v in proj.config.items() if not k.startswith("_")}, "basis": skew})


def test_block_basis_is_the_leading_eigenvectors():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.1], dtype=torch.float64)
    blocks = torch.randn(4000, 5, generator=g, dtype=torch.float64) * scales
    basis = block_basis(blocks, 2)
    # Axis-aligned variances: the leading directions are the first two axes, largest entry positive.
    torch.testing.assert_close(basis.abs(), torch.eye(5, dtype=torch.float64)[:2], atol=0.05, rtol=0)
    assert (basis.max(1).values > 0).all()


def test_carried_over_transformer_is_the_exact_one_on_the_projection():
    with pytest.warns(UserWarning):
        old = _perturbed(build_toy_transformer(num_layers=2, in_channels=48, out_channels=48))
    basis = torch.linalg.qr(torch.randn(48, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0].T
    new = project_transformer(old, basis).eval()
    assert new.config.in_channels == new.config.out_channels == 28
    assert output_span(new) == (112, 112)
    y = torch.randn(2, 28, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 150.0])
    emb = torch.randn(2, 8, 64)
    b = basis.float()
    with torch.no_grad():
        got = new(y, t, emb).sample
        want = torch.einsum("kc,bcfhw->bkfhw", b, old(torch.einsum("kc,bkfhw->bcfhw", b, y), t, emb).sample)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="basis of 40-channel"):
        project_transformer(old, torch.zeros(10, 40))


def test_teacher_run_carries_an_exact_folder_over_and_trains_on_the_projection(tmp_path):
    from anystep.models.loaded import load_model
    from anystep.train.teacher import TeacherConfig, TeacherMethod, train_teacher

    kw = dict(batch_size=2, probe_every=1000, ckpt_every=1000, transformer=dict(num_layers=1))
    with pytest.warns(UserWarning):
        exact = train_teacher(TeacherConfig(out=str(tmp_path / "exact"), steps=1, codec_channels=0, **kw))
    with pytest.warns(UserWarning, match="spans 128 of a token's 192"):  # an old folder still loads, and says why it is grainy
        assert load_model(exact).codec.config.z_dim == 48
    method = TeacherMethod(TeacherConfig(out=str(tmp_path / "p"), steps=1, init=str(exact), codec_channels=16, **kw))
    assert method.codec.projected and method.model.config.in_channels == 16
    # The carried-over velocity is the exact folder's, seen through the fitted basis.
    with pytest.warns(UserWarning):
        src = load_model(exact).transformer.eval()
    basis = torch.tensor(method.codec.config.basis)
    want = project_transformer(src, basis).state_dict()
    for k, v in method.model.state_dict().items():
        torch.testing.assert_close(v, want[k])
    out = train_teacher(TeacherConfig(out=str(tmp_path / "p"), steps=1, init=str(exact), codec_channels=16, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(out)
    assert model.codec.config.z_dim == 16 and model.latent_shape(7, 32, 32)[1] == 16
    # Another channel count than the projected folder's is refused, not ignored.
    from anystep.config import ConfigError

    with pytest.raises(ConfigError, match="codec of 16 channels; set codec_channels: 16"):
        TeacherMethod(TeacherConfig(out=str(tmp_path / "q"), steps=1, init=str(out), codec_channels=28, **kw))
