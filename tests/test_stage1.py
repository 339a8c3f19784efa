"""Stage 1 (Alg. 1) on a tiny teacher: finite losses, FD vs JVP, identity at t = r, exact resume."""

import json
import math

import pytest
import torch

from anystep.flow.stage1 import finite_difference_derivative, finite_difference_inputs, sample_types
from anystep.models.students import student_from_teacher
from anystep.models.velocity import flow_map_velocity
from anystep.train.stage1 import Stage1Config, Stage1Method, flowmap_loss, train_stage1
from anystep.models.toy import TOY_TRANSFORMER

TOY_CHANNELS = TOY_TRANSFORMER["in_channels"]  # latent channels of the shipped toy


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import make_tiny_teacher

    out = tmp_path_factory.mktemp("teacher")
    return make_tiny_teacher(out, num_layers=2, ffn_dim=128)




def _cfg(teacher_dir, tmp_path, **kw):
    base = dict(teacher=str(teacher_dir), out=str(tmp_path / "s1"), steps=2, batch_size=4, warmup=1, log_every=1, ckpt_every=1)
    return Stage1Config(**{**base, **kw})


@pytest.mark.parametrize("batch", range(1, 9))
def test_loss_is_finite_for_every_batch_size(teacher_dir, tmp_path, batch):
    method = Stage1Method(_cfg(teacher_dir, tmp_path, batch_size=batch))
    loss, metrics = method.loss(step=0, micro=0)
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_rank_slices_reproduce_the_global_batch(teacher_dir, tmp_path):
    """Global batch 4 as 4 ranks x 1: ranks 2 and 3 hold no boundary position of the split, so
    their Eq. 7 weight needs mu from the others. With the boundary statistics summed over ranks
    (what the all-reduce does), the mean of the 4 rank losses -- the loss FSDP's averaged gradient
    descends -- equals one process's loss on the whole batch."""
    ref, ref_m = Stage1Method(_cfg(teacher_dir, tmp_path, batch_size=4)).loss(0, 0)
    ranks = [Stage1Method(_cfg(teacher_dir, tmp_path, batch_size=1), rank=r, world_size=4) for r in range(4)]
    seen = []
    for m in ranks:  # pass 1: each rank's local boundary statistics (n_b at index 1)
        m.objective.reduce = lambda s: (seen.append(s.clone()), torch.ones_like(s))[1]
        m.loss(0, 0)
    total = torch.stack(seen).sum(0)
    assert [float(s[1]) for s in seen] == [1.0, 1.0, 0.0, 0.0] and float(total[1]) == 2.0
    losses = []
    for m in ranks:  # pass 2: the all-reduced statistics
        m.objective.reduce = lambda s: total
        loss, metrics = m.loss(0, 0)
        assert math.isfinite(loss.item())
        losses.append(loss.item())
    assert sum(losses) / 4 == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["loss_boundary"] == pytest.approx(ref_m["loss_boundary"], rel=1e-5)


