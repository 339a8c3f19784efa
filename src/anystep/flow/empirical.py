"""The exact flow of the empirical MovingDigits distribution: a teacher that is perfect at many
steps and a blurred mean at one (docs/design.md section 5).

For the straight noising path z_t = (1 - t) x + t e over a finite set of clips {x_i} with prior
weights pi_i, the posterior over which clip was noised is

    p(i | z_t) = softmax_i( log pi_i - |z_t - (1 - t) x_i|^2 / (2 t^2) ),

so E[x | z_t] = sum_i p(i | z_t) x_i, and the flow-matching velocity E[e - x | z_t] is
(z_t - E[x | z_t]) / t (from e = (z_t - (1 - t) x) / t). Sampling this velocity with Euler at many
steps lands on a training clip; one step from pure noise returns the prior mean of the clips (a
blurred average).

Sampling-free and pure (the clip set is built once): :class:`EmpiricalFlow` is that teacher for the
toy world, used as the *real score* of Stage 2 and the ODE teacher of the consistency ODE-init
when ``real_score: empirical`` (docs/method.md, "The toy's real score"); the network teacher stays
what students and critics start from, Wan's role. Its clip set is ``clips_per_prompt`` training
clips of every prompt of the world (a seeded draw of (sklearn *train* image of the digit,
cross-axis offset) pairs, rendered in the prompt's colour and direction as ``MovingDigits``
renders them), so the conditional flow of a prompt is exact for its K clips and the unconditional
one (for CFG) is the exact mixture over all prompts, uniform. All of it runs in the normalised
latent space of a model folder's codec (an affine map of pixels, so the flow is exact for the
encoded clips): latents (B, F, C, h, w), per-sample sigma, like the network teacher. ToyBench scores it through
:mod:`anystep.eval.empirical_teacher`.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import torch

from anystep.data.moving_digits import DIGIT_WORDS, WorldConfig, digit_images, make_prompt, parse_prompt, render_clip
from anystep.flow.schedule import sampling_grid
from anystep.models.latents import encode_pixels
from anystep.models.loaded import load_model


def empirical_log_likelihood(z: torch.Tensor, t: float, clips: torch.Tensor, sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """log p(z_t | x_i) up to a constant per row: -|z - (1 - t) x_i|^2 / (2 t^2), (B, N) float64.

    |z - (1 - t) x_i|^2 = |z|^2 - 2 (1 - t) z.x_i + (1 - t)^2 |x_i|^2, and |z|^2 is the same for
    every i, so it is left out (a softmax over i does not see it). Float64: at small t the values
    span thousands. ``sq_norms`` = |x_i|^2, precomputed for a fixed set.
    """
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must be in (0, 1], got {t}")
    xc = clips.double()
    sq = (xc * xc).sum(1) if sq_norms is None else sq_norms.double()
    a = 1.0 - t
    return (2.0 * a * (z.double() @ xc.T) - a * a * sq) / (2.0 * t * t)


def empirical_posterior_mean(z: torch.Tensor, t: float, clips: torch.Tensor, log_prior: torch.Tensor | None = None,
                             sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """E[x | z_t] = sum_i softmax_i(log pi_i + log p(z_t | x_i)) x_i (docs/design.md section 5):
    z (B, D), clips (N, D), t in (0, 1]; ``log_prior`` None = uniform."""
    logits = empirical_log_likelihood(z, t, clips, sq_norms)
    if log_prior is not None:
        logits = logits + log_prior.double()
    return (torch.softmax(logits, dim=1) @ clips.double()).to(z.dtype)


def empirical_velocity(z: torch.Tensor, t: float, clips: torch.Tensor, log_prior: torch.Tensor | None = None,
                       sq_norms: torch.Tensor | None = None) -> torch.Tensor:
    """E[e - x | z_t] = (z_t - E[x | z_t]) / t: the exact flow-matching velocity of the clip set."""
    return (z - empirical_posterior_mean(z, t, clips, log_prior, sq_norms)) / t


def prompt_clips(prompt: str, world: WorldConfig) -> np.ndarray:
    """Every training clip (pixels, (N, F, 3, H, W)) the prompt can produce: each train image of its
    digit at each cross-axis offset, in its colour and direction."""
    color, digit, direction = parse_prompt(prompt)
    images, labels = digit_images("train")
    crosses = range(world.canvas - world.digit_size + 1)
    return np.stack([render_clip(img, color, direction, c, world)[0] for img in images[labels == digit] for c in crosses])


def guided_x0(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """x0 of the guided velocity v_u + g (v_c - v_u) at (z, t): since x0 = z - t v is affine in v,
    it is x0_u + g (x0_c - x0_u), with no division by t (exact as t -> 0)."""
    return x0_uncond + guidance * (x0_cond - x0_uncond)


_CACHE: dict[str, "EmpiricalFlow"] = {}
#: Posterior weights below this are left out of a mean (at most N * 1e-12 of the mass, N ~ 1e4).
_NEGLIGIBLE = 1e-12


def _sparse_mean(weights: torch.Tensor, clips: torch.Tensor) -> torch.Tensor:
    """weights (B, N) @ clips (N, D) over the clips some row weighs above ``_NEGLIGIBLE``: below
    t ~ 0.5 the posterior sits on a handful of clips, and the product is the sampler's main cost."""
    keep = (weights > _NEGLIGIBLE).any(0).nonzero().flatten()
    if 2 * len(keep) > weights.shape[1]:
        return weights.float() @ clips
    return weights[:, keep].float() @ clips.index_select(0, keep)


