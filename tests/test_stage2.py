"""Stage 2 (Alg. 2) wiring on tiny models: rollouts with gradient, DMD scores, the two updates,
resume, causal KV-cache rollouts, the consistency baseline and ODE-init.

The DMD math itself (sign, normalisation, fp64 loss) is tested in test_stage2_math.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from anystep.flow.solvers import consistency_grid
from anystep.flow.stage2 import flow_map_segments
from anystep.rollout import (
    causal_flowmap_rollout,
    consistency_backward_simulation,
    flowmap_backward_simulation,
    flowmap_rollout,
)
from anystep.train.stage2 import Stage2Config, Stage2Method, train_stage2
from anystep.models.toy import TOY_TRANSFORMER

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, F_LAT, C, H, W = 2, 7, TOY_TRANSFORMER["in_channels"], 8, 8  # toy world latents
CAUSAL_PART = (1, 2, 2, 2)  # 4 chunks: the oldest goes to the compressed context at chunk 3




@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from conftest import make_tiny_teacher

    out = tmp_path_factory.mktemp("teacher")
    return make_tiny_teacher(out, num_layers=2, ffn_dim=128)


@pytest.fixture(scope="module")
def stage1_dir(teacher_dir, tmp_path_factory):
    from anystep.train.stage1 import Stage1Config, train_stage1

    out = tmp_path_factory.mktemp("stage1")
    return train_stage1(Stage1Config(teacher=str(teacher_dir), out=str(out), steps=1, batch_size=2, warmup=1))


@pytest.fixture(scope="module")
def causal_dir(teacher_dir, tmp_path_factory):
    from anystep.train.stage1 import Stage1Config, train_stage1

    out = tmp_path_factory.mktemp("stage1c")
    return train_stage1(Stage1Config(teacher=str(teacher_dir), out=str(out), steps=1, batch_size=2, warmup=1,
                                     causal=True, chunk_partition=CAUSAL_PART))


def _student(folder):
    from anystep.sampling import load_model

    return load_model(folder).transformer.float().train()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F_LAT, C, H, W, generator=g), torch.randn(B, 8, 64, generator=g)


def _cfg(teacher_dir, student_dir, out, **kw):
    base = dict(student=str(student_dir), teacher=str(teacher_dir), out=str(out), steps=2, batch_size=2,
                critic_lora_rank=8, critic_lora_alpha=8, log_every=1, ckpt_every=1)
    return Stage2Config(**{**base, **kw})


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(module, snap):
    return {n for n, p in module.named_parameters() if not torch.equal(p.detach(), snap[n])}


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# -- flow-map backward simulation ------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_reaches_the_student_through_every_jump(stage1_dir, causal_dir, causal):
    student = _student(causal_dir if causal else stage1_dir)
    noise, cond = _inputs()
    segs = flow_map_segments(4, 1).segments
    assert len(segs) == 3

    def run(detach=()):
        student.zero_grad(set_to_none=True)
        if causal:
            ro = causal_flowmap_rollout(student, noise, cond, segs, detach=detach)
        else:
            ro = flowmap_rollout(student, noise, cond, segs, detach=detach)
        ro.sample.square().mean().backward()
        return ro, _grads(student)

    ro, full = run()
    assert len(ro.states) == 3 * (len(CAUSAL_PART) if causal else 1)
    assert all(s.requires_grad for s in ro.states)  # every jump's output is on the graph
    assert full and all(torch.isfinite(g).all() for g in full.values())
    norm = torch.sqrt(sum(g.square().sum() for g in full.values()))
    for j in range(3):  # cutting any one jump's velocity out of the graph changes the gradient
        _, cut = run(detach={j})
        diff = torch.sqrt(sum((full[n] - cut.get(n, torch.zeros_like(full[n]))).square().sum() for n in full))
        assert diff > 1e-3 * norm, f"jump {j} carries no gradient"


def test_equal_end_jumps_are_skipped(stage1_dir, causal_dir):
    student = _student(stage1_dir)
    calls = []
    h = student.register_forward_pre_hook(lambda m, a: calls.append(1))
    noise, cond = _inputs()
    try:
        with torch.no_grad():
            for s, g, n in [(4, 0, 2), (4, 3, 2), (4, 1, 3), (50, 17, 3), (1, 0, 1)]:
                calls.clear()
                ro = flowmap_backward_simulation(student, noise, cond, s, g)
                assert len(calls) == len(ro.segments) == n
                assert all(t > r for t, r in ro.segments)
    finally:
        h.remove()
    # Causal: per chunk the same count of KV-cache steps (prefills of the cache not counted).
    far = _student(causal_dir)
    steps = []
    h = far.register_forward_pre_hook(
        lambda m, a, kw: steps.append(1) if kw.get("kv_cache") is not None and not kw["kv_cache_flag"]["is_cache_step"] else None,
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            flowmap_backward_simulation(far, noise, cond, 4, 0)
    finally:
        h.remove()
    assert len(steps) == 2 * len(CAUSAL_PART)


@pytest.mark.parametrize("part", [CAUSAL_PART, (1, 3, 3), (1, 1, 1, 1, 1, 1, 1)])
def test_causal_cached_rollout_equals_uncached(causal_dir, part):
    """Chunk by chunk over the KV cache (re-encoded at t = r = 0 after every chunk, context moving
    to the compressed patchify) == recomputing each chunk with the teacher-forced training forward
    over all previous chunks as clean context."""
    student = _student(causal_dir)
    noise, cond = _inputs(1)
    noise.requires_grad_(True)
    segs = flow_map_segments(8, 3).segments
    cached = causal_flowmap_rollout(student, noise, cond, segs, part, use_cache=True)
    (g_cached,) = torch.autograd.grad(cached.sample.square().sum(), noise)
    plain = causal_flowmap_rollout(student, noise, cond, segs, part, use_cache=False)
    (g_plain,) = torch.autograd.grad(plain.sample.square().sum(), noise)
    diff = (cached.sample - plain.sample).abs().max().item()
    print(f"causal rollout {part}: cached vs uncached max |diff| = {diff:.2e} (sample scale {plain.sample.abs().max():.2f})")
    assert diff < 1e-5
    # No gradient crosses chunks (the context is detached either way): d sample / d noise agrees too.
    assert (g_cached - g_plain).abs().max() < 1e-4
    # The consistency rollout over the same cache.
    a = consistency_backward_simulation(student, noise.detach(), cond, 4, 2, generator=torch.Generator().manual_seed(3), chunk_partition=part)
    b = consistency_backward_simulation(student, noise.detach(), cond, 4, 2, generator=torch.Generator().manual_seed(3), chunk_partition=part, use_cache=False)
    assert (a.sample - b.sample).abs().max() < 1e-5


# -- consistency backward simulation -------------------------------------------------------------------


def test_consistency_grid_is_the_reference_one():
    assert [round(1000 * t, 1) for t in consistency_grid(4)] == [1000.0, 937.5, 833.3, 625.0]


@pytest.mark.parametrize("exit_index", [0, 2, 3])
def test_consistency_steps_before_the_exit_carry_no_gradient(stage1_dir, exit_index):
    student = _student(stage1_dir)
    noise, cond = _inputs()
    noise.requires_grad_(True)
    calls = []
    h = student.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        ro = consistency_backward_simulation(student, noise, cond, 4, exit_index, generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
    assert calls == [False] * exit_index + [True]  # k + 1 calls, only the exit step with gradient
    assert [s.requires_grad for s in ro.states] == [False] * exit_index + [True]
    assert ro.sample is ro.states[-1]
    ro.sample.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # The noise reaches the sample only through step 0: with an exit after it, no gradient.
    assert (noise.grad is not None) == (exit_index == 0)
    # Fresh noise at every re-noising: another generator, another sample (for k > 0).
    with torch.no_grad():
        other = consistency_backward_simulation(student, noise, cond, 4, exit_index, generator=torch.Generator().manual_seed(1))
    assert torch.equal(other.sample, ro.sample.detach()) == (exit_index == 0)


# -- the trainer -----------------------------------------------------------------------------------------


def test_real_score_is_the_teacher_with_cfg_3_and_fake_is_the_critic(teacher_dir, stage1_dir, tmp_path):
    from anystep.models.velocity import teacher_velocity
    from anystep.sampling import load_model

    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path))
    ref = load_model(teacher_dir).transformer.float().eval()  # an untouched copy: no adapters
    z, cond = _inputs(2)
    null = torch.randn_like(cond)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        vc, vu = teacher_velocity(ref, z, sigma, cond), teacher_velocity(ref, z, sigma, null)
        s = sigma.view(-1, 1, 1, 1, 1)
        want_real = z - s * (vc + 3.0 * (vc - vu))
        want_fake = z - s * vc
    assert (tr.real_x0(z, sigma, cond, null) - want_real).abs().max() < 1e-4
    assert (tr.fake_x0(z, sigma, cond) - want_fake).abs().max() < 1e-4  # LoRA starts at zero
    # Move the critic's adapters: the fake score moves, the real score (adapters off) does not.
    with torch.no_grad():
        for n, p in tr.critic.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    assert (tr.real_x0(z, sigma, cond, null) - want_real).abs().max() < 1e-4
    assert (tr.fake_x0(z, sigma, cond) - want_fake).abs().max() > 1e-3
    assert all(p.requires_grad == ("lora_" in n) for n, p in tr.critic.named_parameters())


def test_causal_cotrained_stage1_has_no_aux_pass_by_default(teacher_dir, stage1_dir, causal_dir, tmp_path):
    """The reference's on-policy configs set bidirectional_modeling_prob: 0; an override keeps it."""
    kw = dict(causal=True, student=str(causal_dir))
    assert Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, **kw)).stage1.cfg.bidirectional_aux_prob == 0.0
    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, stage1={"bidirectional_aux_prob": 0.1}, **kw))
    assert tr.stage1.cfg.bidirectional_aux_prob == 0.1


