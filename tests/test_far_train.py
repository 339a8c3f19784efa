"""Causal (FAR) student training on CPU (anystep.models.far_train).

FlexAttention has no backward on CPU, so the FAR training forward runs a dense-mask SDPA fallback
there (docs/design.md section 1). These tests check that the fallback is the same function as the flex
path (forward to float rounding, mask equal to ``create_mask`` of diffusers' BlockMask), that it
trains (finite gradients everywhere), that the clean-copy teacher-forcing layout is causal the way
the diffusers mask says, that it agrees with the bidirectional model where it must, and that the
KV-cache sampler is untouched -- and computes the same chunk as the training forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from anystep.models.far_attention import (
    DenseFARAttnProcessor,
    far_attention_for_device,
    far_attention_kind,
    use_compiled_flex_far_attention,
    use_dense_far_attention,
    use_flex_far_attention,
)
from anystep.models.far_train import dense_mask_from_block_mask, far_attention_mask, far_flow_map_velocity, far_layout
from anystep.models.students import mask_far_inference_padding, student_from_teacher
from anystep.models.velocity import flow_map_velocity, teacher_velocity
from anystep.models.toy import TOY_TRANSFORMER

TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)
B, F_LAT, C, H, W = 2, 7, TOY_TRANSFORMER["in_channels"], 8, 8  # toy world latents
FULL_TPF, COMP_TPF = 16, 4  # tokens per frame with patch (1, 2, 2) / compressed patch (1, 4, 4)
PARTITIONS = [(1, 3, 3), (1, 2, 2, 2)]  # no compressed chunk / one compressed context chunk

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")




def _tiny_wan(seed: int = 0, **over):
    """A tiny Wan teacher with every weight perturbed off its constructor value (as in test_students)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TOY_TRANSFORMER, **TINY, **over}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    return model


def _far(wan, **kw):
    far = student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3), **kw).eval()
    with torch.no_grad():  # make emb'(r) and the compressed patchify differ from their warm start
        for p in list(far.condition_embedder.delta_embedder.parameters()) + list(far.far_patch_embedding.parameters()):
            p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 0.1))
    return far


@pytest.fixture(scope="module")
def wan():
    return _tiny_wan()


@pytest.fixture(scope="module")
def far(wan):
    return _far(wan)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, F_LAT, C, H, W, generator=g)
    x = torch.randn(B, F_LAT, C, H, W, generator=g)
    emb = torch.randn(B, 8, TOY_TRANSFORMER["text_dim"], generator=g)
    t = 0.05 + 0.95 * torch.rand(B, F_LAT, generator=g)
    r = t * torch.rand(B, F_LAT, generator=g)
    return z, x, emb, t, r


def _chunk_slices(part, skip_frames=0):
    """Frame slices of each chunk in the *output* (which starts after ``skip_frames``)."""
    out, start = [], 0
    for c in part:
        if start >= skip_frames:
            out.append(slice(start - skip_frames, start - skip_frames + c))
        start += c
    return out


# -- the mask ------------------------------------------------------------------------------------


def _reference_mask(part, has_clean, limit=3):
    """The FAR training mask as read from diffusers' ``_build_far_block_mask_from_far_cfg``, rebuilt
    from token descriptors: [compressed context | noisy full chunks | clean copy of the full chunks]."""
    lay = far_layout(part, limit)
    kinds, chunks = [], []
    for i, c in enumerate(part):
        ctx = i < lay["n_context_chunks"]
        kinds += ["ctx" if ctx else "noise"] * (c * (COMP_TPF if ctx else FULL_TPF))
        chunks += [i] * (c * (COMP_TPF if ctx else FULL_TPF))
    if has_clean:
        for i, c in enumerate(part[lay["n_context_chunks"] :], start=lay["n_context_chunks"]):
            kinds += ["clean"] * (c * FULL_TPF)
            chunks += [i] * (c * FULL_TPF)
    n = len(kinds)
    m = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            kq, kk, cq, ck = kinds[q], kinds[k], chunks[q], chunks[k]
            if not has_clean:
                m[q, k] = ck <= cq
            elif kq in ("ctx", "clean"):
                m[q, k] = ck <= cq and kk != "noise"
            else:  # a noisy chunk: context, itself, clean copies of earlier chunks
                m[q, k] = kk == "ctx" or (kk == "noise" and ck == cq) or (kk == "clean" and ck < cq)
    return m


