"""ToyBench: VBench's shape in miniature, for MovingDigits (docs/design.md section 4).

A clip is scored against its prompt ``"a {color} {digit} moving {direction}"`` on eight
sub-scores, each a number in [0, 1] per clip:

Semantic (does the clip show what the prompt asks for?)
  * ``digit_accuracy`` - the digit classifier (:mod:`anystep.eval.classifier`, fitted on the sklearn
    *train* split only), averaged in probability over the frames that contain a subject, names the
    prompt's digit.
  * ``color_accuracy`` - the chroma (RGB divided by brightness) of the bright pixels of the subject
    is nearest, among every colour the world knows (``ALL_COLORS``), to the prompt's colour.
  * ``direction_accuracy`` - the subject's centroid moves at least ``MIN_DISPLACEMENT`` of the
    world's travel over the clip, and the fitted motion is nearest (by angle, among all eight
    ``ALL_DIRECTIONS``) to the prompt's direction. A static blob is never right.

Quality (is it a clean, coherent clip, whatever it shows?)
  * ``subject_consistency`` - VBench's subject consistency: the subject's crop, correlated with the
    first frame's and with the previous frame's crop (Pearson, negatives clipped to 0). A digit that
    morphs or dissolves scores low; a rigidly moving one scores 1.
  * ``motion_smoothness`` - how close the centroid trajectory is to constant velocity (the real
    world's motion): ``exp(-excess rms second difference / SMOOTHNESS_SCALE_PX)``, where the excess
    is over the jerk the world's own whole-pixel rounding produces (0 for the default world).
  * ``temporal_flicker`` - motion-compensated frame change: the next frame is shifted back by the
    subject's (integer) motion and compared with this one; the summed absolute brightness change over
    the canvas, relative to the subject's brightness (its window mass), gives
    ``1 - ratio / FLICKER_SCALE`` clipped to [0, 1]. It contains the change of total brightness (the
    summed absolute change bounds it) but, unlike a bare total-brightness check - which stationary
    noise passes, its totals being stable - it also catches a background that boils or a subject
    whose pixels shimmer.
  * ``background_cleanliness`` - the share of brightness energy (brightness squared) inside the
    best digit-sized window, rescaled so that a uniform spread (window area / canvas area) is 0 and
    everything inside the window is 1. Real clips have a pure black background.
  * ``dynamic_degree`` - VBench's dynamic degree, continuous: fitted displacement over the clip
    divided by the world's ``travel``, capped at 1. Pairs with smoothness: a frozen clip is
    perfectly smooth, and this is what stops that from being free.
  * ``imaging_sharpness`` and ``imaging_grain`` - what VBench's imaging quality (MUSIQ) sees,
    blur and noise, measured against how the world forms its images: a real frame is the 8x8
    sklearn digit upscaled by ``digit_scale`` (2x2 blocks of one value) at a whole-pixel position
    on a black canvas.

    - sharpness: the subject's edge energy per unit brightness, ``sum |grad b|^2 / sum b`` over
      the subject window (plus a 2 px margin), divided by ``SHARPNESS_REF`` and capped at 1.
      Blur spreads a stroke's edge over more pixels; averaging k misplaced digits divides each
      one's edges by k while keeping the mass. Both lower the ratio; a grain-free real frame's
      is at least ``SHARPNESS_REF`` (its 1st percentile over held-out frames).
    - grain: the share of the frame's brightness energy that lies *below* the world's pixel
      scale, i.e. off the best-aligned ``digit_scale`` x ``digit_scale`` block grid (the residual
      after replacing every block by its mean, best of the block-grid alignments):
      ``1 - share / GRAIN_SHARE_MAX`` clipped to [0, 1]. Exactly 0 for real frames; speckle puts
      ~3/4 of its energy there, and blur or ghosting some. Vacuous for ``digit_scale`` 1.

    Both are per frame over the frames with a subject, like the others.

Every Quality sub-score is multiplied by the fraction of frames that contain a subject at all (a
window with at least ``MIN_SUBJECT_MASS`` brightness), so a digit that vanishes loses credit and
an all-black clip scores 0 everywhere.

Aggregates, as in VBench: Semantic = 100 * mean of the three accuracies, Quality = 100 * mean of the
seven quality sub-scores (VBench's Quality has seven dimensions too), Total = 0.8 * Quality +
0.2 * Semantic. Plus ``frechet``: the Frechet
(Gaussian) distance between the generated clips' classifier features (hidden layer, mean over frames)
and those of ``REFERENCE_CLIPS`` fixed held-out real clips; a distribution-level check on what the
digits look like. With a teacher reference (:func:`run_toybench`'s ``teacher_reference``) also
``frechet_teacher``: the same distance to the teacher's converged samples (50 steps, 100 NFE with
CFG) of the same prompts and seeds, a distillation-fidelity figure.

Calibration (default world, 32x32, 7 frames), see tests/test_toybench.py: held-out real clips score
Semantic ~99, Quality 100; clipped Gaussian noise and all-black clips score Total < 40. Version 2
(the imaging sub-scores) was decided on corrupted real clips only, before any model was scored with
it: clean real clips >= 95 Total and each of blur (Gaussian, sigma 1 px), grain (clipped Gaussian
pixel noise at the level of the shipped teacher's samples) and the average of 4 real clips of one
prompt >= 10 Total points lower (``test_imaging_subscores_separate_corrupted_real_clips``;
``python -m anystep.eval.toybench_calibration`` prints the table).
"""

from __future__ import annotations

import functools

import numpy as np

from anystep.data.moving_digits import (
    ALL_COLORS,
    ALL_DIRECTIONS,
    MovingDigits,
    WorldConfig,
    make_prompt,
    parse_prompt,
)
from anystep.eval.classifier import brightness, crop_features, get_classifier
from anystep.eval.clip_analysis import DIAGNOSTIC_KEYS, SUB_KEYS, analyse_clip, as_numpy, clip_scores


