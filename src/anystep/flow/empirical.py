"""The exact flow of the empirical MovingDigits distribution: a teacher that is perfect at many
steps (docs/design.md section 5; issue 18, item 2). A prototype, not wired into ``anystep reproduce``.

For the straight noising path z_t = (1 - t) x + t e over a finite set of clips {x_i} with prior
weights pi_i, the posterior over which clip was noised is

    p(i | z_t) = softmax_i( log pi_i - |z_t - (1 - t) x_i|^2 / (2 t^2) ),

so E[x | z_t] = sum_i p(i | z_t) x_i, and the flow-matching velocity E[e - x | z_t] is
(z_t - E[x | z_t]) / t (from e = (z_t - (1 - t) x) / t). Sampling this velocity with Euler at many
steps lands on a training clip; one step from pure noise returns the prior mean of the clips (a
blurred average).

The conditional set of a prompt is every training clip that prompt can produce: each sklearn
*train* image of the digit at each of the world's cross-axis offsets, in the prompt's colour and
direction (uniform, as ``MovingDigits`` draws them). The unconditional mixture (for CFG) would be the
same over all prompts; its exact form is ~100x larger than one prompt's, so
:class:`EmpiricalTeacher` keeps the prompt's own component exactly and stands in for the other
prompts with ``n_others`` clips drawn from the training stream (an importance-sampled mixture: the
prompt's clips carry prior 1/P between them, the others (P - 1)/P). Near t = 0 the conditional and
unconditional posteriors then collapse onto the same clip, as they do for the exact mixture.

Everything runs in the normalised latent space of a model folder's codec (the toy codec is affine
and exact), so the velocity has the network teacher's interface: latents (B, F, C, h, w), sigma t.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from anystep.data.moving_digits import MovingDigits, WorldConfig, digit_images, parse_prompt, render_clip
from anystep.eval.toybench import score_videos, toybench_prompts
from anystep.flow.guidance import guided_velocity
from anystep.flow.schedule import sampling_grid
from anystep.models.latents import encode_pixels
from anystep.models.loaded import load_model
from anystep.report import bootstrap_ci
from anystep.sampling import initial_noise, latents_to_video


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


class EmpiricalTeacher:
    """The exact empirical flow as a velocity function over a model folder's latent space."""

    def __init__(self, folder: str = "models/toy-teacher", world: WorldConfig | None = None, n_others: int = 2048,
                 seed: int = 0):
        self.model = load_model(folder)
        self.world = world or WorldConfig()
        self.n_prompts = len(self.world.colors) * 10 * len(self.world.directions)
        ds = MovingDigits("train", self.world, seed=seed)
        clips = [ds[i] for i in range(n_others)]
        self._other_prompts = np.array([c.prompt for c in clips])
        self._others = self.encode(np.stack([c.video for c in clips])).flatten(1).double() if clips else None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def encode(self, videos: np.ndarray) -> torch.Tensor:
        return encode_pixels(self.model.pipe.vae, torch.from_numpy(np.ascontiguousarray(videos))).float()

    def sets(self, prompt: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, the unconditional clip set (N + M', D) float64 whose first N rows are the prompt's
        own clips, its log prior, its squared norms)."""
        if prompt not in self._cache:
            own = self.encode(prompt_clips(prompt, self.world)).flatten(1).double()
            p = self.n_prompts
            log_prior = torch.full((len(own),), -math.log(p * len(own)))
            mix = own
            if self._others is not None:
                oth = self._others[torch.from_numpy(self._other_prompts != prompt)]
                log_prior = torch.cat([log_prior, torch.full((len(oth),), math.log((p - 1) / p) - math.log(len(oth)))])
                mix = torch.cat([own, oth])
            self._cache = {prompt: (len(own), mix, log_prior, (mix * mix).sum(1))}  # one prompt at a time: ~0.8 GB
        return self._cache[prompt]

    def velocity(self, z: torch.Tensor, t: float, prompt: str, guidance: float | None = None) -> torch.Tensor:
        """Velocity at latents z (B, F, C, h, w), sigma t, for one prompt; with ``guidance`` w,
        v_u + w (v_c - v_u) (the usual CFG form) with the unconditional mixture."""
        n, mix, log_prior, sq = self.sets(prompt)
        flat = z.flatten(1).double()
        # One likelihood pass serves both: the conditional set is the first n rows of the mixture.
        ll = empirical_log_likelihood(flat, t, mix, sq)
        v = (flat - torch.softmax(ll[:, :n], dim=1) @ mix[:n]) / t
        if guidance is not None and guidance != 1.0:
            vu = (flat - torch.softmax(ll + log_prior, dim=1) @ mix) / t
            v = guided_velocity(v, vu, guidance)
        return v.view_as(z).to(z.dtype)

    @torch.no_grad()
    def generate(self, prompts: list[tuple[str, int]], steps, guidance: float | None = None,
                 shift: float = 5.0) -> dict[int, np.ndarray]:
        """{steps: pixels (B, F, 3, H, W)} for each step count: Euler on the shifted grid from each
        prompt seed's initial noise (the noise the network teacher starts from). Prompt by prompt,
        every step count while its clip set is built."""
        steps = [int(s) for s in ([steps] if isinstance(steps, int) else steps)]
        shape = self.model.latent_shape(self.world.num_frames, self.world.canvas, self.world.canvas)
        out: dict[int, list[np.ndarray]] = {s: [] for s in steps}
        for prompt, seed in prompts:
            for s in steps:
                grid = [float(v) for v in sampling_grid(s, shift)]
                z = initial_noise(shape, 1, seed).double()
                for t, t_next in zip(grid[:-1], grid[1:]):
                    z = z - (t - t_next) * self.velocity(z, t, prompt, guidance)
                out[s].append(latents_to_video(self.model, z.float()).clamp(-1, 1).numpy())
        return {s: np.concatenate(v) for s, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ToyBench of the exact empirical-flow teacher")
    ap.add_argument("--steps", default="2,16,50")
    ap.add_argument("--guidance", type=float, default=4.0, help="usual CFG form; 1 = the conditional flow alone")
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--n-others", type=int, default=2048)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world = WorldConfig()
    prompts = toybench_prompts(args.n_prompts, world)
    texts = [p for p, _ in prompts]
    teacher = EmpiricalTeacher(world=world, n_others=args.n_others)
    g = args.guidance if args.guidance != 1.0 else None
    per_step = 2 if g is not None else 1
    videos = teacher.generate(prompts, [int(x) for x in args.steps.split(",")], g)
    for s, v in videos.items():
        r = score_videos(v, texts, world)
        _, lo, hi = bootstrap_ci(r["per_clip"]["total"])
        print(f"empirical flow, CFG {args.guidance:g}, {s} steps (NFE {per_step * s}): Total {r['Total']:.1f} "
              f"[{lo:.1f}, {hi:.1f}]  Quality {r['Quality']:.1f}  Semantic {r['Semantic']:.1f}  "
              f"sharp {r['imaging_sharpness']:.1f}  grain {r['imaging_grain']:.1f}  digit {r['digit_accuracy']:.1f}  "
              f"FD {r['frechet']:.3g}", flush=True)


if __name__ == "__main__":
    main()
