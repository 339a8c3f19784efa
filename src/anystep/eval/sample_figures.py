"""``anystep reproduce``'s sample figures: ``samples.png`` (per architecture, every method at 1, 4,
16 and 32 steps on the first prompt) and ``samples_<arch>_<method>.mp4`` grids, from the
``samples_<steps>.npy`` clips each ToyBench evaluation keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from anystep.io import frame_grid, to_uint8, write_mp4

SAMPLE_STEPS = (1, 4, 16, 32)


def samples_figure(results: dict, out: Path) -> None:
    """samples.png: per architecture, every method at 1/4/16/32 steps on the same two prompts;
    plus ``samples_<arch>_<method>.mp4`` (rows: step counts, columns: four prompts)."""
    panels = []
    for arch, a in results["architectures"].items():
        for method, m in a["methods"].items():
            ev = Path(m["eval_dir"])
            clips = {}
            for s in SAMPLE_STEPS:
                p = ev / f"samples_{s}.npy"
                if p.exists():
                    clips[s] = np.load(p).astype(np.float32)
            if not clips:
                continue
            panels.append((f"{arch}: {m['label']}", clips))
            # mp4: each video frame is a grid (rows = step counts, columns = prompts).
            steps = sorted(clips)
            nf = min(c.shape[1] for c in clips.values())
            frames = []
            for f in range(nf):
                tiles = [np.concatenate([to_uint8(clips[s][i, f : f + 1])[0] for i in range(len(clips[s]))], axis=1) for s in steps]
                frames.append(np.concatenate(tiles, axis=0))
            video = np.stack(frames).astype(np.float32) / 127.5 - 1.0
            write_mp4(video.transpose(0, 3, 1, 2), out / f"samples_{arch}_{method}.mp4", scale=4)
    if not panels:
        return
    _panel_figure(panels, out / "samples.png")


def _panel_figure(panels, path) -> None:
    """One image per architecture: rows = methods, columns = step counts, each cell the first
    prompt's clip as a strip of frames."""

    by_arch: dict = {}
    for title, clips in panels:
        arch, label = title.split(": ", 1)
        by_arch.setdefault(arch, []).append((label, clips))
    images = []
    for arch, rows in by_arch.items():
        cells = []
        for label, clips in rows:
            strips = [frame_grid(clips[s][:1], scale=1, gap=1) if s in clips else None for s in SAMPLE_STEPS]
            shape = next(x.shape for x in strips if x is not None)
            strips = [x if x is not None else np.full(shape, 255, np.uint8) for x in strips]
            sep = np.full((shape[0], 4, 3), 255, np.uint8)
            cells.append(np.concatenate([c for x in strips for c in (x, sep)][:-1], axis=1))
        h = cells[0].shape[0]
        img = np.concatenate([np.pad(c, ((0, 3), (0, 0), (0, 0)), constant_values=255) for c in cells], axis=0)
        images.append((arch, [label for label, _ in rows], img, h + 3, cells[0].shape[1]))
    width = max(i[2].shape[1] for i in images)
    height = sum(i[2].shape[0] for i in images)
    fig = Figure(figsize=(2.5 + width / 80, 0.6 * len(images) + height / 80), dpi=110)
    FigureCanvasAgg(fig)
    for k, (arch, labels, img, row_h, w) in enumerate(images):
        ax = fig.add_subplot(len(images), 1, k + 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_yticks([(j + 0.5) * row_h for j in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=7)
        col = (w + 4) / len(SAMPLE_STEPS)
        ax.set_xticks([(j + 0.5) * col for j in range(len(SAMPLE_STEPS))])
        ax.set_xticklabels([f"{s} step{'s' if s > 1 else ''}" for s in SAMPLE_STEPS], fontsize=8)
        ax.set_title(f"{arch}: first prompt, frames left to right", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))