@pytest.mark.parametrize("part", PARTITIONS + [(7,), (1, 1, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("has_clean", [False, True])
def test_dense_mask_is_the_block_mask(far, part, has_clean):
    from torch.nn.attention.flex_attention import create_mask

    bm = far_attention_mask(far, part, H, W, has_clean, dense=False)
    padded = bm.seq_lengths[0]
    assert padded % 128 == 0
    full = dense_mask_from_block_mask(bm)
    assert torch.equal(full, create_mask(bm.mask_mod, None, None, padded, padded, device="cpu")[0, 0])
    ref = _reference_mask(part, has_clean)
    n = ref.shape[0]
    assert torch.equal(full[:n, :n], ref)
    assert not full[n:].any() and not full[:, n:].any()  # alignment padding is masked both ways
    dense = far_attention_mask(far, part, H, W, has_clean, dense=True)
    assert torch.equal(dense, ref)
    assert dense.diagonal().all()  # every real query sees itself: no all-masked (NaN) SDPA row
    assert far_attention_mask(far, part, H, W, has_clean, dense=True) is dense  # cached per layout


# -- dense == flex -------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [16, 8])  # 8: flex pads heads to 16 and overrides the scale
def test_dense_forward_equals_flex(wan, far, head_dim):
    model = far if head_dim == 16 else _far(_tiny_wan(attention_head_dim=8))
    z, x, emb, t, r = _inputs()
    worst = 0.0
    with torch.no_grad():
        for part in PARTITIONS + [(7,)]:
            for clean in (None, x):
                use_flex_far_attention(model)
                assert far_attention_kind(model) == "flex"
                u_flex = far_flow_map_velocity(model, z, t, r, emb, part, clean)
                use_dense_far_attention(model)
                assert far_attention_kind(model) == "dense"
                u_dense = far_flow_map_velocity(model, z, t, r, emb, part, clean)
                assert u_dense.shape == (B, far_layout(part)["n_full_frames"], C, H, W)
                assert torch.isfinite(u_dense).all()
                worst = max(worst, (u_dense - u_flex).abs().max().item())
                # The dense processor also takes the BlockMask the forward builds by itself.
                bm = far_attention_mask(model, part, H, W, clean is not None, dense=False)
                u_bm = far_flow_map_velocity(model, z, t, r, emb, part, clean, attention_mask=bm)
                assert (u_bm - u_dense).abs().max() <= 1e-6
    use_flex_far_attention(model)
    print(f"max |dense - flex| (head_dim {head_dim}) = {worst:.2e}")
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("head_dim", [16, 8])
def test_flex_kernel_equals_dense(wan, far, head_dim):
    """The CUDA training processor (flex over the BlockMask, compiled there, eager here) computes
    what the dense SDPA processor computes, with and without the clean copy, padding and all."""
    model = far if head_dim == 16 else _far(_tiny_wan(attention_head_dim=8))
    z, x, emb, t, r = _inputs()
    with torch.no_grad():
        for part in PARTITIONS + [(7,)]:
            for clean in (None, x):
                use_dense_far_attention(model)
                u_dense = far_flow_map_velocity(model, z, t, r, emb, part, clean)
                use_compiled_flex_far_attention(model)
                assert far_attention_kind(model) == "flex_compiled"
                u_flex = far_flow_map_velocity(model, z, t, r, emb, part, clean)
                assert (u_flex - u_dense).abs().max() <= 1e-5, (part, clean is None)
    use_flex_far_attention(model)


# -- training on CPU -----------------------------------------------------------------------------


def test_flex_has_no_cpu_backward(wan):
    model = _far(wan).train()
    z, x, emb, t, r = _inputs()
    use_flex_far_attention(model)
    try:
        u = far_flow_map_velocity(model, z[:1], t[:1], r[:1], emb[:1], (1, 3, 3), x[:1])
        u.square().mean().backward()
    except NotImplementedError as e:  # the gap this module bridges
        assert "backward" in str(e).lower()
    else:
        pytest.skip("this torch build has a CPU backward for FlexAttention")


@pytest.mark.parametrize("part", PARTITIONS)
def test_dense_backward_reaches_every_part(wan, part):
    model = _far(wan).train()
    far_attention_for_device(model, "cpu")
    assert far_attention_kind(model) == "dense"
    z, x, emb, t, r = _inputs()
    u = far_flow_map_velocity(model, z, t, r, emb, part, x)
    u.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    must = [
        "patch_embedding.weight",
        "condition_embedder.time_embedder.linear_1.weight",
        "condition_embedder.delta_embedder.linear_1.weight",
        "proj_out.weight",
    ] + [f"blocks.{i}.attn1.{m}.weight" for i in range(TINY["num_layers"]) for m in ("to_q", "to_k", "to_v", "to_out.0")]
    if far_layout(part)["n_context_chunks"]:
        must.append("far_patch_embedding.weight")
    for name in must:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # The gradient is the right one: a directional derivative in z against a central difference.
    model.zero_grad(set_to_none=True)
    zz = z.clone().requires_grad_(True)
    with torch.no_grad():
        d = torch.randn_like(z)
    def loss(zi):
        return far_flow_map_velocity(model, zi, t, r, emb, part, x).double().square().mean()

    loss(zz).backward()
    with torch.no_grad():
        fd = (loss(z + 1e-2 * d) - loss(z - 1e-2 * d)) / 2e-2
    assert abs((zz.grad * d).sum().item() - fd.item()) <= 2e-3 * max(1.0, abs(fd.item()))


# -- causality of the teacher-forcing layout ------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("part", PARTITIONS)
def test_causality(far, part):
    use_dense_far_attention(far)
    z, x, emb, t, r = _inputs()
    lay = far_layout(part)
    n_ctx, n_ctx_chunks = lay["n_context_frames"], lay["n_context_chunks"]
    out_chunks = _chunk_slices(part, n_ctx)  # output chunk j is chunk n_ctx_chunks + j
    starts = [sum(part[:i]) for i in range(len(part))]

    def changed(u0, u1):
        return [bool((u1[:, s] - u0[:, s]).abs().max() > 1e-4) for s in out_chunks]

    def same(u0, u1):
        return [bool((u1[:, s] - u0[:, s]).abs().max() <= 1e-6) for s in out_chunks]

    for clean in (x, None):
        u0 = far_flow_map_velocity(far, z, t, r, emb, part, clean)
        for k in range(n_ctx_chunks, len(part)):  # perturb the noisy input of chunk k
            z1 = z.clone()
            z1[:, starts[k] : starts[k] + part[k]] += 1.0
            u1 = far_flow_map_velocity(far, z1, t, r, emb, part, clean)
            j = k - n_ctx_chunks
            if clean is not None:  # noisy chunks never see each other: only chunk k moves
                expect_changed = [i == j for i in range(len(out_chunks))]
            else:  # plain causal: chunk k and everything after it
                expect_changed = [i >= j for i in range(len(out_chunks))]
            assert changed(u0, u1) == expect_changed, (clean is None, k)
            assert same(u0, u1) == [not e for e in expect_changed], (clean is None, k)
    u0 = far_flow_map_velocity(far, z, t, r, emb, part, x)
    for k in range(len(part)):  # perturb the clean context of chunk k: only later chunks move
        x1 = x.clone()
        x1[:, starts[k] : starts[k] + part[k]] += 1.0
        u1 = far_flow_map_velocity(far, z, t, r, emb, part, x1)
        expect_changed = [n_ctx_chunks + i > k for i in range(len(out_chunks))]
        assert changed(u0, u1) == expect_changed, k
        assert same(u0, u1) == [not e for e in expect_changed], k
    if n_ctx:  # with teacher forcing, z / t / r on compressed-context frames are ignored
        z1, t1 = z.clone(), t.clone()
        z1[:, :n_ctx] += 1.0
        t1[:, :n_ctx] = 0.3
        assert torch.equal(far_flow_map_velocity(far, z1, t1, r, emb, part, x), u0)


@torch.no_grad()
@pytest.mark.parametrize("part", PARTITIONS)
def test_teacher_forcing_is_a_clean_prefix(far, part):
    """Noisy chunk k with the clean-copy layout == chunk k of a plain causal forward whose earlier
    chunks are the clean latents at t = r = 0: what "clean context at t = r = 0" means."""
    use_dense_far_attention(far)
    z, x, emb, t, r = _inputs()
    n_ctx = far_layout(part)["n_context_frames"]
    u_tf = far_flow_map_velocity(far, z, t, r, emb, part, x)
    for s in _chunk_slices(part, n_ctx):
        start = n_ctx + s.start
        z_k = torch.cat([x[:, :start], z[:, start:]], 1)
        zero = torch.zeros(B, start)
        t_k, r_k = torch.cat([zero, t[:, start:]], 1), torch.cat([zero, r[:, start:]], 1)
        u_plain = far_flow_map_velocity(far, z_k, t_k, r_k, emb, part)
        assert (u_plain[:, s] - u_tf[:, s]).abs().max() <= 1e-5


@torch.no_grad()
def test_agrees_with_bidirectional_models(wan, far):
    # A fresh student (emb' = emb) is the teacher at r = t (docs/design.md section 1).
    fresh = use_dense_far_attention(student_from_teacher(wan, causal=True, chunk_partition=(1, 3, 3)).eval())
    use_dense_far_attention(far)
    z, x, emb, t, r = _inputs()
    # r = t, one noise level: the first chunk (one frame, sees only itself) is the Wan teacher on
    # that frame, with or without clean context.
    for s in (0.9, 0.4):
        v = teacher_velocity(wan, z[:, :1], s, emb)
        for clean in (None, x):
            u = far_flow_map_velocity(fresh, z, s, s, emb, (1, 3, 3), clean)
            assert (u[:, :1] - v).abs().max() <= 1e-5
    # One chunk over the whole clip is bidirectional: the plain flow-matching pass of docs/design.md.
    tt = torch.full((B,), 0.6)
    u = far_flow_map_velocity(fresh, z, tt, tt, emb, (F_LAT,))
    assert (u - teacher_velocity(wan, z, tt, emb)).abs().max() <= 1e-5
    # ... and with r != t it is the bidirectional student with the same weights.
    bidi = student_from_teacher(wan).eval()
    bidi.load_state_dict({k: v for k, v in far.state_dict().items() if not k.startswith("far_patch")})
    u = far_flow_map_velocity(far, z, t, r, emb, (F_LAT,))
    assert (u - flow_map_velocity(bidi, z, t, r, emb)).abs().max() <= 1e-5


# -- KV-cache inference ------------------------------------------------------------------------------


def _empty_cache(model, part, batch):
    cfg = model.config
    full = cfg.full_chunk_limit * max(part) * FULL_TPF
    comp = (len(part) - cfg.full_chunk_limit + 1) * max(part) * COMP_TPF
    shape = lambda n: (2, batch, cfg.num_attention_heads, n, cfg.attention_head_dim)  # noqa: E731
    return {
        i: {"full_cache": torch.zeros(shape(full)), "compressed_cache": torch.zeros(shape(comp))}
        for i in range(cfg.num_layers)
    }


def _kv_cache_chunk(model, x, z_k, t_k, r_k, emb, part, k):
    """Chunk k the way AnyFlowFARPipeline computes it: prefill the cache with the clean chunks
    0..k-1 at t = r = 0 (no gradient, mode "cache"), then one step on the noisy chunk k."""
    cache = _empty_cache(model, part, z_k.shape[0])
    n_prev = sum(part[:k])
    with torch.no_grad():
        model(
            hidden_states=x[:, :n_prev],
            timestep=torch.zeros(z_k.shape[0], n_prev),
            r_timestep=torch.zeros(z_k.shape[0], n_prev),
            encoder_hidden_states=emb,
            chunk_partition=list(part[:k]),
            attention_mask=model.build_attention_mask(
                chunk_partition=list(part[:k]), height=H, width=W, mode="cache"
            ),
            kv_cache=cache,
            kv_cache_flag={"num_cached_chunks": k - 1, "is_cache_step": True},
            return_dict=False,
        )
    out, _ = model(
        hidden_states=z_k,
        timestep=t_k * 1000,
        r_timestep=r_k * 1000,
        encoder_hidden_states=emb,
        chunk_partition=list(part[: k + 1]),
        kv_cache=cache,
        kv_cache_flag={"num_cached_chunks": k, "is_cache_step": False},
        return_dict=False,
    )
    return out


@pytest.mark.parametrize("part", PARTITIONS)
def test_kv_cache_step_equals_training_forward(wan, part):
    """The last chunk of a teacher-forced training clip is exactly the chunk the KV-cache sampler
    produces after prefilling the clean chunks before it; and the dense step is differentiable."""
    model = _far(wan)
    z, x, emb, t, r = _inputs()
    k = len(part) - 1
    s = slice(sum(part[:k]), sum(part))
    with torch.no_grad():
        use_dense_far_attention(model)
        u_train = far_flow_map_velocity(model, z, t, r, emb, part, x)[:, -part[k] :]
        u_dense = _kv_cache_chunk(model, x, z[:, s], t[:, s], r[:, s], emb, part, k)
        use_flex_far_attention(model)
        mask_far_inference_padding(model)
        u_flex = _kv_cache_chunk(model, x, z[:, s], t[:, s], r[:, s], emb, part, k)
    assert (u_dense - u_train).abs().max() <= 1e-5
    assert (u_flex - u_dense).abs().max() <= 1e-5  # dense == the padding-masked flex step
    # Processors installed over the padding-masked ones restore to them.
    use_dense_far_attention(model)
    zk = z[:, s].clone().requires_grad_(True)
    _kv_cache_chunk(model, x, zk, t[:, s], r[:, s], emb, part, k).square().mean().backward()
    assert torch.isfinite(zk.grad).all() and zk.grad.abs().sum() > 0
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    use_flex_far_attention(model)
    assert type(model.blocks[0].attn1.processor).__name__ == "PaddingMaskedCausalAttnProcessor"
    # dense_kv_cache=False delegates the cache paths to that flex processor (no CPU backward).
    use_dense_far_attention(model, dense_kv_cache=False)
    with torch.no_grad():
        assert (_kv_cache_chunk(model, x, z[:, s], t[:, s], r[:, s], emb, part, k) - u_flex).abs().max() == 0


def test_processor_switching(far):
    use_flex_far_attention(far)
    stock = [b.attn1.processor for b in far.blocks]
    far_attention_for_device(far, "cpu")
    assert all(isinstance(b.attn1.processor, DenseFARAttnProcessor) for b in far.blocks)
    dense = [b.attn1.processor for b in far.blocks]
    use_dense_far_attention(far)  # idempotent
    assert [b.attn1.processor for b in far.blocks] == dense
    far_attention_for_device(far, "cuda")  # only swaps processors; no GPU needed
    assert far_attention_kind(far) == "flex_compiled"
    assert [b.attn1.processor.flex_processor for b in far.blocks] == stock  # the KV-cache delegate
    use_flex_far_attention(far)
    assert far_attention_kind(far) == "flex"
    assert [b.attn1.processor for b in far.blocks] == stock
    with pytest.raises(TypeError, match="AnyFlowFARTransformer3DModel"):
        use_dense_far_attention(student_from_teacher(_tiny_wan()))


def test_bad_inputs(far):
    z, x, emb, t, r = _inputs()
    with pytest.raises(ValueError, match="covers 6 frames"):
        far_flow_map_velocity(far, z, t, r, emb, (1, 2, 3), x)
    with pytest.raises(ValueError, match="clean_latents"):
        far_flow_map_velocity(far, z, t, r, emb, (1, 3, 3), x[:, :3])
    with pytest.raises(ValueError, match="t_sigma"):
        far_flow_map_velocity(far, z, t[:, :3], r, emb, (1, 3, 3))
    with pytest.raises(TypeError, match="AnyFlowFARTransformer3DModel"):
        far_flow_map_velocity(student_from_teacher(_tiny_wan()), z, t, r, emb, (1, 3, 3))


# -- the stock pipeline still samples ------------------------------------------------------------------


@pytest.fixture(scope="module")
def far_folder(tmp_path_factory):
    from anystep.models.students import student_folder_from_teacher
    from anystep.train.teacher import TeacherConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = TeacherConfig(
        out=str(out), steps=1, batch_size=2, warmup=1, probe_every=1000, ckpt_every=1000, transformer=TINY
    )
    teacher = train_teacher(cfg)
    return student_folder_from_teacher(
        teacher, tmp_path_factory.mktemp("s") / "far", causal=True, chunk_partition=(1, 2, 2, 2), num_frames=F_LAT
    )


def test_pipeline_samples_with_dense_attention(far_folder, monkeypatch):
    from anystep.sampling import generate_latents, initial_noise, load_model

    prompts = ["a red 3 moving left", "a blue 7 moving up"]
    model = load_model(far_folder)
    noise = initial_noise(model.latent_shape(F_LAT, 32, 32), len(prompts), seed=0)
    ref = generate_latents(model, prompts, steps=2, noise=noise)  # flex, padding-masked

    use_dense_far_attention(model.transformer)
    calls = {"n": 0}
    cls = DenseFARAttnProcessor
    orig = cls.__call__

    def counting(self, *a, **kw):
        calls["n"] += 1
        return orig(self, *a, **kw)

    monkeypatch.setattr(cls, "__call__", counting)
    with torch.no_grad():
        out = model.pipe(
            prompt=prompts,
            latents=noise.permute(0, 2, 1, 3, 4),
            num_inference_steps=2,
            guidance_scale=1.0,
            chunk_partition=list(model.transformer.config.chunk_partition),
            output_type="latent",
            max_sequence_length=model.max_sequence_length,
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4)
    # 4 chunks x 2 steps + 3 cache prefills, per layer.
    assert calls["n"] == (4 * 2 + 3) * TINY["num_layers"]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    print(f"max |dense pipeline - flex pipeline| = {(out - ref).abs().max().item():.2e}")
    assert (out - ref).abs().max() <= 1e-4
