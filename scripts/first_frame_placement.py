"""Where does a model put the digit in the first frame of a clip?

In MovingDigits the first frame fixes the clip: along the motion axis the digit starts at one of two
positions (centroid 9.5 or 21.5 px, by direction), and across it the whole digit is on the canvas.
A causal (FAR) student makes frame 0 as a one-frame chunk; this script measures how well each
model places it (README, "Causal: ... the loss is the first frame").

For each model, over the ToyBench prompts, the share of clips whose frame-0 centroid (ToyBench's
digit locator) lies within 3 px of a start position, within 3 px of the canvas middle, and off the
canvas across the motion axis (centre outside [6, 26)).

Usage: python scripts/first_frame_placement.py MODEL[:FRAMES[:STEPS]] ... [--n 40]
e.g.   python scripts/first_frame_placement.py models/toy-teacher:13:16 models/toy-teacher:1:16 DIR/causal/anyflow/model:13:4
"""

from __future__ import annotations

import argparse

import numpy as np

from anystep.data.moving_digits import DIRECTIONS, WorldConfig, parse_prompt
from anystep.eval.clip_analysis import analyse_clip
from anystep.eval.toybench import real_clips_for, toybench_prompts
from anystep.sampling import generate, load_model

STARTS = (9.5, 21.5)  # frame-0 centroid along the motion axis of the two possible starts
MIDDLE = 15.5


def placement(videos: np.ndarray, prompts: list[str]) -> dict[str, float]:
    along, across = [], []
    for clip, p in zip(videos, prompts):
        dr, _ = DIRECTIONS[parse_prompt(p)[2]]
        axis = 0 if dr else 1
        c0 = analyse_clip(clip, WorldConfig(num_frames=clip.shape[0]))["centroid"][0]
        along.append(c0[axis])
        across.append(c0[1 - axis])
    along, across = np.asarray(along), np.asarray(across)
    near_start = np.min(np.abs(along[:, None] - np.asarray(STARTS)[None]), axis=1) <= 3
    return {
        "at_start_pct": 100.0 * float(near_start.mean()),
        "middle_pct": 100.0 * float((np.abs(along - MIDDLE) < 3).mean()),
        "off_canvas_pct": 100.0 * float(((across < 6) | (across > 25)).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="FOLDER[:FRAMES[:STEPS]] (defaults: 13 frames, 4 steps)")
    ap.add_argument("--n", type=int, default=40)
    a = ap.parse_args()
    world = WorldConfig(num_frames=13)
    prompts = toybench_prompts(a.n, world)
    texts = [p for p, _ in prompts]
    r = placement(real_clips_for(prompts, world), texts)
    print(f"{'real clips':60s} start {r['at_start_pct']:5.1f}%  middle {r['middle_pct']:5.1f}%  off-canvas {r['off_canvas_pct']:5.1f}%")
    for spec in a.models:
        folder, *rest = spec.split(":")
        frames = int(rest[0]) if rest else 13
        steps = int(rest[1]) if len(rest) > 1 else 4
        model = load_model(folder)
        videos = generate(model, texts, steps, seed=prompts[0][1], num_frames=frames).float().numpy()
        r = placement(videos, texts)
        name = f"{folder} ({frames} frames, {steps} steps)"
        print(f"{name:60s} start {r['at_start_pct']:5.1f}%  middle {r['middle_pct']:5.1f}%  off-canvas {r['off_canvas_pct']:5.1f}%")


if __name__ == "__main__":
    main()
