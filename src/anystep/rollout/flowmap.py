"""Flow-map backward simulation: the student's own rollout, differentiable end to end.

Paper Sec. 4.2.2 ("Flow Map Backward Simulation"), Eq. 8 and Algorithm 2; docs/design.md section 3,
Stage 2. DMD (Eq. 5) needs a sample *from the student's own sampler* to score, and that sample
must carry gradient back to the student. A flow map ``u(z_t, t, r)`` jumps between any two times,
``z_r = z_t - (t - r) u(z_t, t, r | c)``, so by the composition property (Eq. 8) an ``s``-step
Euler rollout tau_0 = 1 > ... > tau_s = 0 can be stood in for by three jumps

    tau_0 -> tau_g  (shortcut over the first g steps)
    tau_g -> tau_{g+1}  (the sampled step itself)
    tau_{g+1} -> 0  (shortcut over the rest),

all with gradient, whatever ``s`` is -- which is why the cost is flat in the step budget (paper
Table 5). The plan (``s``, ``g`` and the jumps, equal-end jumps removed) comes from
:func:`anystep.flow.stage2.flow_map_segments`; here we only *execute* it. No classifier-free
guidance: the Stage-1 student is guidance-fused (Eq. 6) and samples without CFG.

Two executors:

* :func:`flowmap_rollout` -- a bidirectional ``AnyFlowTransformer3DModel``, the whole clip at once
  (:func:`anystep.models.students.flow_map_velocity`);
* :func:`causal_flowmap_rollout` -- an ``AnyFlowFARTransformer3DModel``, chunk by chunk over the
  KV cache (docs/design.md: "each chunk's three segments with gradient; the cache re-encoded without
  gradient at t = r = 0 after each chunk"). :class:`CausalRolloutState` owns the cache; with
  ``use_cache=False`` it recomputes each chunk with the teacher-forced training forward over all
  previous chunks instead (:func:`anystep.models.far_train.far_flow_map_velocity`), which is the
  reference the cached rollout is tested against.

Both run under whatever grad mode the caller has: with gradient for the generator step, under
``torch.no_grad()`` for the critic's rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS

#: ``velocity(z, t, r) -> u`` with t, r sigmas (python floats) and the condition bound in.
VelocityFn = Callable[[torch.Tensor, float, float], torch.Tensor]


@dataclass
class Rollout:
    """A rollout's result.

    ``sample``: the clean clip x^ (B, F, C, h, w) that DMD scores. ``states``: the output of every
    network-call step in execution order (for the causal rollouts chunk 0's steps first, each a
    chunk-sized tensor). ``segments``: the (t, r) jumps of one chunk. ``info``: what was drawn
    (budget ``s``, gradient / exit index) for logging.
    """

    sample: torch.Tensor
    states: list[torch.Tensor]
    segments: tuple[tuple[float, float], ...]
    info: dict = field(default_factory=dict)


def flow_map_jumps(
    velocity: VelocityFn, z: torch.Tensor, segments: Sequence[tuple[float, float]], detach: Collection[int] = ()
) -> list[torch.Tensor]:
    """Execute Eq. 8's jumps ``z_r = z_t - (t - r) u(z_t, t, r)`` in order; return each jump's output.

    ``detach``: indices of jumps whose velocity is cut from the graph (the jump still moves z).
    Only for tests and ablations -- it lets one check that each jump carries gradient.
    Arithmetic in fp32 whatever the model dtype (a 1 - 0.9375 step of a bf16 tensor loses digits).
    """
    states = []
    for i, (t, r) in enumerate(segments):
        if not t > r:
            raise ValueError(f"a flow-map jump must go from higher to lower noise, got t={t}, r={r}")
        u = velocity(z, float(t), float(r)).float()
        if i in detach:
            u = u.detach()
        z = z.float() - (float(t) - float(r)) * u
        states.append(z)
    return states


def bidirectional_velocity(student, cond: torch.Tensor) -> VelocityFn:
    """``u(z, t, r | c)`` of a bidirectional AnyFlow student, no CFG (the student is guidance-fused)."""
    from anystep.models.students import flow_map_velocity

    return lambda z, t, r: flow_map_velocity(student, z, t, r, cond)


def flowmap_rollout(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    segments: Sequence[tuple[float, float]],
    *,
    detach: Collection[int] = (),
) -> Rollout:
    """Bidirectional flow-map backward simulation from pure noise ``noise`` (B, F, C, h, w)."""
    if not segments:
        raise ValueError("a rollout needs at least one jump")
    states = flow_map_jumps(bidirectional_velocity(student, cond), noise, segments, detach)
    return Rollout(states[-1], states, tuple(segments))


# -- causal: chunk by chunk over the KV cache ------------------------------------------------------


def prepare_far_for_rollout(model):
    """Attention the causal rollout needs: on CPU the dense processor (flex has no CPU backward and
    the rollout backpropagates through the KV-cache step); elsewhere compiled flex for the
    training forward and the padding-masked flex processor for the KV-cache steps, so they attend
    to real keys only (see ``anystep.models.students``). Idempotent."""
    from anystep.models.far_train import far_attention_for_device, far_attention_kind
    from anystep.models.students import mask_far_inference_padding

    device = next(model.parameters()).device
    if device.type == "cpu":
        if far_attention_kind(model) != "dense":
            far_attention_for_device(model, device)
    else:
        far_attention_for_device(model, device)
        mask_far_inference_padding(model)
    return model


class CausalRolloutState:
    """Generation state of a FAR student between chunks: what chunk ``k`` may attend to.

    ``use_cache=True`` (the sampler's way, ``AnyFlowFARPipeline``): after each finished chunk the
    whole generated prefix is re-encoded into a fresh KV cache at t = r = 0 under ``no_grad``
    (mode "cache": the oldest chunks beyond ``full_chunk_limit - 1`` go to the compressed (1, 4, 4)
    patchify, so the context moves to compressed form as the clip grows), and chunk ``k``'s
    network calls are KV-cache inference steps over ``chunk_partition[:k + 1]``.

    ``use_cache=False``: chunk ``k``'s call is the teacher-forced training forward over
    ``chunk_partition[:k + 1]`` with the generated chunks as clean context (t = r = 0, detached),
    recomputed every call -- the same function without a cache, used to test the cached path.

    Either way, no gradient crosses from one chunk into the next (docs/design.md: the cache is
    re-encoded without gradient); each chunk's own jumps carry gradient.
    """

    def __init__(self, model, cond: torch.Tensor, chunk_partition: Sequence[int], shape, use_cache: bool = True):
        from anystep.models.students import _as_partition

        self.model = prepare_far_for_rollout(model)
        self.cond = cond
        self.part = _as_partition(chunk_partition)
        b, f, c, h, w = shape
        if sum(self.part) != f:
            raise ValueError(f"chunk_partition {list(self.part)} covers {sum(self.part)} frames, the clip has {f}")
        self.b, self.h, self.w = b, h, w
        self.use_cache = use_cache
        self.index = 0
        self.done: list[torch.Tensor] = []
        self.device = next(model.parameters()).device
        from anystep.models.students import compute_dtype

        self.dtype = compute_dtype(model)  # the cache holds what the blocks compute in (bf16 under FSDP's policy)
        self.cache = self._empty_cache(0, 0) if use_cache else None

    # chunk frame ranges
    def chunk_slice(self, k: int) -> slice:
        start = sum(self.part[:k])
        return slice(start, start + self.part[k])

    def _empty_cache(self, n_comp_tokens: int, n_full_tokens: int) -> dict:
        cfg = self.model.config
        dtype = self.dtype

        def zeros(n):
            return torch.zeros(
                2, self.b, cfg.num_attention_heads, n, cfg.attention_head_dim, device=self.device, dtype=dtype
            )

        return {i: {"full_cache": zeros(n_full_tokens), "compressed_cache": zeros(n_comp_tokens)} for i in range(cfg.num_layers)}

    def _times(self, value: float, frames: int) -> torch.Tensor:
        # sigma -> model units exactly as far_flow_map_velocity does it (fp32 sigma times 1000)
        return torch.full((self.b, frames), float(value), dtype=torch.float32, device=self.device) * NUM_TRAIN_TIMESTEPS

    def velocity(self, z: torch.Tensor, t: float, r: float) -> torch.Tensor:
        """u(z, t, r | c, generated chunks) for the current chunk ``self.index``; ``z`` is that chunk."""
        k = self.index
        if k >= len(self.part):
            raise RuntimeError("every chunk of the clip has been generated")
        n = self.part[k]
        if z.shape[1] != n:
            raise ValueError(f"chunk {k} has {n} frames, got z with {z.shape[1]}")
        if self.use_cache:
            out, _ = self.model(
                hidden_states=z.to(self.dtype),
                timestep=self._times(t, n),
                r_timestep=self._times(r, n),
                encoder_hidden_states=self.cond.to(device=self.device, dtype=self.dtype),
                chunk_partition=list(self.part[: k + 1]),
                kv_cache=self.cache,
                kv_cache_flag={"num_cached_chunks": k, "is_cache_step": False},
                return_dict=False,
            )
            return out
        from anystep.models.far_train import far_flow_map_velocity

        prev = torch.cat(self.done, dim=1) if self.done else z[:, :0].detach()
        zz = torch.cat([prev.to(z.dtype), z], dim=1)
        # The noisy chunk never attends to its own clean copy, so any value serves there.
        clean = torch.cat([prev.to(z.dtype), z.detach()], dim=1)
        f_prev = prev.shape[1]
        tf = torch.cat([torch.zeros(self.b, f_prev), torch.full((self.b, n), float(t))], dim=1)
        rf = torch.cat([torch.zeros(self.b, f_prev), torch.full((self.b, n), float(r))], dim=1)
        u = far_flow_map_velocity(self.model, zz, tf, rf, self.cond, self.part[: k + 1], clean_latents=clean)
        return u[:, -n:]

    def commit(self, chunk: torch.Tensor) -> None:
        """Chunk ``self.index`` is finished: keep it (detached) and re-encode the cache without gradient."""
        k = self.index
        if chunk.shape[1] != self.part[k]:
            raise ValueError(f"chunk {k} has {self.part[k]} frames, got {chunk.shape[1]}")
        self.done.append(chunk.detach())
        self.index += 1
        if self.use_cache and self.index < len(self.part):
            self._encode_cache()

    @torch.no_grad()
    def _encode_cache(self) -> None:
        from anystep.models.far_train import _tokens_per_frame, far_attention_mask, far_layout

        part = self.part[: self.index]
        cfg = self.model.config
        lay = far_layout(part, cfg.full_chunk_limit, mode="cache")
        full_tpf, comp_tpf = _tokens_per_frame(cfg, self.h, self.w)
        # A fresh cache sized exactly for this prefix: nothing written into a tensor an earlier
        # chunk's graph may still hold.
        self.cache = self._empty_cache(lay["n_context_frames"] * comp_tpf, lay["n_full_frames"] * full_tpf)
        x = torch.cat(self.done, dim=1)
        f = x.shape[1]
        self.model(
            hidden_states=x.to(self.dtype),
            timestep=self._times(0.0, f),
            r_timestep=self._times(0.0, f),
            encoder_hidden_states=self.cond.to(device=self.device, dtype=self.dtype),
            chunk_partition=list(part),
            attention_mask=far_attention_mask(self.model, part, self.h, self.w, False, mode="cache", device=self.device),
            kv_cache=self.cache,
            kv_cache_flag={"num_cached_chunks": self.index - 1, "is_cache_step": True},
            return_dict=False,
        )

    def clip(self) -> torch.Tensor:
        return torch.cat(self.done, dim=1)


def causal_flowmap_rollout(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    segments: Sequence[tuple[float, float]],
    chunk_partition: Sequence[int] | None = None,
    *,
    use_cache: bool = True,
    detach: Collection[int] = (),
) -> Rollout:
    """Causal flow-map backward simulation: for each chunk, the same jumps (with gradient) from
    that chunk's slice of ``noise``, then the finished chunk goes into the context (no gradient).

    ``chunk_partition`` defaults to the student's own. The returned ``sample`` is the concatenated
    chunks; it carries gradient through every chunk's jumps, each chunk's context detached.
    """
    if not segments:
        raise ValueError("a rollout needs at least one jump")
    part = tuple(chunk_partition or student.config.chunk_partition)
    state = CausalRolloutState(student, cond, part, tuple(noise.shape), use_cache=use_cache)
    chunks, states = [], []
    for k in range(len(part)):
        js = flow_map_jumps(state.velocity, noise[:, state.chunk_slice(k)], segments, detach)
        states.extend(js)
        chunks.append(js[-1])
        state.commit(js[-1])
    return Rollout(torch.cat(chunks, dim=1), states, tuple(segments))


def is_causal(model) -> bool:
    from diffusers import AnyFlowFARTransformer3DModel

    return isinstance(model, AnyFlowFARTransformer3DModel)


def flowmap_backward_simulation(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    grad_index: int,
    shift: float = 5.0,
    *,
    chunk_partition: Sequence[int] | None = None,
    use_cache: bool = True,
) -> Rollout:
    """Algorithm 2's rollout for budget ``steps`` and gradient index ``grad_index`` on the shifted
    grid, for either kind of student (FAR students roll out chunk by chunk over the KV cache)."""
    from anystep.flow.stage2 import flow_map_segments

    plan = flow_map_segments(steps, grad_index, shift)
    if is_causal(student):
        out = causal_flowmap_rollout(student, noise, cond, plan.segments, chunk_partition, use_cache=use_cache)
    else:
        out = flowmap_rollout(student, noise, cond, plan.segments)
    out.info = {"steps": steps, "grad_index": grad_index}
    return out
