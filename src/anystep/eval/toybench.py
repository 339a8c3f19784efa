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
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from anystep.conditioning import context_latents
from anystep.data.moving_digits import (
    ALL_COLORS,
    ALL_DIRECTIONS,
    MovingDigits,
    WorldConfig,
    make_prompt,
    parse_prompt,
)
from anystep.eval.classifier import brightness, crop_features, crops, get_classifier, window_sums
from anystep.models.loaded import load_model
from anystep.sampling import DEFAULT_TEACHER_GUIDANCE, generate, nfe
from anystep.train.common import atomic_write

TOYBENCH_VERSION = 2  # 2: imaging_sharpness and imaging_grain in Quality

# --- calibration constants (changing any of them changes every ToyBench number) ----------------
MIN_SUBJECT_MASS = 8.0  # brightness units; a real 16x16 digit carries ~50-120
BRIGHT = 0.5  # brightness above which a pixel counts for the colour estimate
MIN_DISPLACEMENT = 0.25  # fraction of world.travel the subject must move for a direction to count
SMOOTHNESS_SCALE_PX = 2.0  # rms second difference (px) at which smoothness falls to 1/e
FLICKER_SCALE = 1.0  # aligned frame change, relative to the subject's brightness, at which flicker reaches 0
# Edge energy per unit brightness (1/px) at which sharpness reaches 1: the 1st percentile over
# held-out real frames (0.35 on the 40 ToyBench clips, 0.28 on 100 others; median 0.48).
SHARPNESS_REF = 0.35
SHARPNESS_MARGIN = 2  # px around the subject window, so a blurred edge's spill is counted
# Share of brightness energy off the world's block grid at which grain reaches 0 (real frames: 0).
GRAIN_SHARE_MAX = 0.05
REFERENCE_CLIPS = 200
REFERENCE_SEED = 1
PROMPT_BASE_SEED = 1000

SEMANTIC_KEYS = ("digit_accuracy", "color_accuracy", "direction_accuracy")
QUALITY_KEYS = (
    "subject_consistency",
    "motion_smoothness",
    "temporal_flicker",
    "background_cleanliness",
    "dynamic_degree",
    "imaging_sharpness",
    "imaging_grain",
)
SUB_KEYS = SEMANTIC_KEYS + QUALITY_KEYS
# Reported beside the sub-scores, outside Quality / Semantic / Total: the motion lies along the
# prompt's axis, either way. Far above direction_accuracy means the model moves the subject along
# the right line but does not know which end of the clip comes first.
DIAGNOSTIC_KEYS = ("direction_axis_accuracy",)
QUALITY_WEIGHT = 0.8
SEMANTIC_WEIGHT = 0.2


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


# --- per-clip analysis ---------------------------------------------------------------------------


def _as_numpy(videos) -> np.ndarray:
    if hasattr(videos, "detach"):
        videos = videos.detach().cpu().float().numpy()
    return np.asarray(videos, dtype=np.float32)


def _fit_displacement(centroids: np.ndarray, frames: np.ndarray, num_frames: int) -> np.ndarray:
    """Least-squares velocity of the centroid (rows, cols per frame) times the clip length."""
    t = frames.astype(np.float64)
    t = t - t.mean()
    denom = (t**2).sum()
    if denom <= 0:
        return np.zeros(2)
    vel = (t[:, None] * (centroids - centroids.mean(0))).sum(0) / denom
    return vel * (num_frames - 1)


@functools.lru_cache(maxsize=64)
def _rounding_jerk(travel: int, num_frames: int) -> float:
    """RMS second difference (px) of the world's own trajectory, whose positions are rounded to whole
    pixels: 0 when ``travel`` divides evenly over the frames (the default 12 px over 7 frames), up
    to ~0.6 px otherwise. Motion smoothness only counts jerk beyond this."""
    pos = np.rint(travel * np.arange(num_frames) / (num_frames - 1))
    dd = pos[2:] - 2 * pos[1:-1] + pos[:-2]
    return float(np.sqrt((dd**2).mean())) if len(dd) else 0.0


