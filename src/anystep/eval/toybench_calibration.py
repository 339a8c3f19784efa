"""ToyBench's calibration on corrupted real clips: what a judge must see before it judges models.

The corruptions (all of held-out real clips, the ToyBench ``real`` row's own):

* ``blur`` - a Gaussian blur of ``BLUR_SIGMA_PX`` pixels per frame (over-smoothing);
* ``grain`` - independent Gaussian pixel noise of ``TEACHER_GRAIN_SIGMA``, clipped to [-1, 1] like
  every sampler output (speckle, residual noise);
* ``average`` - the mean of ``AVERAGE_K`` real clips of the same prompt (what an x0 prediction
  from high noise looks like: several plausible digits superimposed).

``TEACHER_GRAIN_SIGMA`` is measured, not chosen: :func:`background_noise_sigma` on the shipped
teacher's (``models/toy-teacher``) samples of the 40 ToyBench prompts, Euler + CFG 4, gives 0.206 /
0.189 / 0.192 at 2 / 16 / 50 steps (the mean-based estimate agrees within 0.01), while real clips
give exactly 0; so 0.19.

``python -m anystep.eval.toybench_calibration`` prints the table (Total, Quality, Semantic and every
sub-score per set); ``--teacher FOLDER --steps 2,16,50`` also measures a model's background noise.
"""

from __future__ import annotations

import argparse

import numpy as np

from anystep.data.moving_digits import MovingDigits, WorldConfig, parse_prompt
from anystep.eval.classifier import brightness, locate
from anystep.eval.clip_analysis import QUALITY_KEYS, SEMANTIC_KEYS
from anystep.eval.toybench import REFERENCE_SEED, TOYBENCH_VERSION, real_clips_for, score_videos, toybench_prompts
from anystep.eval.toybench_run import _generate_all
from anystep.models.loaded import load_model

BLUR_SIGMA_PX = 1.0
TEACHER_GRAIN_SIGMA = 0.19  # pixel units of the [-1, 1] range; see the module docstring
AVERAGE_K = 4
GRAIN_SEED = 0
AVERAGE_SEED_STRIDE = 100_003  # the extra clips of a prompt use seeds far from every ToyBench seed


def blur_clips(videos: np.ndarray, sigma: float = BLUR_SIGMA_PX) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    # Black (-1) outside the canvas, as the world's background continues.
    return gaussian_filter(np.asarray(videos, np.float32), sigma=(0, 0, 0, sigma, sigma), mode="constant",
                           cval=-1.0).astype(np.float32)


def grain_clips(videos: np.ndarray, sigma: float = TEACHER_GRAIN_SIGMA, seed: int = GRAIN_SEED) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, np.shape(videos))
    return np.clip(np.asarray(videos, np.float64) + noise, -1.0, 1.0).astype(np.float32)


def average_clips(prompts: list[tuple[str, int]], world: WorldConfig | None = None, k: int = AVERAGE_K) -> np.ndarray:
    """Per prompt, the mean of ``k`` held-out real clips of that prompt: the ToyBench one and k - 1 more."""
    world = world or WorldConfig()
    ds = MovingDigits("heldout", world, seed=REFERENCE_SEED)
    out = []
    for prompt, seed in prompts:
        c, d, m = parse_prompt(prompt)
        out.append(np.mean([ds.clip_for(c, d, m, seed + j * AVERAGE_SEED_STRIDE).video for j in range(k)], axis=0))
    return np.stack(out).astype(np.float32)


def background_noise_sigma(videos: np.ndarray, world: WorldConfig | None = None, margin: int = 2) -> float:
    """The sigma of zero-mean Gaussian pixel noise, clipped at the black floor, that explains the
    background (pixels more than ``margin`` px outside the subject window) of these clips.

    For n ~ N(0, s) clipped to n >= 0, E[n^2] = s^2 / 2, so s = sqrt(2 * mean((x + 1)^2)) over the
    background pixels of all channels. 0 for real clips.
    """
    world = world or WorldConfig()
    v = np.asarray(videos, np.float32)
    n, f, c, h, w = v.shape
    frames = v.reshape(n * f, c, h, w)
    loc = locate(brightness(frames), world.digit_size)
    mask = np.ones((n * f, h, w), bool)
    size = world.digit_size
    for i, (r, cc) in enumerate(loc.top_left):
        mask[i, max(0, r - margin) : r + size + margin, max(0, cc - margin) : cc + size + margin] = False
    d = frames.transpose(0, 2, 3, 1)[mask].astype(np.float64) + 1.0
    return float(np.sqrt(2.0 * (d**2).mean())) if d.size else 0.0


def corruption_sets(n_prompts: int = 40, world: WorldConfig | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    world = world or WorldConfig()
    prompts = toybench_prompts(n_prompts, world)
    real = real_clips_for(prompts, world)
    sets = {"clean": real, "blur": blur_clips(real), "grain": grain_clips(real), "average": average_clips(prompts, world)}
    return [p for p, _ in prompts], sets


def corruption_table(n_prompts: int = 40, world: WorldConfig | None = None) -> dict[str, dict]:
    """ToyBench scores (no per-clip lists) of the clean and corrupted real sets."""
    texts, sets = corruption_sets(n_prompts, world)
    return {k: {kk: vv for kk, vv in score_videos(v, texts, world).items() if kk != "per_clip"} for k, v in sets.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--teacher", default=None, help="also measure this model's background noise sigma")
    ap.add_argument("--steps", default="2,16,50")
    args = ap.parse_args(argv)
    table = corruption_table(args.n_prompts)
    keys = ("Total", "Quality", "Semantic") + QUALITY_KEYS + SEMANTIC_KEYS + ("frechet",)
    print(f"ToyBench v{TOYBENCH_VERSION}, {args.n_prompts} prompts, held-out real clips")
    print(f"{'':24s}" + "".join(f"{k:>10s}" for k in table))
    for k in keys:
        print(f"{k:24s}" + "".join(f"{table[s][k]:10.1f}" if k != "frechet" else f"{table[s][k]:10.3g}" for s in table))
    if args.teacher:
        model = load_model(args.teacher)
        prompts = toybench_prompts(args.n_prompts)
        for s in (int(x) for x in args.steps.split(",")):
            v = _generate_all(model, prompts, s, WorldConfig().num_frames, 20)
            print(f"{args.teacher} {s} steps: background noise sigma {background_noise_sigma(v):.3f}")


if __name__ == "__main__":
    main()