@pytest.mark.parametrize("rollout", ["flowmap", "consistency"])
def test_generator_step_moves_only_the_student(teacher_dir, stage1_dir, tmp_path, rollout):
    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, rollout=rollout, lr=1e-3))
    s0, t0 = _snapshot(tr.student), _snapshot(tr.teacher)  # teacher == critic base + critic LoRA
    rec = tr.generator_step()
    assert math.isfinite(rec["loss_generator"]) and rec["loss_dmd"] > 0 and "loss_stage1" in rec
    assert _changed(tr.student, s0)
    assert not _changed(tr.teacher, t0)  # neither the real score nor the critic moved
    assert all(p.grad is None for p in tr.teacher.parameters())


def test_generator_step_without_stage1_cotraining(teacher_dir, stage1_dir, tmp_path):
    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, stage1_weight=0.0, lr=1e-3))
    s0 = _snapshot(tr.student)
    rec = tr.generator_step()
    assert "loss_stage1" not in rec and rec["loss_generator"] == pytest.approx(rec["loss_dmd"])
    assert _changed(tr.student, s0)


@pytest.mark.parametrize("causal", [False, True])
def test_critic_step_never_updates_the_student(teacher_dir, stage1_dir, causal_dir, tmp_path, causal):
    kw = dict(causal=True, student=str(causal_dir)) if causal else {}
    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, critic_lr=1e-3, **kw))
    s0, t0 = _snapshot(tr.student), _snapshot(tr.teacher)
    rec = tr.critic_step()
    assert math.isfinite(rec["loss_critic"])
    assert not _changed(tr.student, s0)
    assert all(p.grad is None for p in tr.student.parameters())
    moved = _changed(tr.teacher, t0)
    assert moved and all("lora_" in n for n in moved)  # only the critic's adapters


