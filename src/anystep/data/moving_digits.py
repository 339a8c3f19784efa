"""MovingDigits: the toy world (docs/design.md section 4).

One coloured handwritten digit (scikit-learn's bundled 8x8 UCI digits, upscaled) moves in a
straight line on a black canvas. Each clip comes with the prompt
``"a {color} {digit} moving {direction}"``. Everything is a pure function of (split, index, seed),
so a clip can be regenerated anywhere - on another rank, after a resume, in a test.

Pixel convention: float32 in [-1, 1] (black = -1), layout (F, C, H, W).
"Up" moves toward the top of the frame, i.e. toward row 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from anystep.config import ConfigError

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
# Colours outside the training world, for downstream fine-tuning on a shifted domain.
EXTRA_COLORS: dict[str, tuple[float, float, float]] = {
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
ALL_COLORS = {**COLORS, **EXTRA_COLORS}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# (d_row, d_col) unit steps; rows grow downwards, so "up" is -1 in rows.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
EXTRA_DIRECTIONS: dict[str, tuple[int, int]] = {
    "up-left": (-1, -1),
    "up-right": (-1, 1),
    "down-left": (1, -1),
    "down-right": (1, 1),
}
ALL_DIRECTIONS = {**DIRECTIONS, **EXTRA_DIRECTIONS}
PROMPT_WORDS = ["a", "moving"]

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2


def make_prompt(color: str, digit: int, direction: str) -> str:
    return f"a {color} {DIGIT_WORDS[digit]} moving {direction}"


def parse_prompt(prompt: str) -> tuple[str, int, str]:
    """Inverse of :func:`make_prompt`; raises ``ValueError`` on anything else."""
    words = prompt.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a MovingDigits prompt: {prompt!r}")
    color, digit_word, direction = words[1], words[2], words[4]
    if color not in ALL_COLORS or digit_word not in DIGIT_WORDS or direction not in ALL_DIRECTIONS:
        raise ValueError(f"not a MovingDigits prompt: {prompt!r}")
    return color, DIGIT_WORDS.index(digit_word), direction


def opposite_direction(direction: str) -> str:
    """The direction pointing the other way along the same axis ("left" -> "right", "up-left" -> "down-right")."""
    dr, dc = ALL_DIRECTIONS[direction]
    return next(k for k, v in ALL_DIRECTIONS.items() if v == (-dr, -dc))


def vocabulary() -> list[str]:
    """Every word a MovingDigits prompt can contain (the toy tokenizer's word list)."""
    return PROMPT_WORDS + list(ALL_COLORS) + DIGIT_WORDS + list(ALL_DIRECTIONS)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def split_indices(split: str) -> np.ndarray:
    """Image indices of a split. Fixed permutation (seed 0), 20% held out, disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = len(_digits()[1])
    perm = np.random.default_rng(0).permutation(n)
    n_held = int(round(n * HELDOUT_FRACTION))
    return np.sort(perm[:n_held] if split == "heldout" else perm[n_held:])


def digit_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0,1] of shape (N, 8, 8), labels (N,)) of a split."""
    images, labels = _digits()
    idx = split_indices(split)
    return images[idx], labels[idx]


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of the toy world. ``travel`` pixels are covered over the whole clip, whatever its length."""

    canvas: int = 32
    digit_scale: int = 2  # 8x8 digits become 16x16
    num_frames: int = 7
    travel: int = 12
    colors: tuple[str, ...] = tuple(COLORS)
    directions: tuple[str, ...] = tuple(DIRECTIONS)

    @property
    def digit_size(self) -> int:
        return 8 * self.digit_scale

    def validate(self) -> None:
        if self.num_frames < 2:
            raise ConfigError(f"num_frames must be >= 2 for the moving-digits world, got {self.num_frames}")
        if self.digit_size + self.travel > self.canvas:
            raise ValueError(
                f"a {self.digit_size}px digit travelling {self.travel}px does not fit a {self.canvas}px canvas"
            )
        for c in self.colors:
            if c not in ALL_COLORS:
                raise ValueError(f"unknown colour {c!r}")
        for d in self.directions:
            if d not in ALL_DIRECTIONS:
                raise ValueError(f"unknown direction {d!r}")


@dataclass
class Clip:
    video: np.ndarray  # (F, 3, H, W) float32 in [-1, 1]
    prompt: str
    digit: int
    color: str
    direction: str
    image_index: int
    positions: np.ndarray = field(repr=False)  # (F, 2) top-left (row, col) of the digit per frame


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(img, np.ones((scale, scale), dtype=img.dtype))


def render_clip(
    image: np.ndarray,
    color: str,
    direction: str,
    cross_offset: int,
    world: WorldConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one clip. ``cross_offset`` places the digit across the direction of motion.

    The start point is chosen so that the whole path stays inside the canvas; positions advance by
    ``travel / (F - 1)`` pixels a frame and are rounded to whole pixels.
    """
    size, free = world.digit_size, world.canvas - world.digit_size
    dr, dc = ALL_DIRECTIONS[direction]
    sprite = _upscale(image, world.digit_scale)[None] * np.asarray(ALL_COLORS[color], np.float32)[:, None, None]
    frames = np.zeros((world.num_frames, 3, world.canvas, world.canvas), np.float32)
    positions = np.zeros((world.num_frames, 2), np.int64)
    # Along each moving axis start where the whole travel fits, centred in the free range.
    margin = (free - world.travel) // 2

    def start(d: int) -> int:
        if d > 0:
            return margin
        if d < 0:
            return margin + world.travel
        return cross_offset

    r0, c0 = start(dr), start(dc)
    for f in range(world.num_frames):
        step = int(round(world.travel * f / (world.num_frames - 1)))
        r, c = r0 + dr * step, c0 + dc * step
        positions[f] = (r, c)
        frames[f, :, r : r + size, c : c + size] = sprite
    return frames * 2.0 - 1.0, positions


class MovingDigits:
    """Deterministic clip generator: ``ds[i]`` is the same clip on every call, rank and machine."""

    def __init__(self, split: str = "train", world: WorldConfig | None = None, seed: int = 0):
        self.world = world or WorldConfig()
        self.world.validate()
        self.split = split
        self.seed = seed
        self.images, self.labels = digit_images(split)

    def __len__(self) -> int:
        # Not a real bound: every index gives a fresh clip. A nominal epoch covers every image once
        # per colour and direction.
        return len(self.images) * len(self.world.colors) * len(self.world.directions)

    def sample_spec(self, index: int) -> tuple[int, str, str, int]:
        rng = np.random.default_rng([self.seed, index, 0 if self.split == "train" else 1])
        img = int(rng.integers(len(self.images)))
        color = self.world.colors[int(rng.integers(len(self.world.colors)))]
        direction = self.world.directions[int(rng.integers(len(self.world.directions)))]
        cross = int(rng.integers(0, self.world.canvas - self.world.digit_size + 1))
        return img, color, direction, cross

    def __getitem__(self, index: int) -> Clip:
        img, color, direction, cross = self.sample_spec(index)
        return self.render(img, color, direction, cross)

    def render(self, img: int, color: str, direction: str, cross: int | None = None) -> Clip:
        if cross is None:
            cross = (self.world.canvas - self.world.digit_size) // 2
        video, pos = render_clip(self.images[img], color, direction, cross, self.world)
        digit = int(self.labels[img])
        return Clip(video, make_prompt(color, digit, direction), digit, color, direction, img, pos)

    def clip_for(self, color: str, digit: int, direction: str, seed: int) -> Clip:
        """A clip matching a prompt: a random image of that digit, placed at random (seeded)."""
        rng = np.random.default_rng([self.seed, seed, 7])
        candidates = np.flatnonzero(self.labels == digit)
        img = int(candidates[rng.integers(len(candidates))])
        cross = int(rng.integers(0, self.world.canvas - self.world.digit_size + 1))
        return self.render(img, color, direction, cross)

    def batch(self, indices) -> tuple[np.ndarray, list[str]]:
        clips = [self[int(i)] for i in indices]
        return np.stack([c.video for c in clips]), [c.prompt for c in clips]
