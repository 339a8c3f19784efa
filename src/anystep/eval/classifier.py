"""ToyBench's digit reader: locate the digit in a frame, crop it, classify it.

The pieces every ToyBench metric shares:

* :func:`brightness` - a frame's per-pixel brightness in [0, 1] (the max over RGB after mapping
  [-1, 1] to [0, 1]). Every MovingDigits colour has a channel at full strength, so for a real clip
  the brightness is exactly the (upscaled) sklearn digit intensity, whatever the colour.
* :func:`locate` - where the digit is: the ``digit_size`` x ``digit_size`` window holding the most
  brightness, re-centred on the brightness centroid inside it. Looking for the heaviest window
  (rather than the centroid of the whole frame) keeps a haze or noise background from pulling the
  estimate to the canvas centre.
* :func:`crop_features` - the window's crop, 2x2 average-pooled back to the sklearn 8x8 grid, so it
  reads like the classifier's training images.
* :class:`DigitClassifier` - a small MLP fitted on the sklearn digits *train* split only, on crops
  produced by the very same locate/crop code from rendered training frames (random placements,
  random intensity, light noise), so train and test go through an identical path. Its hidden layer
  is ToyBench's feature space for the Frechet distance.

Everything is deterministic (fixed seeds) and the fitted classifier is cached per process.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from anystep.data.moving_digits import WorldConfig, digit_images

# Fitting recipe. Changing any of these changes every ToyBench number: bump CLASSIFIER_VERSION.
CLASSIFIER_VERSION = 1
_HIDDEN = 64
_PLACEMENTS_PER_IMAGE = 4
_SEED = 0


def brightness(frames: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) pixels in [-1, 1] -> (..., H, W) brightness in [0, 1] (max over RGB)."""
    x = (np.asarray(frames, dtype=np.float32) + 1.0) * 0.5
    return np.clip(x, 0.0, 1.0).max(axis=-3)