def test_random_choices_agree_across_ranks(teacher_dir, stage1_dir, tmp_path):
    recs = []
    for rank in (0, 1):
        tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, stage1_weight=0.0, batch_size=1), rank=rank, world_size=2)
        _, m = tr.generator_update_loss(5, 0)
        _, c = tr.critic_update_loss(5, 0)
        recs.append((m, c))
    (m0, c0), (m1, c1) = recs
    assert (m0["gen_steps"], m0["gen_grad_index"]) == (m1["gen_steps"], m1["gen_grad_index"])
    assert (c0["critic_steps"], c0["critic_grad_index"]) == (c1["critic_steps"], c1["critic_grad_index"])
    assert m0["loss_dmd"] != m1["loss_dmd"]  # different data and noise per rank


def test_resume_gives_the_same_next_loss(teacher_dir, stage1_dir, tmp_path):
    straight = _cfg(teacher_dir, stage1_dir, tmp_path / "a", steps=3, ckpt_every=2, lr=1e-4, critic_lr=1e-4)
    train_stage2(straight)
    first = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]

    killed = _cfg(teacher_dir, stage1_dir, tmp_path / "b", steps=2, ckpt_every=2, lr=1e-4, critic_lr=1e-4)
    train_stage2(killed)
    resumed = _cfg(teacher_dir, stage1_dir, tmp_path / "b", steps=3, ckpt_every=2, lr=1e-4, critic_lr=1e-4)
    train_stage2(resumed)
    second = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert second[-1]["step"] == first[-1]["step"] == 3
    for key in ("loss", "loss_dmd", "loss_stage1", "loss_critic"):
        assert abs(second[-1][key] - first[-1][key]) < 1e-6, key
    from torch.distributed.checkpoint import FileSystemReader

    from anystep.train.checkpoint import read_meta

    saved = {k.split(".")[0] for k in FileSystemReader(str(tmp_path / "b" / "checkpoint")).read_metadata().state_dict_metadata}
    assert {"student", "critic", "opt_g", "opt_c", "ema_g", "ema_c"} <= saved
    assert read_meta(tmp_path / "b")["step"] == 3


