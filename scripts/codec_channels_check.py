"""ToyBench of held-out real clips through the toy codec, exact and projected onto K channels: what
a projected codec costs before any model is trained on it (how the shipped 28 was chosen).

    python scripts/codec_channels_check.py --channels 24,28,32
"""

from __future__ import annotations

import argparse

import torch

from anystep.data.moving_digits import MovingDigits
from anystep.eval.toybench import real_clips_for, score_videos, toybench_prompts
from anystep.models.codec import fit_codec, project_codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", default="24,28,32")
    ap.add_argument("--n-prompts", type=int, default=40)
    args = ap.parse_args()
    train = MovingDigits("train")
    # The statistics and basis come from training clips, as `anystep train teacher` fits them.
    exact = fit_codec(torch.from_numpy(train.batch(range(256))[0]), first_frame_offset=1.0)
    fit_clips = torch.from_numpy(train.batch(range(1024))[0])
    prompts = toybench_prompts(args.n_prompts)
    real = real_clips_for(prompts)
    names = [p for p, _ in prompts]
    rows = [("real clips", real)]
    for k in (int(c) for c in args.channels.split(",")):
        codec = project_codec(exact, fit_clips, k)
        with torch.no_grad():
            rows.append((f"{k} channels", codec.latents_to_pixels(codec.pixels_to_latents(torch.from_numpy(real))).numpy()))
    for name, clips in rows:
        r = score_videos(clips, names)
        print(f"{name:>12}: Total {r['Total']:.1f} Quality {r['Quality']:.1f} Semantic {r['Semantic']:.1f} "
              f"grain {r['imaging_grain']:.1f} sharpness {r['imaging_sharpness']:.1f} "
              f"flicker {r['temporal_flicker']:.1f} mse {float(((clips - real) ** 2).mean()):.1e}")


if __name__ == "__main__":
    main()
