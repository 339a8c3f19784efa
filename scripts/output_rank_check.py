"""Which part of the initial noise a toy model's sampler can change at all.

A ``WanTransformer3DModel`` ends in ``proj_out``: one token's velocity is ``W h + b`` with ``h`` the
token's ``inner_dim`` hidden values, so it lies in ``b + col(W)``. Where ``W`` has fewer columns
than a token has values, Euler's update in the remaining directions is ``-b`` summed over the steps
(a guided velocity is an affine mix of two such velocities), and the sample keeps the initial
noise's component there, whatever the step count. This prints the span, the share of the noise
outside it, and checks the claim on generated clips: ``perp(sample - noise) == -perp(b)``.

    python scripts/output_rank_check.py --model models/toy-teacher
"""

from __future__ import annotations

import argparse

import torch

from anystep.data.moving_digits import MovingDigits
from anystep.models.loaded import load_model
from anystep.models.toy import output_span
from anystep.sampling import generate_latents, initial_noise


def tokens(latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, F, C, h, w) latents -> (N, C * prod(patch)) token vectors in ``proj_out``'s row order
    (patch offsets, then channel)."""
    pt, ph, pw = patch
    b, f, c, h, w = latents.shape
    x = latents.double().reshape(b, f // pt, pt, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(-1, pt * ph * pw * c)


def complement(weight: torch.Tensor) -> torch.Tensor:
    """Projector onto the directions ``weight``'s columns do not reach."""
    u, s, _ = torch.linalg.svd(weight.double(), full_matrices=True)
    rank = int((s > s.max() * 1e-6).sum())
    q = u[:, :rank]
    return torch.eye(weight.shape[0], dtype=torch.float64) - q @ q.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", default="2,8,50")
    args = ap.parse_args()
    model = load_model(args.model)
    net = model.transformer
    span, token = output_span(net)
    perp = complement(net.proj_out.weight.detach())
    b = net.proj_out.bias.detach().double()
    print(f"a token has {token} values; proj_out spans {span}; {token - span} directions are out of reach")
    prompts = ["a red three moving left", "a blue seven moving up"]
    noise = initial_noise(model.latent_shape(7, 32, 32), len(prompts), 0)
    e = tokens(noise, net.config.patch_size)
    print(f"share of the initial noise's energy out of reach: {float(((e @ perp) ** 2).sum() / (e ** 2).sum()):.3f}")
    videos, _ = MovingDigits("heldout").batch(range(64))
    x = tokens(model.codec.pixels_to_latents(torch.from_numpy(videos)), net.config.patch_size)
    x = x - x.mean(0)
    print(f"share of 64 held-out real clips' variance out of reach: {float(((x @ perp) ** 2).sum() / (x ** 2).sum()):.3f}")
    for steps in (int(s) for s in args.steps.split(",")):
        moved = (tokens(generate_latents(model, prompts, steps, noise=noise), net.config.patch_size) - e) @ perp
        print(f"{steps} steps: max |perp(sample - noise) + perp(b)| = {float((moved + b @ perp).abs().max()):.1e}")


if __name__ == "__main__":
    main()