@pytest.mark.parametrize("rollout,causal", [("flowmap", False), ("consistency", False), ("flowmap", True), ("consistency", True)])
def test_one_step_writes_a_loadable_folder(teacher_dir, stage1_dir, causal_dir, tmp_path, rollout, causal):
    from anystep.sampling import generate_latents, load_model

    kw = dict(causal=True, student=str(causal_dir)) if causal else {}
    folder = train_stage2(_cfg(teacher_dir, stage1_dir, tmp_path, rollout=rollout, steps=1, **kw))
    m = load_model(folder)
    assert m.kind == ("anyflow_far" if causal else "anyflow")
    assert generate_latents(m, ["a red one moving up"], 2).shape == (1, F_LAT, C, H, W)
    m.sampler = "consistency"  # a flow-map student under the other sampler too
    lat = generate_latents(m, ["a red one moving up"], 3)
    assert lat.shape == (1, F_LAT, C, H, W) and torch.isfinite(lat).all()


# -- consistency ODE-init --------------------------------------------------------------------------------


def test_teacher_ode_matches_the_teacher_sampler(teacher_dir):
    """The ODE-init targets are the teacher's own Euler + CFG samples (anystep.sampling), and the
    recorded states sit at the grid times (state 0 is the noise itself)."""
    from anystep.models.text import encode_prompts
    from anystep.sampling import generate_latents, load_model
    from anystep.train.baselines import teacher_ode_states

    m = load_model(teacher_dir)
    prompts = ["a red one moving up", "a blue seven moving left"]
    noise, _ = _inputs(4)
    with torch.no_grad():
        cond = encode_prompts(m.pipe.tokenizer, m.pipe.text_encoder, prompts, m.max_sequence_length)
        null = encode_prompts(m.pipe.tokenizer, m.pipe.text_encoder, [""] * 2, m.max_sequence_length)
    grid = consistency_grid(4)
    states, x0 = teacher_ode_states(m.transformer.float(), noise, cond, null, grid, ode_steps=8, guidance=4.0)
    ref = generate_latents(m, prompts, 8, noise=noise, guidance_scale=4.0)
    assert states.shape == (4, B, F_LAT, C, H, W) and torch.equal(states[0], noise)
    assert (x0 - ref).abs().max() < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_consistency_init_trains_and_writes_a_loadable_folder(teacher_dir, tmp_path, causal):
    from anystep.sampling import generate_latents, load_model
    from anystep.train.baselines import ConsistencyInitConfig, train_consistency_init

    kw = dict(causal=True, chunk_partition=CAUSAL_PART) if causal else {}
    folder = train_consistency_init(ConsistencyInitConfig(teacher=str(teacher_dir), out=str(tmp_path / "ci"), steps=1,
                                                          batch_size=2, ode_steps=8, warmup=1, log_every=1, **kw))
    rec = [json.loads(line) for line in open(tmp_path / "ci" / "metrics.jsonl")][-1]
    assert rec["step"] == 1 and math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    m = load_model(folder)
    assert m.kind == ("anyflow_far" if causal else "anyflow")
    assert m.sampler == "consistency"
    assert generate_latents(m, ["a red one moving up"], 4).shape == (1, F_LAT, C, H, W)


def test_cli_stage2_dry_run(capsys):
    from anystep.cli import main

    assert main(["train", "stage2", "--config", "configs/toy/stage2.yaml", "--dry-run", "rollout=consistency", "steps=5"]) == 0
    out = capsys.readouterr().out
    assert "rollout: consistency" in out and "steps: 5" in out


