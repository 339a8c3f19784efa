"""Consistency backward simulation and the consistency sampler: the baseline AnyFlow replaces.

Paper Sec. 4.2.2 ("Limitations of Consistency Backward Simulation", Fig. 5a) and Table 2;
docs/design.md section 3. This is the Self-Forcing / rCM style rollout: on the shifted grid
tau_0 = 1 > tau_1 > ... > tau_{s-1} (> tau_s = 0; for s = 4 the timesteps 1000, 937.5, 833.3, 625),
every step predicts the clean clip

    x0_i = z_i - tau_i u(z_i, tau_i, 0)      (a flow-map jump to 0; for a consistency model the
                                              same "denoise to data" call)

and re-noises it with *fresh* noise to the next grid time, z_{i+1} = (1 - tau_{i+1}) x0_i +
tau_{i+1} e (:func:`anystep.flow.stage2.consistency_renoise`). In training an exit index
k ~ U{0..s-1} is drawn; steps before k run without gradient (the truncated gradient of Fig. 5a),
step k runs with gradient and its x0 is the sample DMD scores. The fresh noise is what moves these
trajectories off the PF-ODE, which is why the sampler degrades as steps are added (the paper's
central comparison) -- and why rolling out a large step count costs k + 1 network calls, against
three for flow-map backward simulation.

Causal students run the same steps chunk by chunk over the KV cache
(:class:`anystep.rollout.flowmap.CausalRolloutState`); each finished chunk's x0 goes into the
context without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anystep.flow.schedule import sampling_grid
from anystep.flow.stage2 import consistency_renoise
from anystep.rollout.flowmap import (
    CausalRolloutState,
    Rollout,
    VelocityFn,
    bidirectional_velocity,
    is_causal,
)


def consistency_grid(steps: int, shift: float = 5.0) -> list[float]:
    """The ``steps`` start times tau_0..tau_{s-1} of the shifted grid (1000 sigma = 1000, 937.5,
    833.3, 625 for s = 4, shift 5); each step denoises to 0 from one of them."""
    return [float(v) for v in sampling_grid(steps, shift)[:-1]]


def predict_x0(velocity: VelocityFn, z: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = z - sigma u(z, sigma, 0): the flow-map jump from sigma straight to data."""
    return z.float() - float(sigma) * velocity(z, float(sigma), 0.0).float()


def consistency_steps(
    velocity: VelocityFn,
    noise: torch.Tensor,
    grid: Sequence[float],
    exit_index: int,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Steps 0..exit_index of consistency sampling from ``noise`` at grid[0]; returns every step's x0.

    Steps before ``exit_index`` run under ``no_grad`` and re-noise their x0 to the next grid time
    with fresh noise from ``generator``; the last step runs in the caller's grad mode, so its x0
    (the returned list's last entry) carries gradient only through that one network call.
    """
    if not 0 <= exit_index < len(grid):
        raise ValueError(f"exit index must be in [0, {len(grid) - 1}], got {exit_index}")
    z = noise
    outs = []
    for i in range(exit_index):
        with torch.no_grad():
            x0 = predict_x0(velocity, z, grid[i])
            z = consistency_renoise(x0, grid[i + 1], generator=generator)
        outs.append(x0)
    outs.append(predict_x0(velocity, z, grid[exit_index]))
    return outs


def consistency_backward_simulation(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    exit_index: int,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    *,
    chunk_partition: Sequence[int] | None = None,
    use_cache: bool = True,
) -> Rollout:
    """The baseline's training rollout for either kind of student (see the module docstring).

    ``generator`` draws the re-noising noise; give each rank its own. ``sample`` is the exit
    step's x0 (with gradient when the caller has it on); ``states`` are all steps' x0.
    """
    grid = consistency_grid(steps, shift)
    if is_causal(student):
        part = tuple(chunk_partition or student.config.chunk_partition)
        state = CausalRolloutState(student, cond, part, tuple(noise.shape), use_cache=use_cache)
        chunks, states = [], []
        for k in range(len(part)):
            outs = consistency_steps(state.velocity, noise[:, state.chunk_slice(k)], grid, exit_index, generator)
            states.extend(outs)
            chunks.append(outs[-1])
            state.commit(outs[-1])
        sample = torch.cat(chunks, dim=1)
    else:
        states = consistency_steps(bidirectional_velocity(student, cond), noise, grid, exit_index, generator)
        sample = states[-1]
    segments = tuple((t, 0.0) for t in grid[: exit_index + 1])
    return Rollout(sample, states, segments, {"steps": steps, "exit_index": exit_index})


@torch.no_grad()
def consistency_sample(
    student,
    noise: torch.Tensor,
    cond: torch.Tensor,
    steps: int,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    *,
    chunk_partition: Sequence[int] | None = None,
) -> torch.Tensor:
    """The consistency sampler at any step count (inference for the consistency baselines):
    all ``steps`` steps of denoise-to-x0 and re-noise, returning the last x0. ``noise`` is the
    initial latent (B, F, C, h, w); ``generator`` the re-noising noise."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return consistency_backward_simulation(
        student, noise, cond, steps, steps - 1, shift, generator, chunk_partition=chunk_partition
    ).sample


def consistency_generate_latents(
    model,
    prompts: list[str],
    steps: int,
    seed: int = 0,
    num_frames: int = 7,
    height: int = 32,
    width: int = 32,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``anystep.sampling.generate_latents`` for the consistency sampler: normalised latents
    (B, F, C, h, w) from a loaded AnyFlow / AnyFlow-FAR folder (``anystep.sampling.load_model``).

    The initial noise is the same per-clip noise ``generate_latents`` draws (clip i from seed
    ``seed + i``), so flow-map and consistency samplers start from identical latents; the
    re-noising noise comes from one generator seeded with ``seed``. The shift is the folder's.
    """
    from anystep.models.text import encode_prompts
    from anystep.sampling import initial_noise

    if model.kind not in ("anyflow", "anyflow_far"):
        raise ValueError(f"the consistency sampler needs an AnyFlow folder, got a {model.kind} folder")
    shape = model.latent_shape(num_frames, height, width)
    if noise is None:
        noise = initial_noise(shape, len(prompts), seed)
    pipe = model.pipe
    with torch.no_grad():
        cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(prompts), model.max_sequence_length)
    shift = float(getattr(pipe.scheduler.config, "shift", 5.0))
    gen = torch.Generator().manual_seed(int(seed))
    return consistency_sample(model.transformer, noise.float(), cond, steps, shift, gen)
