"""Does a teacher know which way along the axis its prompt says to move?

Two measurements on a teacher folder (README, teacher provenance):

1. The flow-matching error on held-out real clips with the true prompt, against the error with the
   direction reversed (left <-> right, up <-> down: the same clip played backwards) and with the
   axis swapped (left <-> up, right <-> down), at several noise levels. A teacher that uses the
   direction's sign pays for the reversed prompt; one that only knows the axis pays nothing there.
2. Distances between the text encoder's embeddings of prompts that differ in one word: the jointly
   trained encoder can collapse the words the transformer never learnt to use.
3. How far the transformer is from being blind to order at all: the relative change of its output
   when the clip is played backwards, or the patch tokens are put in mirrored order along one axis
   (each token's own content kept), and the output mapped back. A network that never uses the odd
   (sine) part of its rotary positions changes by ~0 there, whatever it learnt; a random frame
   shuffle, which the even part does see, is the yardstick. Printed for the model and for a
   random-weight network of the same config.

Usage: python scripts/teacher_sign_gap.py [--model models/toy-teacher] [--num-frames 7] [--n 64]
"""

from __future__ import annotations

import argparse

import torch

from anystep.data.moving_digits import MovingDigits, WorldConfig, make_prompt, opposite_direction, parse_prompt
from anystep.flow.schedule import add_noise
from anystep.models.text import build_tiny_umt5, encode_prompts
from anystep.sampling import load_model

AXIS_SWAP = {"left": "up", "up": "left", "right": "down", "down": "right"}


def _with_direction(prompts: list[str], fn) -> list[str]:
    out = []
    for p in prompts:
        c, d, m = parse_prompt(p)
        out.append(make_prompt(c, d, fn(m)))
    return out


@torch.no_grad()
def loss_gaps(model, num_frames: int, n: int, sigmas=(0.3, 0.5, 0.7, 0.85, 0.95), seed: int = 5) -> list[dict]:
    pipe, net = model.pipe, model.transformer.eval()
    videos, prompts = MovingDigits("heldout", WorldConfig(num_frames=num_frames), seed=seed).batch(range(n))
    x = model.codec.pixels_to_latents(torch.from_numpy(videos))  # (B, F, C, h, w)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    variants = {
        "true": prompts,
        "reversed": _with_direction(prompts, opposite_direction),
        "axis_swapped": _with_direction(prompts, AXIS_SWAP.__getitem__),
    }
    emb = {k: encode_prompts(pipe.tokenizer, pipe.text_encoder, v) for k, v in variants.items()}
    rows = []
    for s in sigmas:
        sigma = torch.full((n,), float(s))
        z = add_noise(x, noise, sigma)
        err = {}
        for k, e in emb.items():
            v = net(z.permute(0, 2, 1, 3, 4), sigma * 1000.0, e).sample.permute(0, 2, 1, 3, 4)
            err[k] = float((v - (noise - x)).pow(2).mean())
        rows.append({"sigma": s, "mse_true": err["true"],
                     "reversed_pct": 100.0 * (err["reversed"] / err["true"] - 1.0),
                     "axis_swapped_pct": 100.0 * (err["axis_swapped"] / err["true"] - 1.0)})
    return rows


@torch.no_grad()
def embedding_distances(tokenizer, text_encoder, base: str = "a red zero moving left") -> dict[str, float]:
    c, d, m = parse_prompt(base)
    others = {
        "reversed direction": make_prompt(c, d, opposite_direction(m)),
        "swapped axis": make_prompt(c, d, AXIS_SWAP[m]),
        "other digit": make_prompt(c, (d + 1) % 10, m),
        "other colour": make_prompt("blue" if c != "blue" else "red", d, m),
    }
    e = encode_prompts(tokenizer, text_encoder, [base, *others.values()]).flatten(1)
    return {k: float((e[i + 1] - e[0]).norm()) for i, k in enumerate(others)}


