"""Training batches from the toy world: MovingDigits clips as normalised latents + frozen text embeddings.

The clips go through the model folder's own codec, so the same batches feed a toy teacher (exact
space-to-depth codec) and a Wan-layout folder (``AutoencoderKLWan``, clip lengths 1 + 4k).

The clip indices of step ``s`` are ``[s * B, (s + 1) * B)`` of a seeded MovingDigits stream, so the
data position is the step counter and a resumed run reads exactly the clips it would have read.
"""

from __future__ import annotations

import numpy as np
import torch

from anystep.data.moving_digits import MovingDigits, WorldConfig
from anystep.models.latents import encode_pixels
from anystep.models.text import encode_prompts, text_rows


class ToyBatches:
    def __init__(self, pipe, num_frames: int = 7, seed: int = 0, max_sequence_length: int | None = None):
        self.pipe = pipe
        self.world = WorldConfig(num_frames=num_frames)
        self.data = MovingDigits("train", self.world, seed=seed)
        self.max_len = max_sequence_length or text_rows(pipe.tokenizer, pipe.transformer)
        self._emb: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Frozen text embeddings, cached per prompt (the toy world has 160 prompts + the null one)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._emb]
        if missing:
            out = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, missing, self.max_len)
            self._emb.update({p: e for p, e in zip(missing, out)})
        return torch.stack([self._emb[p] for p in prompts])

    def null(self, n: int) -> torch.Tensor:
        return self.embed([""] * n)

    def batch(self, step: int, batch_size: int, micro: int = 0, accum: int = 1, rank: int = 0, world_size: int = 1):
        """(latents (B, F, C, h, w), prompts) for one micro-batch of one rank."""
        global_batch = batch_size * world_size
        start = ((step * accum + micro) * global_batch) + rank * batch_size
        videos, prompts = self.data.batch(np.arange(start, start + batch_size))
        return encode_pixels(self.pipe.vae, torch.from_numpy(videos)), prompts