TOYBENCH_VERSION = 2  # 2: imaging_sharpness and imaging_grain in Quality

REFERENCE_CLIPS = 200
REFERENCE_SEED = 1
PROMPT_BASE_SEED = 1000

# --- prompts -------------------------------------------------------------------------------------


def toybench_prompts(n: int = 40, world: WorldConfig | None = None) -> list[tuple[str, int]]:
    """The fixed ToyBench prompt set: ``n`` (prompt, seed) pairs, deterministic.

    Clip ``i`` asks for digit ``i % 10``, colour ``colors[i % C]`` and direction
    ``directions[(i + i // C) % D]``; with the default world and ``n = 40`` every digit appears 4
    times, every colour and every direction 10 times, and every (colour, direction) pair 2-3 times. Seeds
    are consecutive (``PROMPT_BASE_SEED + i``), matching :func:`anystep.sampling.generate`'s
    "clip i of a batch uses seed + i" rule, so any contiguous batch reproduces the same clips.
    """
    world = world or WorldConfig()
    nc, nd = len(world.colors), len(world.directions)
    out = []
    for i in range(n):
        prompt = make_prompt(world.colors[i % nc], i % 10, world.directions[(i + i // nc) % nd])
        out.append((prompt, PROMPT_BASE_SEED + i))
    return out


# --- Frechet distance ----------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``."""
    import warnings

    from scipy import linalg

    diff = mu1 - mu2
    # With fewer clips than feature dimensions a covariance is singular; sqrtm still returns the
    # right square root of the PSD product, it just warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            eps = np.eye(len(mu1)) * 1e-6
            covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean), 0.0))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    mu = f.mean(0)
    sigma = np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1], f.shape[1]))
    return mu, sigma


@functools.lru_cache(maxsize=8)
def reference_stats(
    world: WorldConfig | None = None, n: int = REFERENCE_CLIPS, seed: int = REFERENCE_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the clip features of ``n`` held-out real clips (``MovingDigits("heldout", seed)``)."""
    world = world or WorldConfig()
    videos, _ = MovingDigits("heldout", world, seed=seed).batch(range(n))
    return feature_stats(clip_features(videos, world))


def clip_features(videos, world: WorldConfig | None = None) -> np.ndarray:
    """(B, F, 3, H, W) -> (B, hidden): classifier hidden features, mean over each clip's frames."""
    world = world or WorldConfig()
    videos = as_numpy(videos)
    clf = get_classifier(world)
    size = world.digit_size
    b = brightness(videos.reshape(-1, *videos.shape[2:]))
    x, _ = crop_features(b, size)
    return clf.features(x).reshape(videos.shape[0], videos.shape[1], -1).mean(1)


def frechet_to_reference(features: np.ndarray, world: WorldConfig | None = None) -> float:
    mu_r, sig_r = reference_stats(world or WorldConfig())
    mu, sig = feature_stats(features)
    return frechet_distance(mu, sig, mu_r, sig_r)


# --- batch scoring -------------------------------------------------------------------------------


def score_videos(videos, prompts: list[str], world: WorldConfig | None = None) -> dict:
    """Score clips (B, F, 3, H, W) in [-1, 1] against their prompts.

    Returns ``Quality``, ``Semantic``, ``Total`` and every sub-score as 0-100 numbers (means over
    clips), ``frechet`` (to the held-out reference), ``n``, and ``per_clip``: a dict of per-clip lists
    (0-100) for every sub-score and ``quality``/``semantic``/``total``, in prompt order, so that
    later code can bootstrap over prompts. Aggregates are exactly the means of the per-clip lists.
    """
    world = world or WorldConfig()
    videos = as_numpy(videos)
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be (B, F, 3, H, W), got {videos.shape}")
    if videos.shape[-1] != world.canvas or videos.shape[-2] != world.canvas:
        raise ValueError(f"videos are {videos.shape[-2]}x{videos.shape[-1]}, the world canvas is {world.canvas}")
    per_clip: dict[str, list[float]] = {k: [] for k in SUB_KEYS + DIAGNOSTIC_KEYS + ("quality", "semantic", "total")}
    feats = []
    for v, p in zip(videos, prompts):
        a = analyse_clip(v, world)
        feats.append(a["features"])
        s = clip_scores(v, p, world, analysis=a)
        for k in SUB_KEYS + DIAGNOSTIC_KEYS:
            per_clip[k].append(100.0 * s[k])
        for k in ("quality", "semantic", "total"):
            per_clip[k].append(s[k])
    out: dict = {"n": len(prompts)}
    for k in SUB_KEYS + DIAGNOSTIC_KEYS:
        out[k] = float(np.mean(per_clip[k]))
    out["Quality"] = float(np.mean(per_clip["quality"]))
    out["Semantic"] = float(np.mean(per_clip["semantic"]))
    out["Total"] = float(np.mean(per_clip["total"]))
    out["frechet"] = frechet_to_reference(np.stack(feats), world)
    out["per_clip"] = per_clip
    return out


def real_clips_for(prompts: list[tuple[str, int]] | list[str], world: WorldConfig | None = None) -> np.ndarray:
    """Held-out real clips matching each prompt (seeded by the prompt's seed): ToyBench's ceiling."""
    world = world or WorldConfig()
    ds = MovingDigits("heldout", world, seed=REFERENCE_SEED)
    out = []
    for i, item in enumerate(prompts):
        prompt, seed = item if isinstance(item, tuple) else (item, i)
        c, d, m = parse_prompt(prompt)
        out.append(ds.clip_for(c, d, m, seed).video)
    return np.stack(out)


