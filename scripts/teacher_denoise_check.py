"""How much noise a toy teacher removes at low noise levels: the x0 estimate z - sigma v of 32
held-out real clips against the clip, as a share of the noise that was in z (1 is no denoising,
0 a perfect denoiser).

    python scripts/teacher_denoise_check.py --model models/toy-teacher
"""

from __future__ import annotations

import argparse

import torch

from anystep.data.moving_digits import MovingDigits
from anystep.flow.schedule import NUM_TRAIN_TIMESTEPS
from anystep.models.loaded import load_model
from anystep.models.text import encode_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--sigmas", default="0.02,0.05,0.1,0.2,0.4")
    args = ap.parse_args()
    model = load_model(args.model)
    net, pipe = model.transformer.eval(), model.pipe
    videos, prompts = MovingDigits("heldout").batch(range(args.clips))
    x = model.codec.pixels_to_latents(torch.from_numpy(videos))  # (B, F, C, h, w)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, model.max_sequence_length)
        for s in (float(v) for v in args.sigmas.split(",")):
            z = (1 - s) * x + s * torch.randn(x.shape, generator=g)
            t = torch.full((len(x),), s * NUM_TRAIN_TIMESTEPS)
            v = net(z.permute(0, 2, 1, 3, 4), t, emb).sample.permute(0, 2, 1, 3, 4)
            left = (z - s * v - x).pow(2).mean() / (z - x).pow(2).mean()
            print(f"sigma {s:g}: share of the noise left in the x0 estimate {left.item():.3f}")


if __name__ == "__main__":
    main()