class EmpiricalFlow:
    """The exact flow of K training clips per prompt, over every prompt of ``world``.

    ``bank`` is (P * K, D) float32, prompt-major: rows p*K .. p*K + K - 1 are prompt p's clips.
    Likelihood dot products run in float32 (the matmul is the cost) and the softmax in float64:
    the gaps between clips grow as 1 / t^2, so rounding in the logits matters only where it cannot
    change the weights.
    """

    def __init__(self, vae, world: WorldConfig | None = None, clips_per_prompt: int = 64, seed: int = 0):
        self.world = world or WorldConfig()
        self.world.validate()
        self.k = int(clips_per_prompt)
        if self.k < 1:
            raise ValueError(f"clips_per_prompt must be >= 1, got {clips_per_prompt}")
        self.prompts = [make_prompt(c, d, r) for c in self.world.colors for d in range(len(DIGIT_WORDS))
                        for r in self.world.directions]
        self.index = {p: i for i, p in enumerate(self.prompts)}
        images, labels = digit_images("train")
        crosses = self.world.canvas - self.world.digit_size + 1
        rows = []
        for i, prompt in enumerate(self.prompts):
            color, digit, direction = parse_prompt(prompt)
            cand = np.flatnonzero(labels == digit)
            pick = np.random.default_rng([seed, i, 18]).choice(len(cand) * crosses, size=min(self.k, len(cand) * crosses),
                                                                replace=False)
            if len(pick) < self.k:
                raise ValueError(f"{prompt!r} has only {len(pick)} training clips, fewer than clips_per_prompt={self.k}")
            pixels = np.stack([render_clip(images[cand[j // crosses]], color, direction, int(j % crosses), self.world)[0]
                               for j in pick])
            with torch.no_grad():
                rows.append(encode_pixels(vae, torch.from_numpy(pixels)).float().flatten(1))
        self.latent_shape = tuple(encode_pixels(vae, torch.from_numpy(pixels[:1])).shape[1:])
        self.bank = torch.cat(rows)
        self.sq_norms = (self.bank.double() ** 2).sum(1)

    @classmethod
    def cached(cls, vae, world: WorldConfig, clips_per_prompt: int = 64, seed: int = 0) -> "EmpiricalFlow":
        """One clip set per (codec settings, world, K, seed) in this process: ``anystep reproduce``
        trains every job in one process, and building a set costs ~10 s on two cores."""
        # The codec's settings without diffusers' bookkeeping (_name_or_path, ...): the toy codec has no
        # weights, so one settings dict is one latent space whichever folder it was loaded from.
        settings = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        key = json.dumps([settings, asdict(world), int(clips_per_prompt), int(seed)], sort_keys=True, default=str)
        if key not in _CACHE:
            while len(_CACHE) >= 2:  # 7- and 13-frame sets, ~0.9 and ~1.6 GB
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = cls(vae, world, clips_per_prompt, seed)
        return _CACHE[key]

    @classmethod
    def from_folder(cls, folder, world: WorldConfig | None = None, clips_per_prompt: int = 64, seed: int = 0) -> "EmpiricalFlow":
        """The clip set encoded with a model folder's codec (so latents match that folder's)."""
        return cls(load_model(folder).codec, world, clips_per_prompt, seed)

    def prompt_ids(self, prompts) -> torch.Tensor:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"the empirical flow knows the world's {len(self.prompts)} prompts; not {missing[0]!r}")
        return torch.tensor([self.index[p] for p in prompts])

    def posterior_means(self, z: torch.Tensor, t, ids: torch.Tensor, unconditional: bool = True):
        """(E[x | z_t, prompt], E[x | z_t] or None), each shaped like ``z``; ``t`` a float or (B,).

        Always in float32 / float64, also inside a training step's bf16 autocast: |z.x| is ~2e4, so
        bf16 products would move the logits by ~100 (1 - t) / t^2 and scramble the posterior."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self._posterior_means(z, t, ids, unconditional)

    def _posterior_means(self, z: torch.Tensor, t, ids: torch.Tensor, unconditional: bool):
        b = z.shape[0]
        if ids.shape[0] != b:
            raise ValueError(f"{ids.shape[0]} prompt ids for {b} latents")
        if z.device != self.bank.device:  # one move to the accelerator, not one copy a call
            self.bank, self.sq_norms = self.bank.to(z.device), self.sq_norms.to(z.device)
        ids = ids.to(z.device)
        flat = z.detach().flatten(1).float()
        if flat.shape[1] != self.bank.shape[1]:
            raise ValueError(f"latents of {tuple(z.shape[1:])} do not match the clip set's {self.latent_shape}")
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(b).to(self.bank.device)
        if (t <= 0).any() or (t > 1).any():
            raise ValueError(f"t must be in (0, 1], got {t.tolist()}")
        a = (1.0 - t)[:, None]
        # Same logits as empirical_log_likelihood, batched over per-sample t.
        logits = (2.0 * a * (flat @ self.bank.T).double() - a * a * self.sq_norms[None]) / (2.0 * (t * t)[:, None])
        own = logits.view(b, len(self.prompts), self.k)[torch.arange(b, device=z.device), ids]
        bank = self.bank.view(len(self.prompts), self.k, -1)
        mean_c = torch.bmm(torch.softmax(own, dim=1).float()[:, None], bank[ids])[:, 0]
        mean_u = _sparse_mean(torch.softmax(logits, dim=1), self.bank) if unconditional else None
        shape = z.shape
        return mean_c.view(shape).to(z.dtype), None if mean_u is None else mean_u.view(shape).to(z.dtype)

    def x0(self, z: torch.Tensor, t, ids: torch.Tensor, guidance: float | None = None) -> torch.Tensor:
        """Clean-clip prediction of the (guided, usual form v_u + g (v_c - v_u)) flow at (z, t)."""
        guided = guidance is not None and guidance != 1.0
        mean_c, mean_u = self.posterior_means(z, t, ids, unconditional=guided)
        return guided_x0(mean_c, mean_u, guidance) if guided else mean_c

    def velocity(self, z: torch.Tensor, t, ids: torch.Tensor, guidance: float | None = None) -> torch.Tensor:
        """(z_t - x0) / t: the exact flow-matching velocity (guided as in :meth:`x0`)."""
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(z.shape[0]).view(-1, *([1] * (z.ndim - 1)))
        return (z - self.x0(z, t, ids, guidance)) / tt

    def halves_velocity(self, ids: torch.Tensor):
        """A velocity ``(zz, t, r)`` for Euler with CFG (:func:`anystep.flow.solvers.euler`): it sees the
        conditional and the null half as one batch ``[z; z]`` and returns ``[v_c; v_u]``, with one
        posterior computation for both halves."""

        def velocity(zz: torch.Tensor, t, _r=None) -> torch.Tensor:
            if zz.shape[0] != 2 * len(ids):  # euler without guidance would pass z alone
                raise ValueError(f"halves_velocity expects [z; z] for {len(ids)} prompts, got {zz.shape[0]} rows")
            z = zz[: zz.shape[0] // 2]
            mean_c, mean_u = self.posterior_means(z, t, ids)
            return torch.cat([(z - mean_c) / t, (z - mean_u) / t]).to(zz.device)

        return velocity

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompts, steps: int, guidance: float | None = None, shift: float = 5.0) -> torch.Tensor:
        """Euler on the shifted grid the network teacher uses, from ``noise`` (B, F, C, h, w)."""
        ids = self.prompt_ids(prompts)
        z = noise.float()
        grid = [float(v) for v in sampling_grid(steps, shift)]
        for t, t_next in zip(grid[:-1], grid[1:]):
            z = z - (t - t_next) * self.velocity(z, t, ids, guidance)
        return z
