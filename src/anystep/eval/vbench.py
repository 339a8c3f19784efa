"""VBench for real checkpoints: generate the prompt set the way VBench expects, score when possible.

VBench's standard protocol samples every prompt with 5 seeds and names the videos
``{prompt}-{i}.mp4`` (``i`` = 0..4) after the *original* prompt, while the text fed to the model
may be the augmented (longer) version of that prompt. Scoring runs VBench's 16 dimensions and
aggregates them like its leaderboard: each dimension min-max normalised with VBench's published
constants, dimension weights (dynamic degree 0.5, the rest 1), Quality = weighted mean of the 7
quality dimensions, Semantic = weighted mean of the 9 semantic ones, Total = (4 Quality +
Semantic) / 5.

VBench itself is an optional extra: its pins conflict with diffusers' hub client, so it lives in
its own environment. Without it, the videos are generated and one line says how to score them.
"""

from __future__ import annotations

from anystep.errors import UserError

import json
from pathlib import Path
from anystep.io import write_mp4
from anystep.sampling import generate

# (min, max) used by VBench's final-score script to normalise each dimension to [0, 1].
NORMALIZE = {
    "subject consistency": (0.1462, 1.0),
    "background consistency": (0.2615, 1.0),
    "temporal flickering": (0.6293, 1.0),
    "motion smoothness": (0.706, 0.9975),
    "dynamic degree": (0.0, 1.0),
    "aesthetic quality": (0.0, 1.0),
    "imaging quality": (0.0, 1.0),
    "object class": (0.0, 1.0),
    "multiple objects": (0.0, 1.0),
    "human action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance style": (0.0009, 0.2855),
    "temporal style": (0.0, 0.364),
    "overall consistency": (0.0, 0.364),
}
QUALITY_DIMS = ("subject consistency", "background consistency", "temporal flickering", "motion smoothness",
                "aesthetic quality", "imaging quality", "dynamic degree")
SEMANTIC_DIMS = ("object class", "multiple objects", "human action", "color", "spatial relationship", "scene",
                 "appearance style", "temporal style", "overall consistency")
WEIGHTS = {d: (0.5 if d == "dynamic degree" else 1.0) for d in NORMALIZE}
SEEDS_PER_PROMPT = 5


class VBenchInputError(UserError, ValueError):
    """A prompt file that cannot be used (reported in one line)."""


def aggregate(raw: dict[str, float]) -> dict[str, float]:
    """VBench's Quality / Semantic / Total (0-100) from raw per-dimension scores (0-1).

    Every one of the 16 dimensions must be present: a partial aggregate would not be comparable."""
    missing = [d for d in NORMALIZE if d not in raw]
    if missing:
        raise ValueError(f"missing VBench dimensions: {', '.join(missing)}")
    norm = {d: (float(raw[d]) - lo) / (hi - lo) for d, (lo, hi) in NORMALIZE.items()}

    def wmean(dims):
        return sum(WEIGHTS[d] * norm[d] for d in dims) / sum(WEIGHTS[d] for d in dims)

    q, s = wmean(QUALITY_DIMS), wmean(SEMANTIC_DIMS)
    return {"Quality": 100 * q, "Semantic": 100 * s, "Total": 100 * (4 * q + s) / 5, "normalized": norm}


def read_prompt_pairs(prompts_file, augmented_file=None) -> list[tuple[str, str]]:
    """(name prompt, generation prompt) pairs; without an augmented file both are the same."""

    def lines(path):
        path = Path(path)
        if not path.is_file():
            raise VBenchInputError(f"prompt file not found: {path}")
        out = [line.strip() for line in path.read_text().splitlines()]
        while out and not out[-1]:
            out.pop()
        if not out:
            raise VBenchInputError(f"prompt file is empty: {path}")
        if "" in out:
            raise VBenchInputError(f"prompt file {path} has an empty line at line {out.index('') + 1}")
        return out

    names = lines(prompts_file)
    texts = lines(augmented_file) if augmented_file else names
    if len(texts) != len(names):
        raise VBenchInputError(f"{augmented_file} has {len(texts)} prompts, {prompts_file} has {len(names)}")
    bad = [n for n in names if "/" in n or n in (".", "..")]
    if bad:
        raise VBenchInputError(f"prompt {bad[0]!r} cannot be a VBench file name (it contains '/')")
    return list(zip(names, texts))


def video_name(prompt: str, index: int) -> str:
    return f"{prompt}-{index}.mp4"


def generate_vbench_videos(model, pairs, steps: int, out_dir, num_frames=None, height=32, width=32,
                           fps: int = 16, seeds: int = SEEDS_PER_PROMPT, progress=print) -> list[Path]:
    """Every prompt x ``seeds`` seeds (seed = i), named as VBench expects; existing videos are kept
    (a killed run resumes). Returns the video paths in prompt order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (name, text) in enumerate(pairs):
        todo = [i for i in range(seeds) if not (out_dir / video_name(name, i)).exists()]
        for i in todo:
            kw = {"num_frames": num_frames} if num_frames else {}
            video = generate(model, [text], steps, seed=i, height=height, width=width, **kw)[0]
            write_mp4(video, out_dir / video_name(name, i), fps=fps, scale=1)
        paths += [out_dir / video_name(name, i) for i in range(seeds)]
        progress(f"[vbench] {k + 1}/{len(pairs)} prompts ({len(todo)} new videos)")
    return paths


def vbench_available() -> bool:
    try:
        import vbench  # noqa: F401
    except Exception:
        return False
    return True


def score_with_vbench(videos_dir, out_dir) -> dict:  # pragma: no cover - needs the VBench stack and a GPU
    """Run VBench's 16 dimensions on ``videos_dir`` (custom-prompt mode: prompts from file names)."""
    import torch
    from vbench import VBench

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = VBench(device, None, str(out_dir))
    dims = [d.replace(" ", "_") for d in NORMALIZE]
    bench.evaluate(videos_path=str(videos_dir), name="anystep", dimension_list=dims, mode="custom_input")
    raw_file = out_dir / "anystep_eval_results.json"
    raw = json.loads(raw_file.read_text())
    scores = {d.replace("_", " "): (v[0] if isinstance(v, (list, tuple)) else v) for d, v in raw.items()}
    return {"raw": scores, **aggregate(scores)}
