"""Per-clip analysis of a MovingDigits clip: what ToyBench's sub-scores are computed from
(:mod:`anystep.eval.toybench` defines each score and the aggregates).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from anystep.data.moving_digits import ALL_COLORS, ALL_DIRECTIONS, MovingDigits, WorldConfig, parse_prompt
from anystep.eval.classifier import brightness, crop_features, crops, get_classifier, window_sums


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


# --- per-clip analysis ---------------------------------------------------------------------------


def as_numpy(videos) -> np.ndarray:
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
    video = as_numpy(video)
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


