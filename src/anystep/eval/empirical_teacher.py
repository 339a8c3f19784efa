"""The exact empirical flow (``anystep.flow.empirical``) as ToyBench and ``anystep reproduce`` see a
model, and its ToyBench at several step counts:

    python -m anystep.eval.empirical_teacher --steps 1,2,4,16,50 --n-prompts 40
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import torch

from anystep.data.moving_digits import WorldConfig
from anystep.eval.toybench import score_videos, toybench_prompts
from anystep.flow.empirical import EmpiricalFlow
from anystep.models.loaded import load_model
from anystep.report import bootstrap_ci
from anystep.sampling import DEFAULT_TEACHER_GUIDANCE, initial_noise, latents_to_video


class EmpiricalFlowModel:
    """The empirical flow as ToyBench and ``anystep reproduce`` see a model: sampled like a teacher
    (Euler + CFG on the shifted grid, 2 NFE a step), from the noise a folder's model draws for the
    same seed, decoded by that folder's codec. One clip set per frame count, built when first used."""

    kind = "empirical_flow"
    sampler = "euler_cfg"

    def __init__(self, folder, clips_per_prompt: int = 64, seed: int = 0):
        self.folder, self.k, self.seed = str(folder), int(clips_per_prompt), int(seed)
        self.model = load_model(folder)
        self.codec = self.model.codec
        # Named by what defines it (K, seed, the codec's settings), not by the folder's path: the same
        # codec under another folder name is the same real score, so ToyBench reuses its scores.
        settings = {k: v for k, v in dict(self.codec.config).items() if not k.startswith("_")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
        self.name = f"empirical_flow(K={self.k}, seed={self.seed}, codec={digest})"
        self._flows: dict[int, EmpiricalFlow] = {}

    def flow(self, num_frames: int) -> EmpiricalFlow:
        if num_frames not in self._flows:
            self._flows = {num_frames: EmpiricalFlow.cached(self.codec, WorldConfig(num_frames=num_frames), self.k, self.seed)}
        return self._flows[num_frames]

    def generate_videos(self, prompts: list[tuple[str, int]], steps: int, num_frames: int,
                        guidance_scale: float | None = None) -> np.ndarray:
        """Pixels (B, F, 3, H, W) of ``prompts`` (text, seed) at ``steps`` Euler steps."""
        g = DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)
        flow = self.flow(num_frames)
        noise = torch.cat([initial_noise(flow.latent_shape, 1, seed) for _, seed in prompts])
        shift = float(getattr(self.model.pipe.scheduler.config, "shift", 5.0))
        latents = flow.sample(noise, [p for p, _ in prompts], int(steps), g if g > 1.0 else None, shift)  # as nfe()
        return latents_to_video(self.model, latents).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="ToyBench of the exact empirical-flow teacher")
    ap.add_argument("--model", default="models/toy-teacher", help="folder whose codec defines the latent space")
    ap.add_argument("--steps", default="2,16,50")
    ap.add_argument("--guidance", type=float, default=4.0, help="usual CFG form; 1 = the conditional flow alone")
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--clips-per-prompt", type=int, default=64)
    args = ap.parse_args(argv)
    world = WorldConfig()
    prompts = toybench_prompts(args.n_prompts, world)
    texts = [p for p, _ in prompts]
    model = load_model(args.model)
    flow = EmpiricalFlow(model.codec, world, args.clips_per_prompt)
    noise = torch.cat([initial_noise(flow.latent_shape, 1, s) for _, s in prompts])
    g = args.guidance if args.guidance > 1.0 else None  # the rule nfe() counts by
    per_step = 2 if g is not None else 1
    shift = float(getattr(model.pipe.scheduler.config, "shift", 5.0))
    for s in [int(x) for x in args.steps.split(",")]:
        v = latents_to_video(model, flow.sample(noise, texts, s, g, shift)).numpy()
        r = score_videos(v, texts, world)
        _, lo, hi = bootstrap_ci(r["per_clip"]["total"])
        print(f"empirical flow (K={flow.k}), CFG {args.guidance:g}, {s} steps (NFE {per_step * s}): Total {r['Total']:.1f} "
              f"[{lo:.1f}, {hi:.1f}]  Quality {r['Quality']:.1f}  Semantic {r['Semantic']:.1f}  "
              f"sharp {r['imaging_sharpness']:.1f}  grain {r['imaging_grain']:.1f}  digit {r['digit_accuracy']:.1f}  "
              f"FD {r['frechet']:.3g}", flush=True)


if __name__ == "__main__":
    main()
