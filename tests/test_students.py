"""Flow-map students initialised from a Wan teacher (anystep.models.students).

The central check (docs/design.md section 1): with emb' copied from the pretrained time embedder and
r = t, the AnyFlow student *is* the Wan teacher, to float rounding. Then the student folder is
sampled through the stock diffusers pipelines and compared with an independent computation of the
flow-map steps z_r = z_t - (t - r) u(z_t, t, r) on the shifted grid.
"""

from __future__ import annotations

import copy

import pytest
import torch

from anystep.flow.schedule import sampling_grid
from anystep.models.students import (
    anyflow_config_from_wan,
    check_chunk_partition,
    far_patch_init,
    student_folder_from_teacher,
    student_from_teacher,
)
from anystep.models.velocity import flow_map_velocity, teacher_velocity
from anystep.models.toy import TOY_TRANSFORMER

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
PROMPTS = ["a red 3 moving left", "a blue 7 moving up"]
F_LAT, C, H, W = 7, TOY_TRANSFORMER["in_channels"], 8, 8  # the toy world: 7 frames, 32x32 pixels -> C x 8 x 8 latents

# FAR attention runs FlexAttention unfused on CPU (no torch.compile); torch warns once about it.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")




def _tiny_wan(seed: int = 0):
    """A tiny Wan teacher whose every weight (time embedder, modulation tables, ...) is perturbed
    away from its constructor values, so a wrong or missing copy cannot pass by accident."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TOY_TRANSFORMER, **TINY}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    return model


@pytest.fixture(scope="module")
def wan():
    return _tiny_wan()


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from anystep.train.teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig(out=str(out), steps=1, batch_size=2, warmup=1, probe_every=1000, ckpt_every=1000, transformer=TINY)
    return train_teacher(cfg)


@pytest.fixture(scope="module")
def student_folder(teacher_folder, tmp_path_factory):
    return student_folder_from_teacher(teacher_folder, tmp_path_factory.mktemp("s") / "anyflow")


@pytest.fixture(scope="module")
def far_folder(teacher_folder, tmp_path_factory):
    # Four chunks with a limit of three full-resolution ones: the first chunk becomes compressed
    # context for the last, so the compressed patchify and both KV caches are exercised.
    return student_folder_from_teacher(
        teacher_folder, tmp_path_factory.mktemp("s") / "far", causal=True, chunk_partition=(1, 2, 2, 2), num_frames=7
    )


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, F_LAT, C, H, W, generator=g)
    emb = torch.randn(b, 8, TOY_TRANSFORMER["text_dim"], generator=g)
    return z, emb


# -- config translation ----------------------------------------------------------------------------


def test_config_translation(wan):
    cfg = anyflow_config_from_wan(wan.config)
    assert cfg["gate_value"] == 0.25 and cfg["deltatime_type"] == "r"
    assert "qk_norm" not in cfg and "chunk_partition" not in cfg
    far = anyflow_config_from_wan(wan.config, causal=True, chunk_partition=[1, 3, 3])
    assert far["chunk_partition"] == [1, 3, 3] and far["compressed_patch_size"] == [1, 4, 4]
    assert far["full_chunk_limit"] == 3
    assert anyflow_config_from_wan(wan.config, causal=True)["chunk_partition"] == [1, 3, 3, 3, 3, 3, 3, 2]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"added_kv_proj_dim": 32}, "added_kv_proj_dim"),
        ({"pos_embed_seq_len": 514}, "pos_embed_seq_len"),
        ({"qk_norm": "rms_norm"}, "qk_norm"),
        ({"patch_size": (2, 2, 2)}, "patch_size"),
        ({"window_size": (-1, -1)}, "window_size"),
    ],
)
def test_config_rejects_wan_features_anyflow_lacks(wan, change, match):
    with pytest.raises(ValueError, match=match):
        anyflow_config_from_wan({**dict(wan.config), **change})


def test_config_rejects_bad_options(wan):
    with pytest.raises(ValueError, match="causal"):
        anyflow_config_from_wan(wan.config, chunk_partition=[1, 3, 3])
    with pytest.raises(ValueError, match="chunk_partition"):
        anyflow_config_from_wan(wan.config, causal=True, chunk_partition=[1, 0, 3])
    with pytest.raises(ValueError, match="at least"):
        anyflow_config_from_wan(wan.config, causal=True, chunk_partition=[7])
    with pytest.raises(ValueError, match="deltatime_type"):
        anyflow_config_from_wan(wan.config, deltatime_type="t+r")


# -- bidirectional student: parity with the teacher --------------------------------------------------


def test_student_weights_come_from_teacher(wan):
    student = student_from_teacher(wan)
    t_sd, s_sd = wan.state_dict(), student.state_dict()
    assert set(s_sd) - set(t_sd) == {f"condition_embedder.delta_embedder.{k}" for k in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}
    for k, v in t_sd.items():
        assert torch.equal(s_sd[k], v), k
    for k, v in wan.condition_embedder.time_embedder.state_dict().items():
        assert torch.equal(s_sd[f"condition_embedder.delta_embedder.{k}"], v)
    assert not any(p.is_meta for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())
    # A copy, not an alias: training the student must not move the teacher.
    with torch.no_grad():
        student.condition_embedder.delta_embedder.linear_1.weight.add_(1.0)
        student.proj_out.weight.add_(1.0)
    assert torch.equal(wan.proj_out.weight, t_sd["proj_out.weight"])
    assert torch.equal(wan.condition_embedder.time_embedder.linear_1.weight, t_sd["condition_embedder.time_embedder.linear_1.weight"])


@torch.no_grad()
def test_r_equals_t_reproduces_teacher(wan):
    student = student_from_teacher(wan).eval()
    z, emb = _inputs()
    worst = 0.0
    for s in (1.0, 0.9, 0.5, 0.13, 0.0):
        t = torch.full((2,), s)
        v = teacher_velocity(wan, z, t, emb)
        u = flow_map_velocity(student, z, t, t, emb)
        assert u.shape == z.shape
        worst = max(worst, (u - v).abs().max().item())
    assert worst <= 1e-5, worst
    # Per-frame times (the causal layout) go through Wan's per-token timestep path.
    tf = torch.rand(2, F_LAT, generator=torch.Generator().manual_seed(3))
    assert (flow_map_velocity(student, z, tf, tf, emb) - teacher_velocity(wan, z, tf, emb)).abs().max() <= 1e-5
    # Negative control: a delta embedder that is not the time embedder breaks parity.
    broken = copy.deepcopy(student)
    broken.condition_embedder.delta_embedder.linear_2.bias.add_(0.5)
    t = torch.full((2,), 0.5)
    assert (flow_map_velocity(broken, z, t, t, emb) - teacher_velocity(wan, z, t, emb)).abs().max() > 1e-3


@torch.no_grad()
def test_r_input_is_live(wan):
    student = student_from_teacher(wan).eval()
    z, emb = _inputs()
    t = torch.full((2,), 0.8)
    u_tt = flow_map_velocity(student, z, t, t, emb)
    u_tr = flow_map_velocity(student, z, t, torch.full((2,), 0.2), emb)
    assert (u_tt - u_tr).abs().max() > 1e-3
    # deltatime_type "t-r" feeds t - r to emb' instead of r: a different function off the boundary.
    alt = student_from_teacher(wan, deltatime_type="t-r").eval()
    assert (flow_map_velocity(alt, z, t, torch.full((2,), 0.2), emb) - u_tr).abs().max() > 1e-3


def test_flow_map_velocity_is_differentiable(wan):
    student = student_from_teacher(wan)
    z, emb = _inputs(b=1)
    u = flow_map_velocity(student, z, 0.7, 0.3, emb)
    u.square().mean().backward()
    assert student.condition_embedder.delta_embedder.linear_1.weight.grad is not None


def test_bad_time_shapes(wan):
    student = student_from_teacher(wan)
    z, emb = _inputs()
    with pytest.raises(ValueError, match="t_sigma"):
        flow_map_velocity(student, z, torch.zeros(3), torch.zeros(2), emb)
    with pytest.raises(ValueError, match="r_sigma"):
        flow_map_velocity(student, z, torch.zeros(2), torch.zeros(2, 3), emb)


# -- student folders through the stock pipelines ---------------------------------------------------


def test_student_folder_loads_with_diffusers(student_folder, teacher_folder):
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, WanTransformer3DModel

    pipe = AnyFlowPipeline.from_pretrained(str(student_folder))
    tr = pipe.transformer
    assert isinstance(tr, AnyFlowTransformer3DModel)
    assert not any(p.is_meta for p in tr.parameters())
    assert pipe.scheduler.config.shift == 5.0
    teacher = WanTransformer3DModel.from_pretrained(str(teacher_folder), subfolder="transformer")
    emb = tr.condition_embedder
    for k, v in teacher.condition_embedder.time_embedder.state_dict().items():
        assert torch.equal(emb.delta_embedder.state_dict()[k], v)
        assert torch.equal(emb.time_embedder.state_dict()[k], v)


def _reference_text(folder, prompts):
    """Prompt embeddings computed outside the pipeline, from the folder's own tokenizer/encoder."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from anystep.models.text import encode_prompts

    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    enc = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder")).eval()
    return encode_prompts(tok, enc, prompts, max_sequence_length=tok.model_max_length)