def test_finite_difference_agrees_with_jvp(teacher_dir):
    """Eq. 4's central difference vs the exact total derivative d/dt u(z_t, t, r) by forward-mode AD
    (math attention backend, the only one with JVP on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from anystep.sampling import load_model

    pipe = load_model(teacher_dir).pipe
    student = student_from_teacher(pipe.transformer).float().eval()
    # A barely trained network still reads the fastest timestep sinusoids (up to 1 rad per
    # timestep = 1000 rad per unit sigma), which no eps = 0.005 difference can resolve. Silence the
    # sinusoids faster than 20 rad / sigma, so the check measures the difference quotient, not an
    # untrained network's roughness.
    half = student.config.freq_dim // 2
    freqs = 1000 * torch.exp(-math.log(10000) * torch.arange(half) / half)
    fast = torch.cat([freqs, freqs]) > 20
    with torch.no_grad():
        for emb in (student.condition_embedder.time_embedder, student.condition_embedder.delta_embedder):
            emb.linear_1.weight[:, fast] = 0
    torch.manual_seed(0)
    x, e = torch.randn(2, 7, TOY_CHANNELS, 8, 8), torch.randn(2, 7, TOY_CHANNELS, 8, 8)
    emb = torch.randn(2, 8, 64)
    t, r = torch.tensor([0.8, 0.55]), torch.tensor([0.3, 0.1])
    z, v = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * e, e - x

    def f(zz, tt):
        return flow_map_velocity(student, zz, tt, r, emb)

    with sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(f, (z, t), (v, torch.ones_like(t)))
        with torch.no_grad():
            zp, zm, tp, tm = finite_difference_inputs(z, v, t, 0.005)
            fd = finite_difference_derivative(f(zp, tp), f(zm, tm), 0.005, g=1.0)
    rel = ((fd - jvp).norm() / jvp.norm()).item()
    print(f"finite difference vs JVP relative error: {rel:.2e}")
    assert rel < 1e-2


def test_identity_at_t_equals_r_after_training(teacher_dir, tmp_path):
    """f(z, t, t) = z - 0 * u = z holds for the trained student too; the flow-map sampler treats an
    equal-end step as the identity (diffusers skips it)."""
    folder = train_stage1(_cfg(teacher_dir, tmp_path, steps=2))
    from anystep.sampling import load_model

    m = load_model(folder)
    z = torch.randn(1, 7, TOY_CHANNELS, 8, 8)
    emb = torch.randn(1, 8, 64)
    for s in (0.9, 0.4):
        u = flow_map_velocity(m.transformer, z, s, s, emb)
        assert torch.isfinite(u).all()
        assert torch.equal(z - (s - s) * u, z)
    # And the trained student moves away from the teacher at r != t only through training.
    assert (tmp_path / "s1" / "checkpoint" / "anystep_checkpoint.json").exists()


def test_resume_gives_the_same_next_loss(teacher_dir, tmp_path):
    straight = _cfg(teacher_dir, tmp_path / "a", steps=3, ckpt_every=2)
    train_stage1(straight)
    first = [json.loads(l) for l in open(tmp_path / "a" / "s1" / "metrics.jsonl")]

    # "Killed" after step 2 (the checkpoint), then resumed to step 3.
    killed = _cfg(teacher_dir, tmp_path / "b", steps=2, ckpt_every=2)
    train_stage1(killed)
    resumed = _cfg(teacher_dir, tmp_path / "b", steps=3, ckpt_every=2)
    train_stage1(resumed)
    second = [json.loads(l) for l in open(tmp_path / "b" / "s1" / "metrics.jsonl")]
    assert second[-1]["step"] == first[-1]["step"] == 3
    assert abs(second[-1]["loss"] - first[-1]["loss"]) < 1e-6


def test_flow_matching_baseline_and_zero_init_run(teacher_dir, tmp_path):
    for kw in (dict(method="flow_matching"), dict(timestep_cond="zero_init"), dict(loss_weight="normal", adaptive=False)):
        method = Stage1Method(_cfg(teacher_dir, tmp_path, **kw))
        assert math.isfinite(method.loss(0, 0)[0].item())


def test_zero_init_conditioning_starts_at_the_teacher(teacher_dir):
    """emb(t) + emb'(t - r) with emb' zero at the output equals the teacher for every r."""
    from anystep.models.velocity import teacher_velocity
    from anystep.sampling import load_model
    from anystep.train.student import zero_init_delta

    pipe = load_model(teacher_dir).pipe
    s = student_from_teacher(pipe.transformer).float().eval()
    zero_init_delta(s)
    z, emb = torch.randn(1, 7, TOY_CHANNELS, 8, 8), torch.randn(1, 8, 64)
    with torch.no_grad():
        ref = teacher_velocity(pipe.transformer.float(), z, 0.6, emb)
        got = flow_map_velocity(s, z, 0.6, 0.2, emb)
    assert (ref - got).abs().max() < 1e-4


@pytest.mark.parametrize("fused", [3.0, None])
def test_flow_matching_loss_fuses_guidance_on_request(fused):
    """The auxiliary pass's loss against a plain recomputation from what the network saw: with
    ``fused_guidance`` the conditional call is trained through Eq. 6 with a no-grad null call."""
    from anystep.train.stage1 import flow_matching_loss

    calls = []

    def net(z, t, r, emb, clean):  # depends on the prompt embedding, so cond and null differ
        calls.append((z.detach().clone(), t.clone(), emb))
        return 0.5 * z + emb.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    g = torch.Generator().manual_seed(0)
    x, cond, null = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 5, 8, generator=g), torch.zeros(3, 5, 8)
    loss, _ = flow_matching_loss(net, x, cond, null, Stage1Config(), torch.Generator().manual_seed(1), fused_guidance=fused)
    assert len(calls) == (2 if fused else 1)
    z, t, emb = calls[0]
    assert emb is cond and (fused is None or calls[1][2] is null)
    s = t.view(-1, 1, 1, 1, 1)
    v = (z - x) / s  # z = (1 - t) x + t e, v = e - x
    u_c = 0.5 * z + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    u = u_c if fused is None else (u_c - (1 - fused) * (0.5 * z)) / fused
    want = (u - v).pow(2).flatten(1).mean(1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_aux_pass_sees_the_whole_clip_and_the_guidance(teacher_dir, tmp_path, monkeypatch, fused):
    import anystep.train.stage1 as s1

    seen = []
    real = s1.flow_matching_loss

    def spy(net, x, *a, fused_guidance=None, **kw):
        seen.append((x.shape[1], fused_guidance))
        return real(net, x, *a, fused_guidance=fused_guidance, **kw)

    monkeypatch.setattr(s1, "flow_matching_loss", spy)
    cfg = _cfg(teacher_dir, tmp_path, causal=True, num_frames=13, batch_size=2, bidirectional_aux_prob=1.0,
               chunk_sample_prob=0.0, bidirectional_aux_fused=fused)
    loss, _ = Stage1Method(cfg).loss(0, 0)
    assert math.isfinite(loss.item())
    # chunk_sample_prob 0: the main loss trains 3 chunks (7 frames); the aux pass all 13.
    assert seen == [(13, cfg.guidance if fused else None)]


def test_stage1_refuses_an_unknown_adaptive_order(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="adaptive_order"):
        Stage1Method(_cfg(teacher_dir, tmp_path, adaptive_order="paper"))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("batch", [1, 3])
def test_causal_stage1_step(teacher_dir, tmp_path, batch):
    """FAR student, 13 frames over (1,3,3,3,3): finite loss, gradients everywhere, chunk counts drawn
    from the recipe, and the auxiliary bidirectional pass when forced on."""
    cfg = _cfg(teacher_dir, tmp_path, causal=True, num_frames=13, batch_size=batch, bidirectional_aux_prob=1.0)
    method = Stage1Method(cfg)
    loss, metrics = method.loss(0, 0)
    assert math.isfinite(loss.item()) and "loss_bidirectional_aux" in metrics
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in method.student.parameters() if p.grad is not None)
    from anystep.train.stage1 import chunk_count
    from anystep.train.updater import step_generator

    n = len(cfg.chunk_partition)
    counts = {chunk_count(n, cfg.min_chunks, cfg.chunk_sample_prob, step_generator(0, s)) for s in range(60)}
    assert counts == {3, 4, 5}


def test_causal_stage1_writes_a_far_folder(teacher_dir, tmp_path):
    from anystep.sampling import generate_latents, load_model

    folder = train_stage1(_cfg(teacher_dir, tmp_path, causal=True, num_frames=13, steps=1))
    m = load_model(folder)
    assert m.kind == "anyflow_far"
    assert generate_latents(m, ["a red one moving up"], 2, num_frames=13).shape == (1, 13, TOY_CHANNELS, 8, 8)


def test_flow_matching_baseline_trains_the_wan_teacher(teacher_dir, tmp_path):
    """method=flow_matching from a Wan folder is the teacher fine-tune: a WanPipeline folder out,
    sampled with Euler + CFG like any teacher."""
    from anystep.sampling import load_model

    folder = train_stage1(_cfg(teacher_dir, tmp_path, method="flow_matching", steps=1))
    m = load_model(folder)
    assert m.kind == "teacher"


def test_resume_refuses_another_global_batch(teacher_dir, tmp_path):
    """The data position and the rank-sliced draws are functions of the global batch: a resume
    with a different one is a clear error, and the checkpoint is left as it was."""
    from anystep.train.checkpoint import CheckpointError, read_meta

    train_stage1(_cfg(teacher_dir, tmp_path, steps=1, ckpt_every=1))
    before = read_meta(tmp_path / "s1")
    with pytest.raises(CheckpointError, match="global batch 4 .* this run has 2"):
        train_stage1(_cfg(teacher_dir, tmp_path, steps=2, batch_size=2))
    assert read_meta(tmp_path / "s1") == before
