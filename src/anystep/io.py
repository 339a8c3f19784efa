"""Writing clips: mp4 and PNG frame grids, atomically (a temp file renamed into place)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def to_uint8(video) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] (tensor or array) -> (F, H, W, 3) uint8."""
    v = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    v = ((np.clip(v, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return v.transpose(0, 2, 3, 1)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    if scale <= 1:
        return frames
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary name beside ``path``, then rename (writers such as ffmpeg
    want a path, not a file object)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_mp4(video, path, fps: int = 4, scale: int = 4) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    frames = upscale(to_uint8(video), scale)

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=9, macro_block_size=1) as w:
            for f in frames:
                w.append_data(f)

    _atomic_write(path, write)
    return path


def frame_grid(videos, scale: int = 2, gap: int = 2) -> np.ndarray:
    """Rows = clips, columns = frames, separated by a grey gap. Returns (H, W, 3) uint8."""
    rows = [upscale(to_uint8(v), scale) for v in videos]
    f, h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + gap) - gap, f * (w + gap) - gap, 3), 96, np.uint8)
    for i, r in enumerate(rows):
        for j in range(f):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = r[j]
    return grid


def write_png(image: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    _atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    return path
