"""The network calls the method makes, in the AnyFlow layout (B, F, C, h, w) with sigma times.

``u(z_t, t, r)`` of a bidirectional flow-map student, ``v(z_t, t)`` of a Wan teacher, and
:func:`bidirectional_velocity`, a student bound to its condition as the
:data:`anystep.flow.solvers.VelocityFn` the samplers and rollouts run. Times are sigmas in [0, 1]
(1 = noise) and become model timesteps as ``1000 * sigma`` (docs/design.md section 3).
"""

from __future__ import annotations

import torch
from diffusers import AnyFlowFARTransformer3DModel

from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS
from anystep.flow.solvers import VelocityFn


def per_frame_sigma(sigma, batch: int, frames: int, name: str) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.ndim == 1:
        if s.shape[0] != batch:
            raise ValueError(f"{name} has {s.shape[0]} entries for a batch of {batch}")
        s = s[:, None].expand(batch, frames)
    elif s.ndim != 2 or tuple(s.shape) != (batch, frames):
        raise ValueError(f"{name} must be a scalar, (B,) or (B, F) = ({batch}, {frames}), got shape {tuple(s.shape)}")
    return s


def compute_dtype(model) -> torch.dtype:
    """The dtype a model computes in: FSDP2 with a bf16 policy keeps fp32 master weights (so
    ``model.dtype`` says fp32) but gathers bf16 ones for the forward (set by ``anystep.distributed.shard``)."""
    return getattr(model, "anystep_compute_dtype", None) or model.dtype


def flow_map_velocity(model, z: torch.Tensor, t_sigma, r_sigma, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Average velocity ``u(z_t, t, r)`` of a bidirectional AnyFlow student; ``z_r = z_t - (t - r) u``.

    ``z``: (B, F, C, h, w). ``t_sigma``, ``r_sigma``: sigmas in [0, 1] as a scalar, per sample (B,)
    or per frame (B, F); they are scaled by 1000 to model timesteps (docs/design.md section 3). Timesteps
    stay fp32 whatever the model dtype: 1000*sigma in bf16 would lose the small finite-difference
    offsets (eps = 0.005) the Stage-1 target needs. Returns u with the shape of ``z``. Differentiable.
    """
    if isinstance(model, AnyFlowFARTransformer3DModel):
        raise TypeError("flow_map_velocity is for the bidirectional student; a FAR model needs a chunk_partition")
    if z.ndim != 5:
        raise ValueError(f"z must be (B, F, C, h, w), got shape {tuple(z.shape)}")
    b, f = z.shape[:2]
    t = per_frame_sigma(t_sigma, b, f, "t_sigma").to(z.device) * NUM_TRAIN_TIMESTEPS
    r = per_frame_sigma(r_sigma, b, f, "r_sigma").to(z.device) * NUM_TRAIN_TIMESTEPS
    out = model(
        hidden_states=z.to(compute_dtype(model)),
        timestep=t,
        r_timestep=r,
        encoder_hidden_states=prompt_embeds.to(device=z.device, dtype=compute_dtype(model)),
        return_dict=False,
    )[0]
    return out


def teacher_velocity(wan_model, z: torch.Tensor, t_sigma, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Instantaneous velocity ``v(z_t, t)`` of a Wan teacher, in the AnyFlow layout.

    ``z``: (B, F, C, h, w), permuted to Wan's (B, C, F, h, w) and back. ``t_sigma`` as in
    :func:`flow_map_velocity`; per-frame sigmas are expanded to Wan's per-token timesteps (the
    Wan 2.2 TI2V path of ``WanTransformer3DModel``), which is how the causal rollout's clips --
    frames at different noise levels -- are scored by the bidirectional teacher.
    """
    if z.ndim != 5:
        raise ValueError(f"z must be (B, F, C, h, w), got shape {tuple(z.shape)}")
    b, f, _, h, w = z.shape
    t = per_frame_sigma(t_sigma, b, f, "t_sigma").to(z.device) * NUM_TRAIN_TIMESTEPS
    if bool((t == t[:, :1]).all()):
        timestep = t[:, 0]
    else:
        pt, ph, pw = wan_model.config.patch_size
        if pt != 1:
            raise ValueError("per-frame sigmas need a Wan model with temporal patch 1")
        timestep = t.repeat_interleave((h // ph) * (w // pw), dim=1)
    out = wan_model(
        hidden_states=z.permute(0, 2, 1, 3, 4).to(compute_dtype(wan_model)),
        timestep=timestep,
        encoder_hidden_states=prompt_embeds.to(device=z.device, dtype=compute_dtype(wan_model)),
        return_dict=False,
    )[0]
    return out.permute(0, 2, 1, 3, 4)


def is_causal(model) -> bool:
    """An AnyFlow-FAR student: it generates chunk by chunk over a KV cache."""
    return isinstance(model, AnyFlowFARTransformer3DModel)


def bidirectional_velocity(student, cond: torch.Tensor) -> VelocityFn:
    """``u(z, t, r | c)`` of a bidirectional AnyFlow student, no CFG (the student is guidance-fused)."""
    return lambda z, t, r: flow_map_velocity(student, z, t, r, cond)
