"""Generation state of an AnyFlow-FAR student between chunks: the KV cache and what a chunk sees.

Shared by the sampler (:func:`anystep.sampling.generate_latents`, chunk by chunk) and the Stage-2
causal rollouts (:mod:`anystep.rollout`), which run its :meth:`CausalRolloutState.velocity` -- a
:data:`anystep.flow.solvers.VelocityFn` for the current chunk -- under whatever grad mode they need.
docs/design.md section 3: each chunk's jumps with gradient, the cache re-encoded without gradient
at t = r = 0 after each chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS
from anystep.models.far_attention import far_attention_for_device, far_attention_kind
from anystep.models.far_train import (
    far_attention_mask,
    far_flow_map_velocity,
    far_layout,
    tokens_per_frame,
)
from anystep.models.students import as_partition, mask_far_inference_padding
from anystep.models.velocity import compute_dtype


def prepare_far_for_rollout(model):
    """Attention the causal rollout needs: on CPU the dense processor (flex has no CPU backward and
    the rollout backpropagates through the KV-cache step); elsewhere compiled flex for the
    training forward and the padding-masked flex processor for the KV-cache steps, so they attend
    to real keys only (see ``anystep.models.students``). Idempotent."""
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
        self.model = prepare_far_for_rollout(model)
        self.cond = cond
        self.part = as_partition(chunk_partition)
        b, f, c, h, w = shape
        if sum(self.part) != f:
            raise ValueError(f"chunk_partition {list(self.part)} covers {sum(self.part)} frames, the clip has {f}")
        self.b, self.h, self.w = b, h, w
        self.use_cache = use_cache
        self.index = 0
        self.done: list[torch.Tensor] = []
        self.device = next(model.parameters()).device
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
        part = self.part[: self.index]
        cfg = self.model.config
        lay = far_layout(part, cfg.full_chunk_limit, mode="cache")
        full_tpf, comp_tpf = tokens_per_frame(cfg, self.h, self.w)
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
