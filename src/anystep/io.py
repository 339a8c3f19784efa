"""Writing clips: mp4 and PNG frame grids, atomically (a checked temp file renamed into place)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from anystep.errors import UserError
from anystep.fsutil import atomic_files


def to_uint8(video) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] (tensor or array) -> (F, H, W, 3) uint8."""
    v = video.detach().cpu().float().numpy() if hasattr(video, "detach") else np.asarray(video, np.float32)
    v = ((np.clip(v, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    return v.transpose(0, 2, 3, 1)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    if scale <= 1:
        return frames
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


class VideoWriteError(UserError):
    """ffmpeg failed or wrote a clip that does not read back (the destination is left untouched)."""


def _ffmpeg_encode(frames: np.ndarray, tmp: str, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 frames with libx264 (imageio's quality 9 = CRF 5) and check
    ffmpeg's exit status: imageio ignores it, and a full disk then ends in a truncated file."""
    import subprocess

    import imageio_ffmpeg

    f, h, w, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-vcodec", "rawvideo",
           "-s", f"{w}x{h}", "-pix_fmt", "rgb24", "-r", str(int(fps)), "-i", "-", "-an", "-vcodec", "libx264",
           "-pix_fmt", "yuv420p", "-crf", "5", "-f", "mp4", tmp]
    # Its own process group: a Ctrl-C in the terminal reaches us, and we stop ffmpeg ourselves.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(np.ascontiguousarray(frames).tobytes())
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip().splitlines()
        _raise_if_disk_full(tmp, text)
        raise VideoWriteError(f"ffmpeg could not write {tmp} ({text[-1] if text else proc.returncode})")


def _raise_if_disk_full(tmp: str, ffmpeg_lines) -> None:
    import errno
    import shutil

    joined = " ".join(ffmpeg_lines).lower()
    if "no space" in joined or shutil.disk_usage(Path(tmp).parent).free < 64 * 1024:
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(tmp).parent))


def _check_mp4(tmp: str, n_frames: int) -> None:
    import imageio_ffmpeg

    try:
        got, _ = imageio_ffmpeg.count_frames_and_secs(tmp)
    except (RuntimeError, OSError) as e:
        _raise_if_disk_full(tmp, [str(e)])
        raise VideoWriteError(f"the clip written to {tmp} does not read back ({str(e).splitlines()[0]})") from None
    if got != n_frames:
        _raise_if_disk_full(tmp, [])
        raise VideoWriteError(f"the clip written to {tmp} has {got} frames, not {n_frames}")


def mp4_item(video, path, fps: int = 4, scale: int = 4):
    """(path, write, check) for :func:`anystep.fsutil.atomic_files`: an H.264 mp4, checked for
    ffmpeg's success and for every frame reading back."""
    if int(fps) < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    frames = upscale(to_uint8(video), scale)
    return Path(path), lambda tmp: _ffmpeg_encode(frames, tmp, fps), lambda tmp: _check_mp4(tmp, len(frames))


def png_item(image: np.ndarray, path):
    from PIL import Image

    return Path(path), lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), None


def write_mp4(video, path, fps: int = 4, scale: int = 4) -> Path:
    """Write an mp4 beside ``path``, check it, then rename it into place: on any failure the
    previous ``path`` is untouched."""
    return atomic_files([mp4_item(video, path, fps, scale)])[0]


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name part from a prompt: lower case, each run of characters other than a-z and 0-9
    one '-' (portable on every file system), at most ``limit`` characters; '' for none left."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-")


def clip_name(index: int, prompt: str) -> str:
    """``0003-a-red-three-moving-left.mp4``: the index keeps the prompt file's order and tells
    repeated prompts apart; the slug says which prompt the clip shows."""
    s = slug(prompt)
    return f"{index:04d}-{s}.mp4" if s else f"{index:04d}.mp4"


def frame_grid(videos, scale: int = 2, gap: int = 2, labels: list[str] | None = None) -> np.ndarray:
    """Rows = clips, columns = frames, separated by a grey gap; with ``labels`` (the prompts), each
    row's label is written in a dark band above it. Returns (H, W, 3) uint8."""
    rows = [upscale(to_uint8(v), scale) for v in videos]
    f, h, w, _ = rows[0].shape
    band = _label_band_height() if labels is not None else 0
    pitch = band + h + gap
    grid = np.full((len(rows) * pitch - gap, f * (w + gap) - gap, 3), 96, np.uint8)
    for i, r in enumerate(rows):
        top = i * pitch + band
        grid[top - band : top] = 32
        for j in range(f):
            grid[top : top + h, j * (w + gap) : j * (w + gap) + w] = r[j]
    if labels is not None:
        grid = _write_labels(grid, labels, pitch)
    return grid


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()  # Pillow's own font: no font file or matplotlib needed


def _label_band_height() -> int:
    return _font().getbbox("Ag")[3] + 4


def _write_labels(grid: np.ndarray, labels: list[str], pitch: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    image, font = Image.fromarray(grid), _font()
    draw = ImageDraw.Draw(image)
    room = grid.shape[1] - 4
    for i, text in enumerate(labels):
        # A prompt wider than the row is cut with "...": the full text is in prompts.txt.
        if draw.textlength(text, font=font) > room:
            while text and draw.textlength(text + "...", font=font) > room:
                text = text[:-1]
            text += "..."
        draw.text((2, i * pitch + 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def write_png(image: np.ndarray, path) -> Path:
    return atomic_files([png_item(image, path)])[0]