def test_consistency_init_targets_the_flow_map_students_guided_field():
    """One guidance scale per target: the ODE-init's teacher field v_u + w (v_c - v_u) is the
    conditional output the Stage-1 student is fused to (Eq. 6 at g), in code and in the toy config."""
    import yaml

    from anystep.flow.stage1 import guidance_fused_velocity
    from anystep.train.baselines import ConsistencyInitConfig
    from anystep.train.stage1 import Stage1Config

    g = torch.Generator().manual_seed(0)
    vc, vu = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs" / "toy"
    toy = yaml.safe_load((configs / "consistency_init.yaml").read_text())["teacher_guidance"]
    for w, fuse in ((ConsistencyInitConfig().teacher_guidance, Stage1Config().guidance),
                    (toy, yaml.safe_load((configs / "stage1.yaml").read_text())["guidance"])):
        ode_field = vu + w * (vc - vu)
        # the student's conditional output at zero Stage-1 loss fuses to the data velocity vc
        assert torch.allclose(guidance_fused_velocity(ode_field, vu, fuse), vc)


def test_the_real_score_is_one_seam(teacher_dir, stage1_dir, tmp_path):
    """Stage 2 scores DMD's real side through ``real_velocity`` alone: another velocity field put
    there (an exact empirical flow, say) is what the generator step sees."""
    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path))
    z, cond = _inputs(2)
    sigma = torch.tensor([0.9, 0.4])
    seen = []

    def zero_field(z_, sigma_, cond_, null_, prompts_=None):
        seen.append(tuple(z_.shape))
        return torch.zeros_like(z_)

    tr.real_velocity = zero_field
    assert torch.equal(tr.real_x0(z, sigma, cond, torch.randn_like(cond)), z)  # x0 = z - sigma * 0
    tr.generator_step()
    assert seen[-1] == (2, F_LAT, C, H, W)


def test_empirical_real_score_is_the_exact_flow_with_cfg_4(teacher_dir, stage1_dir, tmp_path):
    """real_score: empirical distils from the toy world's exact flow, v_c + 3 (v_c - v_u) (CFG 4 in
    the usual form), whatever the teacher network says; the critic is still the teacher + LoRA."""
    from anystep.config import ConfigError
    from anystep.flow.empirical import EmpiricalFlow

    tr = Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, real_score="empirical", real_score_clips=4))
    flow = EmpiricalFlow.from_folder(teacher_dir, clips_per_prompt=4)
    prompts = ["a red one moving up", "a blue seven moving left"]
    ids = flow.prompt_ids(prompts)
    z, cond = _inputs(5)
    sigma = torch.tensor([0.8, 0.3])
    got = tr.real_x0(z, sigma, cond, torch.randn_like(cond), prompts)
    mean_c, mean_u = flow.posterior_means(z, sigma, ids)
    assert (got - (mean_c + 3.0 * (mean_c - mean_u))).abs().max() < 1e-3
    rec = tr.generator_step()
    assert math.isfinite(rec["loss_dmd"]) and rec["loss_dmd"] > 0
    with pytest.raises(ConfigError, match="moving_digits"):
        Stage2Method(_cfg(teacher_dir, stage1_dir, tmp_path, real_score="empirical", data=str(tmp_path)))


def test_consistency_init_from_the_empirical_flow_regresses_its_ode_end_points(teacher_dir, tmp_path):
    from anystep.train.baselines import ConsistencyInitConfig, ConsistencyInitMethod, ode_states

    cfg = ConsistencyInitConfig(teacher=str(teacher_dir), out=str(tmp_path / "ci"), steps=1, batch_size=2, ode_steps=8,
                                real_score="empirical", real_score_clips=4)
    m = ConsistencyInitMethod(cfg)
    x, prompts = m.batch(0, 0)
    ids = m.empirical.prompt_ids(prompts)
    noise, _ = _inputs(6)
    states, x0 = ode_states(m.empirical.halves_velocity(ids), noise, m.grid, 8, guidance=3.0)
    assert torch.equal(states[0], noise.float())
    own = m.empirical.bank.view(len(m.empirical.prompts), 4, -1)[ids]  # (B, K, D)
    assert ((own - x0.flatten(1)[:, None]).abs().amax(2).amin(1) < 0.05).all()  # each lands on a clip of its prompt
    # The halves velocity with CFG in euler is the flow's own guided velocity.
    v_both = m.empirical.halves_velocity(ids)(torch.cat([noise, noise]), 0.5)
    guided = v_both[2:] + 3.0 * (v_both[:2] - v_both[2:])
    assert (guided - m.empirical.velocity(noise, 0.5, ids, 3.0)).abs().max() < 1e-3
    loss, _ = m.loss(0, 0)
    assert math.isfinite(loss.item())