def _mirror_tokens(x: torch.Tensor, dim: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) latents with the patch tokens along ``dim`` (2, 3 or 4) in reverse order,
    every token's inside unchanged. An involution."""
    p = patch[dim - 2]
    b, c, f, h, w = x.shape
    sizes = [f, h, w]
    split = sizes[dim - 2] // p
    shape = [b, c] + [s for i, s in enumerate(sizes) for s in ((split, p) if i == dim - 2 else (s,))]
    return x.reshape(shape).flip(dim).reshape(b, c, f, h, w)


@torch.no_grad()
def order_symmetry(net, emb: torch.Tensor, num_frames: int, sigma: float = 0.7, seed: int = 0,
                   latent_hw: tuple[int, int] = (8, 8)) -> dict[str, float]:
    """Relative output change under a reordering g of the tokens: |g^-1 net(g z) - net(z)| / |net(z)|.
    ``latent_hw`` is the latent grid (the toy: a 32 px canvas through a 4x4 codec patch)."""
    cfg = net.config
    h, w = latent_hw
    z = torch.randn(len(emb), cfg.in_channels, num_frames, h, w, generator=torch.Generator().manual_seed(seed))
    t = torch.full((len(emb),), sigma * 1000.0)
    base = net(z, t, emb).sample
    perm = torch.randperm(num_frames, generator=torch.Generator().manual_seed(seed + 1))
    inv = torch.argsort(perm)
    maps = {
        "time reversed": (lambda x: _mirror_tokens(x, 2, cfg.patch_size),) * 2,
        "rows mirrored": (lambda x: _mirror_tokens(x, 3, cfg.patch_size),) * 2,
        "columns mirrored": (lambda x: _mirror_tokens(x, 4, cfg.patch_size),) * 2,
        "frames shuffled": (lambda x: x[:, :, perm], lambda x: x[:, :, inv]),
    }
    return {k: float((back(net(fwd(z), t, emb).sample) - base).norm() / base.norm()) for k, (fwd, back) in maps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/toy-teacher")
    ap.add_argument("--num-frames", type=int, default=7)
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(a.model)
    print(f"flow-matching error of {a.model} on {a.n} held-out {a.num_frames}-frame clips, prompt variants against the true one:")
    for r in loss_gaps(model, a.num_frames, a.n):
        print(f"  sigma {r['sigma']:.2f}: mse {r['mse_true']:.4f}   reversed direction {r['reversed_pct']:+6.2f}%"
              f"   swapped axis {r['axis_swapped_pct']:+6.2f}%")
    # The teacher's encoder starts as build_tiny_umt5(seed=<teacher seed>); phase 1 used seed 0.
    fresh = build_tiny_umt5(len(model.pipe.tokenizer), seed=0).eval()
    trained = embedding_distances(model.pipe.tokenizer, model.pipe.text_encoder)
    init = embedding_distances(model.pipe.tokenizer, fresh)
    print("text-embedding distance from 'a red zero moving left' (L2 over the padded sequence):")
    print(f"  {'':20s} {'teacher':>8s} {'at init':>8s}")
    for k in trained:
        print(f"  {k:20s} {trained[k]:8.2f} {init[k]:8.2f}")
    from diffusers import WanTransformer3DModel

    net = model.transformer.eval()
    emb = encode_prompts(model.pipe.tokenizer, model.pipe.text_encoder, ["a red zero moving left", "a blue seven moving up"])
    random_net = WanTransformer3DModel.from_config(net.config).eval()
    side = WorldConfig().canvas // model.codec.config.patch
    mine = order_symmetry(net, emb, a.num_frames, latent_hw=(side, side))
    rand = order_symmetry(random_net, emb, a.num_frames, latent_hw=(side, side))
    print("relative output change when the tokens are reordered (0 = blind to that order), sigma 0.7:")
    print(f"  {'':20s} {'model':>8s} {'random':>8s}")
    for k in mine:
        print(f"  {k:20s} {mine[k]:8.4f} {rand[k]:8.4f}")


if __name__ == "__main__":
    main()