@torch.no_grad()
def test_pipeline_sampling_matches_independent_flow_map_steps(student_folder):
    from diffusers import AnyFlowTransformer3DModel

    from anystep.sampling import generate_latents, initial_noise, load_model

    model = load_model(student_folder)
    assert model.kind == "anyflow"
    emb = _reference_text(student_folder, PROMPTS)
    net = AnyFlowTransformer3DModel.from_pretrained(str(student_folder / "transformer")).eval()
    noise = initial_noise((F_LAT, C, H, W), len(PROMPTS), seed=0)
    for steps in (1, 2):
        got = generate_latents(model, PROMPTS, steps=steps, seed=0)
        assert got.shape == (2, F_LAT, C, H, W) and torch.isfinite(got).all()
        grid = sampling_grid(steps, shift=5.0).float()  # 1 step: [1, 0]; 2 steps: [1, 5/6, 0]
        z = noise
        for t, r in zip(grid[:-1], grid[1:]):
            z = z - (t - r) * flow_map_velocity(net, z, t, r, emb)
        err = (got - z).abs().max().item()
        assert err <= 1e-5, (steps, err)
    # The prompt matters and the layout is not scrambled: a different prompt gives a different sample.
    other = generate_latents(model, ["a green 1 moving down", PROMPTS[1]], steps=1, seed=0)
    assert (other[0] - got[0]).abs().max() > 1e-4 and torch.allclose(other[1], generate_latents(model, PROMPTS, steps=1, seed=0)[1], atol=1e-5)