def window_sums(b: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) -> (N, H-size+1, W-size+1): brightness summed over every size x size window."""
    n, h, w = b.shape
    c = np.zeros((n, h + 1, w + 1), np.float64)
    c[:, 1:, 1:] = b.cumsum(1).cumsum(2)
    return c[:, size:, size:] - c[:, :-size, size:] - c[:, size:, :-size] + c[:, :-size, :-size]


@dataclass
class Located:
    """Per-frame location of the subject, for N frames."""

    top_left: np.ndarray  # (N, 2) int row/col of the digit-sized window
    centroid: np.ndarray  # (N, 2) float brightness centroid inside that window (row, col)
    window_mass: np.ndarray  # (N,) brightness inside the window
    frame_mass: np.ndarray  # (N,) brightness in the whole frame


def locate(b: np.ndarray, size: int) -> Located:
    """Find the digit in each of N brightness frames (N, H, W).

    1. the heaviest ``size`` x ``size`` window (first one on ties);
    2. the brightness centroid inside it;
    3. the window re-centred on that centroid (clipped to the canvas), and the centroid recomputed
       inside the new window.

    For a clean real frame the first window already holds the whole digit, so the centroid is the
    digit's true centroid and the final window sits at the same offset from the digit in every
    frame: crops of a moving real digit are pixel-identical.
    """
    b = np.asarray(b, np.float64)
    n, h, w = b.shape
    ws = window_sums(b, size)
    flat = ws.reshape(n, -1).argmax(1)
    r0, c0 = np.divmod(flat, ws.shape[2])
    rows = np.arange(h, dtype=np.float64)
    cols = np.arange(w, dtype=np.float64)

    def centroid_in(r, c):
        cen = np.empty((n, 2))
        mass = np.empty(n)
        for i in range(n):
            win = b[i, r[i] : r[i] + size, c[i] : c[i] + size]
            m = win.sum()
            mass[i] = m
            if m <= 1e-8:
                cen[i] = (r[i] + (size - 1) / 2, c[i] + (size - 1) / 2)
            else:
                cen[i, 0] = (win.sum(1) * rows[r[i] : r[i] + size]).sum() / m
                cen[i, 1] = (win.sum(0) * cols[c[i] : c[i] + size]).sum() / m
        return cen, mass

    cen, _ = centroid_in(r0, c0)
    r1 = np.clip(np.floor(cen[:, 0] - (size - 1) / 2 + 0.5).astype(int), 0, h - size)
    c1 = np.clip(np.floor(cen[:, 1] - (size - 1) / 2 + 0.5).astype(int), 0, w - size)
    cen, mass = centroid_in(r1, c1)
    return Located(np.stack([r1, c1], 1), cen, mass, b.reshape(n, -1).sum(1))


def crops(b: np.ndarray, loc: Located, size: int) -> np.ndarray:
    """(N, size, size) brightness crops at the located windows."""
    return np.stack([b[i, r : r + size, c : c + size] for i, (r, c) in enumerate(loc.top_left)])


def pool_to_8x8(crop: np.ndarray) -> np.ndarray:
    """(N, s, s) crops -> (N, 64) average-pooled to the 8x8 sklearn grid, values in [0, 1]."""
    n, s, _ = crop.shape
    k = s // 8
    return crop[:, : 8 * k, : 8 * k].reshape(n, 8, k, 8, k).mean(axis=(2, 4)).reshape(n, 64)


def crop_features(b: np.ndarray, size: int) -> tuple[np.ndarray, Located]:
    """Brightness frames (N, H, W) -> (classifier inputs (N, 64), their locations)."""
    loc = locate(b, size)
    return pool_to_8x8(crops(b, loc, size)), loc


def _training_set(world: WorldConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Classifier inputs made from the *train* split, through the same locate/crop path.

    Each training image is placed ``_PLACEMENTS_PER_IMAGE`` times at a random canvas position with a
    random intensity in [0.6, 1]; half the copies get a little Gaussian noise / haze, so that a soft
    or slightly dirty generated frame is not out of distribution.
    """
    images, labels = digit_images("train")
    rng = np.random.default_rng(seed)
    size, canvas = world.digit_size, world.canvas
    n = len(images) * _PLACEMENTS_PER_IMAGE
    frames = np.zeros((n, canvas, canvas), np.float32)
    y = np.repeat(labels, _PLACEMENTS_PER_IMAGE)
    sprites = np.kron(images, np.ones((world.digit_scale, world.digit_scale), np.float32))
    for i in range(n):
        r, c = rng.integers(0, canvas - size + 1, size=2)
        frames[i, r : r + size, c : c + size] = sprites[i // _PLACEMENTS_PER_IMAGE] * rng.uniform(0.6, 1.0)
    noisy = rng.random(n) < 0.5
    noise = rng.normal(0.0, 0.05, size=frames.shape).astype(np.float32) + rng.uniform(0, 0.05, size=(n, 1, 1))
    frames = np.where(noisy[:, None, None], np.clip(frames + noise, 0, 1), frames)
    x, _ = crop_features(frames, size)
    return x.astype(np.float32), y


class DigitClassifier:
    """sklearn MLP (64 -> ``_HIDDEN`` ReLU -> 10) on pooled 8x8 digit crops.

    :meth:`features` is the hidden layer (the penultimate representation), used as ToyBench's
    Frechet feature space; :meth:`predict_proba` gives class probabilities for digit accuracy.
    """

    def __init__(self, world: WorldConfig, seed: int = _SEED):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits

        self.size = world.digit_size
        x, y = _training_set(world, seed)
        self.mlp = MLPClassifier(
            hidden_layer_sizes=(_HIDDEN,),
            alpha=1e-2,
            batch_size=128,
            learning_rate_init=3e-3,
            max_iter=40,  # a fixed budget (~1 s): the fit is part of every ToyBench run
            random_state=seed,
        )
        # One BLAS thread: deterministic, and far faster than fighting a training job for 2 cores.
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.mlp.fit(x, y)

    def features(self, x: np.ndarray) -> np.ndarray:
        """(N, 64) pooled crops -> (N, hidden) ReLU activations."""
        w, b = self.mlp.coefs_[0], self.mlp.intercepts_[0]
        return np.maximum(np.asarray(x, np.float64) @ w + b, 0.0)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.mlp.predict_proba(np.asarray(x, np.float64))


def _classifier_key(world: WorldConfig) -> tuple[int, int]:
    return world.canvas, world.digit_scale


@functools.lru_cache(maxsize=4)
def _cached(canvas: int, digit_scale: int) -> DigitClassifier:
    return DigitClassifier(WorldConfig(canvas=canvas, digit_scale=digit_scale))


def get_classifier(world: WorldConfig | None = None) -> DigitClassifier:
    """The process-wide classifier for a world's geometry (only canvas and digit scale matter)."""
    return _cached(*_classifier_key(world or WorldConfig()))