def _nearest_direction(disp: np.ndarray) -> str:
    names = list(ALL_DIRECTIONS)
    vecs = np.array([ALL_DIRECTIONS[k] for k in names], np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return names[int((vecs @ (disp / np.linalg.norm(disp))).argmax())]


def _nearest_color(chroma: np.ndarray) -> str:
    names = list(ALL_COLORS)
    table = np.array([ALL_COLORS[k] for k in names], np.float64)
    return names[int(((table - chroma) ** 2).sum(1).argmin())]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 1e-12 else 0.0


def _aligned_change(a: np.ndarray, b: np.ndarray, shift: tuple[int, int]) -> float:
    """Summed |a(x) - b(x + shift)| over the canvas.

    Measured on the region where both are on the canvas and scaled up to the full canvas area, so a
    large (spurious) shift cannot hide change by shrinking the overlap.
    """
    dr, dc = shift
    h, w = a.shape
    ra, rb = slice(max(0, -dr), min(h, h - dr)), slice(max(0, dr), min(h, h + dr))
    ca, cb = slice(max(0, -dc), min(w, w - dc)), slice(max(0, dc), min(w, w + dc))
    d = np.abs(a[ra, ca] - b[rb, cb])
    return float(d.mean()) * h * w if d.size else float(np.abs(a - b).sum())


def sharpness_ratio(b: np.ndarray, top_left: np.ndarray, size: int, margin: int = SHARPNESS_MARGIN) -> np.ndarray:
    """Per frame: ``sum |grad b|^2 / sum b`` over the subject window grown by ``margin`` (1/px).

    Squared gradients against a linear mass: blurring a stroke lowers it, and so does averaging
    misplaced digits (k copies at 1/k brightness keep the mass but have 1/k of the edge energy).
    """
    n, h, w = b.shape
    out = np.zeros(n)
    for i, (r, c) in enumerate(top_left):
        win = b[i, max(0, r - margin) : min(h, r + size + margin), max(0, c - margin) : min(w, c + size + margin)]
        m = float(win.sum())
        if m > 1e-8:
            out[i] = (float((np.diff(win, axis=0) ** 2).sum()) + float((np.diff(win, axis=1) ** 2).sum())) / m
    return out


def subgrid_share(b: np.ndarray, scale: int) -> np.ndarray:
    """Per frame: the share of brightness energy below the world's pixel scale.

    The frame is cut into ``scale`` x ``scale`` blocks at each of the ``scale**2`` grid alignments
    (zero-padded: the background is black); the residual after replacing every block by its mean
    is the energy a frame rendered like the world's (upscaled sprite, whole-pixel position) cannot
    have. The best alignment counts, divided by the frame's energy ``sum b^2``.
    """
    b = np.asarray(b, np.float64)
    n, h, w = b.shape
    if scale <= 1:
        return np.zeros(n)
    hb, wb = -(-(h + scale - 1) // scale), -(-(w + scale - 1) // scale)
    best = np.full(n, np.inf)
    for pr in range(scale):
        for pc in range(scale):
            x = np.zeros((n, hb * scale, wb * scale))
            x[:, pr : pr + h, pc : pc + w] = b
            blocks = x.reshape(n, hb, scale, wb, scale)
            res = ((blocks - blocks.mean(axis=(2, 4), keepdims=True)) ** 2).sum(axis=(1, 2, 3, 4))
            best = np.minimum(best, res)
    tot = (b**2).sum(axis=(1, 2))
    return np.where(tot > 1e-8, best / np.maximum(tot, 1e-8), 0.0)


def analyse_clip(video, world: WorldConfig | None = None) -> dict:
    """Everything ToyBench measures about one clip (F, 3, H, W) in [-1, 1], prompt-independent.

    Returns a dict with the subject's per-frame ``centroid`` (F, 2), ``present`` mask, the fitted
    ``displacement`` (2,), the estimated ``color`` name, the classifier's mean ``digit_proba`` (10,),
    the clip ``features`` (mean hidden activation over frames) and the five Quality sub-scores.
    """
    world = world or WorldConfig()
    video = _as_numpy(video)
    nf = video.shape[0]
    size = world.digit_size
    clf = get_classifier(world)
    b = brightness(video)
    x, loc = crop_features(b, size)
    present = loc.window_mass >= MIN_SUBJECT_MASS
    pfrac = float(present.mean())
    idx = np.flatnonzero(present)
    hidden = clf.features(x)
    proba = clf.predict_proba(x[present]).mean(0) if len(idx) else np.zeros(10)

    # Colour: mean chroma (RGB / brightness) of the bright pixels inside the subject windows.
    rgb = np.clip((video + 1.0) * 0.5, 0.0, 1.0)
    num, den = np.zeros(3), 0.0
    for f in idx:
        r, c = loc.top_left[f]
        pix = rgb[f, :, r : r + size, c : c + size].reshape(3, -1)
        bb = b[f, r : r + size, c : c + size].reshape(-1)
        m = bb > BRIGHT
        if m.any():
            num += (pix[:, m] / bb[m]).sum(1)
            den += float(m.sum())
    color = _nearest_color(num / den) if den > 0 else None

    # Motion: centroid trajectory of the present frames.
    cen = loc.centroid
    disp = _fit_displacement(cen[idx], idx, nf) if len(idx) >= 2 else np.zeros(2)
    dist = float(np.linalg.norm(disp))

    # Quality sub-scores.
    if len(idx) >= 2:
        cr = crops(b, loc, size)
        first = cr[idx[0]]
        sims = [
            0.5 * (max(_pearson(cr[f], first), 0.0) + max(_pearson(cr[f], cr[g]), 0.0))
            for g, f in zip(idx[:-1], idx[1:])
        ]
        consistency = float(np.mean(sims))
        dd = [
            cen[f + 1] - 2 * cen[f] + cen[f - 1]
            for f in range(1, nf - 1)
            if present[f - 1] and present[f] and present[f + 1]
        ]
        rms = math.sqrt(float(np.mean([(d**2).sum() for d in dd]))) if dd else (0.0 if nf == 2 else math.inf)
        smoothness = math.exp(-max(rms - _rounding_jerk(world.travel, nf), 0.0) / SMOOTHNESS_SCALE_PX)
        flick = []
        for f in range(nf - 1):
            if present[f] and present[f + 1]:
                shift = tuple(int(v) for v in np.rint(cen[f + 1] - cen[f]))
                ratio = _aligned_change(b[f], b[f + 1], shift) / (0.5 * (loc.window_mass[f] + loc.window_mass[f + 1]))
                flick.append(min(max(1.0 - ratio / FLICKER_SCALE, 0.0), 1.0))
            else:
                flick.append(0.0)
        flicker = float(np.mean(flick))
        dynamic = min(dist / world.travel, 1.0)
        sharp = np.minimum(sharpness_ratio(b[idx], loc.top_left[idx], size) / SHARPNESS_REF, 1.0)
        sharpness = float(sharp.mean())
        grain = np.clip(1.0 - subgrid_share(b[idx], world.digit_scale) / GRAIN_SHARE_MAX, 0.0, 1.0)
        graininess = float(grain.mean())
    else:
        consistency = smoothness = flicker = dynamic = sharpness = graininess = 0.0
    # Cleanliness: share of brightness energy in the heaviest digit-sized window, 0 = uniform spread.
    area = size * size / (b.shape[1] * b.shape[2])
    b2 = b.astype(np.float64) ** 2
    best = window_sums(b2, size).reshape(nf, -1).max(1)
    tot = b2.reshape(nf, -1).sum(1)
    frac = np.where(tot > 1e-8, best / np.maximum(tot, 1e-8), area)
    clean = np.clip((frac - area) / (1.0 - area), 0.0, 1.0)
    cleanliness = float(np.mean(clean))

    quality = {
        "subject_consistency": consistency * pfrac,
        "motion_smoothness": smoothness * pfrac,
        "temporal_flicker": flicker * pfrac,
        "background_cleanliness": cleanliness * pfrac,
        "dynamic_degree": dynamic * pfrac,
        "imaging_sharpness": sharpness * pfrac,
        "imaging_grain": graininess * pfrac,
    }
    return {
        "centroid": cen,
        "present": present,
        "displacement": disp,
        "color": color,
        "digit_proba": proba,
        "features": hidden.mean(0),
        "quality": quality,
    }


def clip_scores(video, prompt: str, world: WorldConfig | None = None, analysis: dict | None = None) -> dict[str, float]:
    """The eight sub-scores (fractions in [0, 1]) of one clip against its prompt, plus
    ``quality``, ``semantic`` and ``total`` on the 0-100 scale."""
    world = world or WorldConfig()
    a = analysis if analysis is not None else analyse_clip(video, world)
    color, digit, direction = parse_prompt(prompt)
    present_any = bool(a["present"].any())
    dist = float(np.linalg.norm(a["displacement"]))
    s = {
        "digit_accuracy": float(present_any and int(np.argmax(a["digit_proba"])) == digit),
        "color_accuracy": float(a["color"] == color),
        "direction_accuracy": float(
            dist >= MIN_DISPLACEMENT * world.travel and _nearest_direction(a["displacement"]) == direction
        ),
        **a["quality"],
    }
    moved = dist >= MIN_DISPLACEMENT * world.travel
    s["direction_axis_accuracy"] = float(moved and direction in (_nearest_direction(a["displacement"]),
                                                                 _nearest_direction(-a["displacement"])))
    s["semantic"] = 100.0 * float(np.mean([s[k] for k in SEMANTIC_KEYS]))
    s["quality"] = 100.0 * float(np.mean([s[k] for k in QUALITY_KEYS]))
    s["total"] = QUALITY_WEIGHT * s["quality"] + SEMANTIC_WEIGHT * s["semantic"]
    return s


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
    videos = _as_numpy(videos)
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
    videos = _as_numpy(videos)
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


# --- running a model -----------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1), binary=False)


def _to_image(frame: np.ndarray) -> np.ndarray:
    return np.clip((np.transpose(frame, (1, 2, 0)) + 1.0) * 0.5, 0.0, 1.0)


def save_sample_grid(videos, prompts: list[str], path, title: str = "") -> None:
    """PNG grid of clips: one row per clip (labelled with its prompt), frames as columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    videos = _as_numpy(videos)
    n, nf, _, h, w = videos.shape
    pad = 2
    grid = np.full((n * (h + pad) - pad, nf * (w + pad) - pad, 3), 0.35, np.float32)
    for i in range(n):
        for f in range(nf):
            grid[i * (h + pad) : i * (h + pad) + h, f * (w + pad) : f * (w + pad) + w] = _to_image(videos[i, f])
    fig = Figure(figsize=(1.0 + 0.55 * nf + 2.2, 0.6 + 0.6 * n), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(n)])
    ax.set_yticklabels(prompts, fontsize=7)
    ax.set_xticks([f * (w + pad) + w / 2 for f in range(nf)])
    ax.set_xticklabels([str(f) for f in range(nf)], fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))


def _short(folder: str) -> str:
    """The last two path parts: model folders are usually ``<run>/model``."""
    parts = Path(folder).parts
    return "/".join(parts[-2:])


def plot_toybench(result: dict, path) -> None:
    """Quality / Semantic / Total against NFE (log2 axis), real-clip ceiling dashed; FD beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(result["results"].values(), key=lambda r: r["nfe"])
    x = [r["nfe"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, col in (("Quality", "tab:blue"), ("Semantic", "tab:orange"), ("Total", "tab:green")):
        ax.plot(x, [r[key] for r in rows], "o-", color=col, label=key)
        if "real" in result:
            ax.axhline(result["real"][key], color=col, ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE per clip")
    ax.set_ylabel("ToyBench score (0-100)")
    ax.set_ylim(0, 102)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.legend(fontsize=8, title="dashed: real clips", title_fontsize=7)
    ax.set_title(f"{result.get('kind', '')}: {_short(result.get('model_folder', ''))}", fontsize=9)
    ax2.plot(x, [r["frechet"] for r in rows], "o-", color="tab:red")
    if "real" in result:
        ax2.axhline(result["real"]["frechet"], color="tab:red", ls="--", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(x)
    ax2.set_xticklabels([str(v) for v in x])
    ax2.set_xlabel("NFE per clip")
    ax2.set_ylabel("Frechet distance to held-out clips")
    fig.tight_layout()
    fig.savefig(str(path))


def _generate_all(model, prompts: list[tuple[str, int]], steps: int, num_frames: int, batch_size: int,
                  context: torch.Tensor | None = None, guidance_scale: float | None = None) -> np.ndarray:
    """Pixels of every (prompt, seed), ``batch_size`` at a time; with ``context`` (FAR models), clip i
    continues its own context row."""
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        texts, seeds = [p for p, _ in chunk], [sd for _, sd in chunk]
        ctx = context[s : s + len(chunk)] if context is not None else None
        kw = dict(num_frames=num_frames, guidance_scale=guidance_scale)
        if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
            # generate() draws clip i of a batch from seed + i: a contiguous run batches exactly.
            out.append(_as_numpy(generate(model, texts, steps, seed=seeds[0], context=ctx, **kw)))
        else:
            for i, (t, sd) in enumerate(zip(texts, seeds)):
                one = ctx[i : i + 1] if ctx is not None else None
                out.append(_as_numpy(generate(model, [t], steps, seed=sd, context=one, **kw)))
    return np.concatenate(out)


def real_context(model, real: np.ndarray, context_frames: int) -> torch.Tensor:
    """Latents of the first ``context_frames`` frames of each real clip (B, f, C, h, w), for
    image-to-video (1 frame) or video-to-video ToyBench. They must end on a chunk boundary of the
    model's partition and leave at least one chunk to generate."""
    if getattr(model, "kind", None) != "anyflow_far":
        raise ValueError(f"--context-frames conditions a causal AnyFlow-FAR model; {model.folder} is a {model.kind!r} folder")
    part = [int(c) for c in model.transformer.config.chunk_partition]
    ft = int(model.codec.config.scale_factor_temporal)
    ends = [(sum(part[: k + 1]) - 1) * ft + 1 for k in range(len(part) - 1)]
    if context_frames not in ends:
        raise ValueError(f"--context-frames {context_frames} does not end a chunk of the partition {part} "
                         f"with a chunk left to generate; use one of {ends}")
    h, w = real.shape[-2:]
    return torch.cat([context_latents(model, torch.from_numpy(np.ascontiguousarray(r[:context_frames])), h, w) for r in real])


def default_num_frames(model) -> int:
    """The world's 7 frames; for a causal (AnyFlow-FAR) student, the frame count its chunk partition
    covers (``(latent_frames - 1) * temporal_factor + 1``), since it can only generate that."""
    nf = WorldConfig().num_frames
    if getattr(model, "kind", None) == "anyflow_far":
        part = getattr(model.transformer.config, "chunk_partition", None)
        if part:
            ft = int(model.codec.config.scale_factor_temporal)
            nf = (int(sum(part)) - 1) * ft + 1
    return nf


def teacher_reference_features(teacher_folder, prompts: list[tuple[str, int]], num_frames: int, world: WorldConfig,
                               steps: int = 50, cache: Path | None = None, batch_size: int = 20) -> np.ndarray:
    """Clip features of the teacher's samples of ``prompts`` (their seeds) at ``steps`` Euler steps
    with its default CFG, cached in ``cache`` (an ``.npz``) for the same teacher, prompts and steps."""
    key = json.dumps({"teacher": str(Path(teacher_folder).resolve()), "steps": int(steps), "num_frames": int(num_frames),
                      "prompts": [list(p) for p in prompts], "version": TOYBENCH_VERSION}, sort_keys=True)
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["features"]
    model = load_model(teacher_folder)
    if model.kind != "teacher":
        raise ValueError(f"teacher_reference {teacher_folder} is a {model.kind!r} folder, not a teacher")
    feats = clip_features(_generate_all(model, prompts, int(steps), num_frames, batch_size), world)
    if cache is not None:
        atomic_write(cache, lambda f: np.savez(f, key=np.array(key), features=feats))
    return feats


def _frechet_between(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def run_toybench(
    model_folder,
    steps=(1, 2, 4, 8, 16, 32),
    out_dir=None,
    n_prompts: int = 40,
    num_frames: int | None = None,
    batch_size: int = 20,
    n_show: int = 4,
    reuse: bool = False,
    colors: tuple[str, ...] | None = None,
    directions: tuple[str, ...] | None = None,
    context_frames: int = 0,
    guidance_scale: float | None = None,
    teacher_reference: str | None = None,
    teacher_reference_steps: int = 50,
    sampler: str | None = None,
) -> dict:
    """Generate the ToyBench prompt set at each step count, score it, write the results.

    Writes ``out_dir/toybench.json`` (rewritten atomically after every step count, so a partial run
    leaves valid results), ``out_dir/toybench.png`` (scores against NFE) and
    ``out_dir/samples_{steps}.png`` (the first ``n_show`` clips). ``out_dir`` defaults to
    ``<model_folder>/../toybench``. ``num_frames`` defaults to :func:`default_num_frames` (7, or what
    a causal student's chunk partition covers). Returns the JSON dict:
    ``model_folder``, ``kind``, ``toybench_version``, ``num_frames``, ``prompts`` (prompt, seed),
    ``real`` (the same prompts rendered from held-out real clips: the ceiling) and ``results``:
    ``{str(steps): {steps, nfe, Quality, Semantic, Total, <sub-scores>, frechet, per_clip_total,
    per_clip, seconds}}``. The first ``n_show`` clips of each step count are also kept as
    ``samples_{steps}.npy`` (float16 pixels) for figures that compare methods side by side.

    ``colors`` / ``directions`` evaluate on a shifted domain of the toy world (for example the extra
    colours magenta, cyan, white), with the same metrics and that domain's real clips as reference.

    ``context_frames`` > 0 (causal AnyFlow-FAR models only) gives the model the first frames of each
    prompt's held-out real clip, the ``real`` row's own clips, and scores the whole clip, given
    frames included: image-to-video ToyBench with 1, video-to-video with more. It must end on a
    chunk boundary (1, 4, 7 or 10 for the partition 1,3,3,3,3).

    ``guidance_scale`` sets the classifier-free guidance of models sampled with Euler + CFG (a
    teacher, a flow-matching student; default 4.0) and is recorded in the JSON; flow-map and
    consistency students are guidance-fused, so a value for them is a ``ValueError``.

    ``teacher_reference`` (a teacher folder) adds ``frechet_teacher`` to every row and to ``real``:
    the Frechet distance to that teacher's ``teacher_reference_steps``-step samples of the same
    prompts and seeds (cached as ``out_dir/teacher_reference.npz``). Text-to-video only.

    ``sampler`` samples a flow-map or consistency student with the other students' sampler
    (``"flowmap"`` or ``"consistency"``) instead of its own: the same weights under both samplers
    separate what the training does from what the sampler does. Recorded in the JSON.

    ``reuse=True`` keeps the step counts an earlier run with the same prompts already wrote to
    ``out_dir`` and generates only the missing ones (a killed sweep resumes).
    """
    model_folder = Path(model_folder)
    out_dir = Path(out_dir) if out_dir is not None else model_folder.parent / "toybench"
    model = load_model(model_folder)
    guided = model.kind == "teacher" or model.sampler == "euler_cfg"
    if sampler is not None:
        if guided:
            raise ValueError(f"{model_folder} is sampled with Euler + CFG; a sampler swap applies to flow-map and "
                             "consistency students")
        if sampler not in ("flowmap", "consistency"):
            raise ValueError(f"sampler must be 'flowmap' or 'consistency', got {sampler!r}")
        model.sampler = sampler
    if guidance_scale is not None and not guided:
        raise ValueError(f"{model_folder} is a guidance-fused {model.sampler} student: --guidance-scale "
                         "applies to teachers and flow-matching students only")
    out_dir.mkdir(parents=True, exist_ok=True)
    effective_g = (DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)) if guided else None
    num_frames = int(num_frames or default_num_frames(model))
    domain = {k: tuple(v) for k, v in (("colors", colors), ("directions", directions)) if v}
    world = WorldConfig(num_frames=num_frames, **domain)  # a shifted domain: other colours / directions
    world.validate()
    prompts = toybench_prompts(n_prompts, world)
    texts = [p for p, _ in prompts]

    real_videos = real_clips_for(prompts, world)
    real = score_videos(real_videos, texts, world)
    teacher_feats = None
    if teacher_reference is not None:
        if context_frames:
            raise ValueError("teacher_reference compares text-to-video samples; it does not apply with context_frames")
        teacher_feats = teacher_reference_features(teacher_reference, prompts, num_frames, world, teacher_reference_steps,
                                                   cache=out_dir / "teacher_reference.npz", batch_size=batch_size)
        real["frechet_teacher"] = _frechet_between(clip_features(real_videos, world), teacher_feats)
    context = real_context(model, real_videos, int(context_frames)) if context_frames else None
    result: dict = {
        "model_folder": str(model_folder),
        "kind": model.kind,
        "toybench_version": TOYBENCH_VERSION,
        "num_frames": num_frames,
        "context_frames": int(context_frames),
        "guidance_scale": effective_g,
        "sampler": model.sampler,
        "teacher_reference": ({"folder": str(teacher_reference), "steps": int(teacher_reference_steps)}
                              if teacher_reference is not None else None),
        "prompts": [{"prompt": p, "seed": s} for p, s in prompts],
        "real": {k: v for k, v in real.items() if k != "per_clip"},
        "results": {},
    }
    old = out_dir / "toybench.json"
    if reuse and old.exists():
        prev = json.loads(old.read_text())
        # A JSON written before guidance was recorded used the default.
        # Scores of another ToyBench version are never reused.
        was = {"context_frames": 0, "guidance_scale": DEFAULT_TEACHER_GUIDANCE if guided else None, "toybench_version": 1,
               "teacher_reference": None, "sampler": result["sampler"] if sampler is None else None}
        same = all(prev.get(k, was.get(k)) == result[k]
                   for k in ("prompts", "num_frames", "kind", "context_frames", "guidance_scale", "toybench_version",
                             "teacher_reference", "sampler"))
        if same:
            result["results"] = {k: v for k, v in prev.get("results", {}).items() if (out_dir / f"samples_{k}.npy").exists()}
    for s in steps:
        s = int(s)
        if str(s) in result["results"]:
            continue
        t0 = time.time()
        videos = _generate_all(model, prompts, s, num_frames, batch_size, context, guidance_scale)
        gen_s = time.time() - t0
        sc = score_videos(videos, texts, world)
        row = {"steps": s, "nfe": int(nfe(model, s))}
        row.update({k: v for k, v in sc.items() if k != "per_clip"})
        if teacher_feats is not None:
            row["frechet_teacher"] = _frechet_between(clip_features(videos, world), teacher_feats)
        row["per_clip_total"] = sc["per_clip"]["total"]
        row["per_clip"] = sc["per_clip"]
        row["seconds"] = round(gen_s, 2)
        result["results"][str(s)] = row
        save_sample_grid(
            videos[:n_show], texts[:n_show], out_dir / f"samples_{s}.png", title=f"{model.kind}, {s} steps (NFE {row['nfe']})"
        )
        atomic_write(out_dir / f"samples_{s}.npy", lambda f, v=videos[:n_show]: np.save(f, v.astype(np.float16)))
        _atomic_write_json(out_dir / "toybench.json", result)
        print(
            f"[toybench] steps={s:<3d} nfe={row['nfe']:<3d} Quality={row['Quality']:5.1f} "
            f"Semantic={row['Semantic']:5.1f} Total={row['Total']:5.1f} FD={row['frechet']:.3g} "
            + (f"FD-teacher={row['frechet_teacher']:.3g} " if teacher_feats is not None else "")
            + f"(gen {gen_s:.1f}s)",
            flush=True,
        )
    plot_toybench(result, out_dir / "toybench.png")
    return result