# -- causal (FAR) student ----------------------------------------------------------------------------


def test_far_patch_init_matches_the_far_class_rule():
    from diffusers import AnyFlowFARTransformer3DModel

    torch.manual_seed(0)
    fresh = AnyFlowFARTransformer3DModel(**{k: v for k, v in {**TOY_TRANSFORMER, **TINY}.items() if k != "qk_norm"}, chunk_partition=(1, 3, 3))
    w, b = far_patch_init(fresh.patch_embedding.weight, fresh.patch_embedding.bias, (1, 4, 4))
    assert torch.allclose(w, fresh.far_patch_embedding.weight, atol=1e-7, rtol=0)
    assert torch.equal(b, fresh.far_patch_embedding.bias)


def test_far_student_from_teacher(wan):
    from diffusers import AnyFlowFARTransformer3DModel

    far = student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3))
    assert isinstance(far, AnyFlowFARTransformer3DModel)
    assert list(far.config.chunk_partition) == [1, 3, 3]
    t_sd, s_sd = wan.state_dict(), far.state_dict()
    extra = set(s_sd) - set(t_sd)
    assert extra == {k for k in s_sd if k.startswith(("condition_embedder.delta_embedder.", "far_patch_embedding."))}
    assert len(extra) == 6
    for k, v in t_sd.items():
        assert torch.equal(s_sd[k], v), k
    for k, v in wan.condition_embedder.time_embedder.state_dict().items():
        assert torch.equal(s_sd[f"condition_embedder.delta_embedder.{k}"], v)
    # The compressed patchify is interpolated from the *teacher's* patch embedding, not left random.
    w, b = far_patch_init(wan.patch_embedding.weight, wan.patch_embedding.bias, (1, 4, 4))
    assert torch.equal(far.far_patch_embedding.weight, w) and torch.equal(far.far_patch_embedding.bias, b)


@torch.no_grad()
def test_far_first_chunk_equals_bidirectional_student(wan):
    """A lone first chunk has no context: the causal student is then the bidirectional one (flex
    attention forward on CPU, unfused)."""
    far = student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3)).eval()
    bi = student_from_teacher(wan).eval()
    z, emb = _inputs()
    t, r = torch.full((2, 1), 700.0), torch.full((2, 1), 200.0)
    u_far = far(z[:, :1], t, r, emb, chunk_partition=[1], return_dict=False)[0]
    u_bi = bi(z[:, :1], t, r, emb, return_dict=False)[0]
    assert (u_far - u_bi).abs().max() <= 1e-5


def test_far_backward_is_unsupported_on_cpu(wan):
    """Documents the library gap (docs/design.md section 1): FlexAttention has no CPU backward, so FAR
    training on CPU needs the dense-mask fallback (inference under no_grad is fine)."""
    far = student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3))
    z, emb = _inputs(b=1)
    t = torch.full((1, F_LAT), 500.0)
    # torch refuses already in the forward once any input to flex attention requires grad.
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        far(z, t, t, emb, chunk_partition=[1, 3, 3], return_dict=False)


@torch.no_grad()
def test_far_pipeline_sampling_matches_teacher_forced_reference(far_folder):
    """The stock FAR pipeline (KV cache, cache re-encoding at t = r = 0, compressed context) against
    an independent chunk-by-chunk computation with the block-causal training forward: chunk k is
    noise_k - u(noise_k | clean chunks < k at t = 0, t = 1, r = 0)."""
    from diffusers import AnyFlowFARTransformer3DModel

    from anystep.sampling import generate_latents, initial_noise, load_model

    model = load_model(far_folder)
    assert model.kind == "anyflow_far"
    got = generate_latents(model, PROMPTS, steps=1, seed=0)
    assert got.shape == (2, F_LAT, C, H, W) and torch.isfinite(got).all()

    net = AnyFlowFARTransformer3DModel.from_pretrained(str(far_folder / "transformer")).eval()
    emb = _reference_text(far_folder, PROMPTS)
    noise = initial_noise((F_LAT, C, H, W), len(PROMPTS), seed=0)
    part = [1, 2, 2, 2]
    done = noise[:, :0]
    for k, n in enumerate(part):
        chunk = noise[:, done.shape[1] : done.shape[1] + n]
        x = torch.cat([done, chunk], dim=1)
        t = torch.cat([torch.zeros(2, done.shape[1]), torch.full((2, n), 1000.0)], dim=1)
        u = net(x, t, torch.zeros_like(t), emb, chunk_partition=part[: k + 1], return_dict=False)[0][:, -n:]
        done = torch.cat([done, chunk - u], dim=1)
    err = (got - done).abs().max().item()
    assert err <= 1e-5, err


@torch.no_grad()
def test_stock_far_kv_step_attends_to_padding(wan):
    """Library gap: diffusers' KV-cache inference step pads to 128 tokens and attends to the zero
    padding unmasked, so it differs from the training forward unless the chunk is a multiple of
    128 tokens. ``mask_far_inference_padding`` closes the gap (and is idempotent)."""
    from anystep.models.students import mask_far_inference_padding

    far = student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3)).eval()
    _, emb = _inputs()
    cfg = far.config

    def both(x):
        n = x.shape[1]
        t, r = torch.full((2, n), 1000.0), torch.zeros(2, n)
        cache = {
            i: {
                "full_cache": torch.zeros(2, 2, cfg.num_attention_heads, 3 * 3 * 64, cfg.attention_head_dim),
                "compressed_cache": torch.zeros(2, 2, cfg.num_attention_heads, 3 * 16, cfg.attention_head_dim),
            }
            for i in range(cfg.num_layers)
        }
        flag = {"num_cached_chunks": 0, "is_cache_step": False}
        train = far(x, t, r, emb, chunk_partition=[n], return_dict=False)[0]
        infer = far(x, t, r, emb, chunk_partition=[n], kv_cache=cache, kv_cache_flag=flag, return_dict=False)[0]
        return (train - infer).abs().max().item()

    g = torch.Generator().manual_seed(5)
    padded = torch.randn(2, 1, C, H, W, generator=g)  # 16 tokens -> 112 padding keys
    aligned = torch.randn(2, 2, C, 16, 16, generator=g)  # 2 x 64 = 128 tokens: no padding
    assert both(padded) > 1e-2
    assert both(aligned) <= 1e-6
    mask_far_inference_padding(far)
    mask_far_inference_padding(far)
    assert both(padded) <= 1e-6 and both(aligned) <= 1e-6


def test_frame_count_must_match_chunk_partition(teacher_folder, far_folder, tmp_path):
    from anystep.sampling import generate_latents, load_model

    with pytest.raises(ValueError, match=r"chunk_partition \[1, 3, 3\] covers 7 latent frames, but 9 frames"):
        student_folder_from_teacher(teacher_folder, tmp_path / "bad", causal=True, chunk_partition=(1, 3, 3), num_frames=9)
    assert not (tmp_path / "bad").exists()
    model = load_model(far_folder)
    with pytest.raises(ValueError, match=r"far.*chunk_partition \[1, 2, 2, 2\] covers 7 latent frames"):
        generate_latents(model, PROMPTS, steps=1, num_frames=5)
    assert check_chunk_partition([1, 3, 3, 3, 3, 3, 3, 2], 81, temporal_factor=4) == 21


def test_teacher_folder_is_required(student_folder, tmp_path):
    from anystep.models.folders import ModelFolderError

    with pytest.raises(ModelFolderError, match="WanPipeline"):
        student_folder_from_teacher(student_folder, tmp_path / "x")
    with pytest.raises(ValueError, match="not a Wan teacher"):
        student_from_teacher(student_folder)
