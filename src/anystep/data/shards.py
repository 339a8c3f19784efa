"""Synthetic training data: teacher-generated latents + text embeddings in safetensors shards.

The paper trains both stages on clips the teacher itself generated. ``write_synthetic`` runs the
teacher (Euler + CFG, 50 steps by default) over a prompt list and writes

    out/manifest.json                  what made the data (teacher, steps, guidance, geometry, ...)
    out/shard-00000.safetensors ...    ``latents`` (n, F, C, h, w) fp32, ``text_embeds`` (n, L, D),
                                       ``seeds`` (n,); the prompts in the file's metadata

Shard ``s`` holds prompts ``[s * shard_size, (s + 1) * shard_size)``; clip ``i`` starts from the noise
of seed ``seed + i``, so any shard can be regenerated bit for bit. Under torchrun rank ``r`` of
``W`` writes the shards with ``s % W == r`` (no communication needed); a shard that exists is
skipped, so a killed run resumes. Every shard is written atomically.

``LatentShards`` reads a shard folder as training batches with the same interface as
:class:`anystep.data.toy_batches.ToyBatches`: the clips of step ``s`` are a deterministic function
of ``(seed, s)`` and the rank, so a resumed run reads exactly what it would have read.
"""

from __future__ import annotations

from anystep.errors import UserError

import json
import os
from pathlib import Path

import numpy as np
import torch
from anystep.conditioning import read_frames
from anystep.data.toy_batches import ToyBatches
from anystep.fsutil import atomic_write, folder_digest, has_entries
from anystep.models.latents import encode_pixels
from anystep.models.text import check_prompts_fit, encode_prompts
from anystep.sampling import generate_latents

MANIFEST = "manifest.json"


class ShardError(UserError, ValueError):
    """A shard folder that cannot be written to or read (one-line message)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def check_shard_out(out: Path) -> None:
    """A shard folder is written only where it is new, empty, or already a shard folder (resumed)."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} exists and is not a folder; choose another --out")

    if out.is_dir() and has_entries(out) and not (out / MANIFEST).is_file():
        raise ShardError(f"--out {out} is a non-empty folder that is not a shard folder (no {MANIFEST}); it is left as "
                         "it is: choose a new or empty --out")


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@torch.no_grad()
def write_synthetic(teacher, prompts: list[str], out, steps: int = 50, guidance: float = 4.0, num_frames: int = 7,
                    height: int = 32, width: int = 32, shard_size: int = 16, seed: int = 0,
                    rank: int | None = None, world_size: int | None = None, progress=print) -> list[Path]:
    """Generate the shards of this rank; returns the paths it wrote or found. ``teacher`` is a
    loaded teacher (:func:`anystep.sampling.load_model`)."""


    if teacher.kind != "teacher":
        raise ShardError(f"{teacher.folder}: synthetic data comes from a Wan teacher folder, got a {teacher.kind!r} folder")
    if not prompts:
        raise ShardError("no prompts")
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    out = Path(out)
    check_shard_out(out)
    out.mkdir(parents=True, exist_ok=True)
    # The teacher's bytes too: a folder retrained in place must not add shards to its old ones.
    manifest = {"teacher": str(teacher.folder), "teacher_sha256": folder_digest(teacher.folder), "steps": steps, "guidance": guidance, "num_frames": num_frames,
                "height": height, "width": width, "shard_size": shard_size, "seed": seed, "num_prompts": len(prompts),
                "num_shards": (len(prompts) + shard_size - 1) // shard_size}
    mpath = out / MANIFEST
    if mpath.exists():
        have = json.loads(mpath.read_text())
        if have != manifest:
            diff = sorted(k for k in manifest if have.get(k) != manifest[k])
            raise ShardError(f"{out} holds shards made with different settings ({', '.join(diff)}); use a fresh --out")
    elif rank == 0:
        atomic_write(mpath, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    pipe = teacher.pipe
    paths = []
    mine = [s for s in range(manifest["num_shards"]) if s % world_size == rank]
    for k, s in enumerate(mine):
        path = out / shard_name(s)
        paths.append(path)
        if path.exists():
            continue
        chunk = prompts[s * shard_size : (s + 1) * shard_size]
        first = seed + s * shard_size
        lat = generate_latents(teacher, chunk, steps, seed=first, num_frames=num_frames, height=height, width=width,
                               guidance_scale=guidance)
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, chunk, teacher.max_sequence_length)
        tensors = {"latents": lat.float().contiguous(), "text_embeds": emb.float().contiguous(),
                   "seeds": torch.arange(first, first + len(chunk))}
        meta = {"prompts": json.dumps(chunk), "shard": str(s)}
        atomic_write(path, lambda f: f.write(_safetensors_bytes(tensors, meta)))
        progress(f"[synth] rank {rank}: shard {k + 1}/{len(mine)} ({len(chunk)} clips) -> {path.name}")
    return paths


@torch.no_grad()
def encode_clips(model, clips_dir, out, shard_size: int = 16, progress=print) -> list[Path]:
    """A user's own clips as training shards: every ``name.mp4`` in ``clips_dir`` with its caption in
    ``name.txt``, encoded with the model folder's codec (posterior mean) and text encoder. Clips are
    taken in sorted name order; all must share one size and length. Resumable like the synthetic
    shards (an existing shard is kept)."""
    clips_dir, out = Path(clips_dir), Path(out)
    check_shard_out(out)
    if not clips_dir.is_dir():
        raise ShardError(f"clip folder not found: {clips_dir}")
    videos = sorted(clips_dir.glob("*.mp4"))
    if not videos:
        raise ShardError(f"{clips_dir} holds no .mp4 clips")
    captions = []
    for v in videos:
        cap = v.with_suffix(".txt")
        if not cap.is_file():
            raise ShardError(f"{v.name} has no caption file {cap.name}")
        try:
            text = " ".join(cap.read_text(encoding="utf-8").split())
        except UnicodeDecodeError:
            raise ShardError(f"caption {cap} is not UTF-8 text; save it as UTF-8") from None
        if not text:
            raise ShardError(f"caption {cap.name} is empty")
        captions.append(text)
    # Every caption is checked before the first shard is written, not when its shard comes.
    check_prompts_fit(model.pipe.tokenizer, captions, model.max_sequence_length)
    first = read_frames(videos[0])
    manifest = {"source": str(clips_dir), "codec": type(model.codec).__name__, "shard_size": shard_size,
                "num_prompts": len(videos), "num_shards": (len(videos) + shard_size - 1) // shard_size,
                "num_frames": int(first.shape[0]), "height": int(first.shape[2]), "width": int(first.shape[3])}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    new_manifest = not (out / MANIFEST).exists()
    try:
        return _encode_shards(model, out, manifest, videos, captions, first, shard_size, progress)
    except BaseException:
        # A clip that fails to read leaves no manifest-only folder behind (a lock file is the caller's).
        if new_manifest and not any(out.glob("shard-*.safetensors")):
            (out / MANIFEST).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise


def _encode_shards(model, out, manifest, videos, captions, first, shard_size, progress) -> list[Path]:
    mpath = out / MANIFEST
    if mpath.exists() and json.loads(mpath.read_text()) != manifest:
        raise ShardError(f"{out} holds shards made from different clips or settings; use a fresh --out")
    atomic_write(mpath, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    pipe, paths = model.pipe, []
    for s in range(manifest["num_shards"]):
        path = out / shard_name(s)
        paths.append(path)
        if path.exists():
            continue
        names, caps = videos[s * shard_size : (s + 1) * shard_size], captions[s * shard_size : (s + 1) * shard_size]
        frames = [read_frames(v) for v in names]
        for v, f in zip(names, frames):
            if f.shape != first.shape:
                raise ShardError(f"{v.name} is {tuple(f.shape)} (frames, channels, height, width), {videos[0].name} is {tuple(first.shape)}")
        lat = encode_pixels(model.codec, torch.stack(frames))
        emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, caps, model.max_sequence_length)
        tensors = {"latents": lat.float().contiguous(), "text_embeds": emb.float().contiguous(),
                   "seeds": torch.full((len(caps),), -1)}
        meta = {"prompts": json.dumps(caps), "shard": str(s), "files": json.dumps([v.name for v in names])}
        atomic_write(path, lambda f: f.write(_safetensors_bytes(tensors, meta)))
        progress(f"[encode] shard {s + 1}/{manifest['num_shards']} ({len(caps)} clips) -> {path.name}")
    return paths


def _safetensors_bytes(tensors, meta) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=meta)


class LatentShards:
    """Training batches from a shard folder: ``batch()`` -> (latents (B, F, C, h, w), prompts),
    ``embed(prompts)`` / ``null(n)`` -> text embeddings (stored ones; the null prompt is encoded
    once with the model folder's own text encoder, as prompt dropout needs it)."""

    def __init__(self, folder, pipe=None, seed: int = 0):
        from safetensors import SafetensorError, safe_open

        folder = Path(folder)
        if not (folder / MANIFEST).exists():
            raise ShardError(f"{folder} is not a shard folder (no {MANIFEST})")
        try:
            self.manifest = json.loads((folder / MANIFEST).read_text())
            files = [folder / shard_name(s) for s in range(int(self.manifest["num_shards"]))]
        except (ValueError, KeyError, TypeError) as e:
            raise ShardError(f"{folder / MANIFEST} is not a shard manifest ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"write the folder again with `anystep synth` or `anystep encode`") from None
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ShardError(f"{folder} is incomplete: {len(missing)} shard(s) missing, e.g. {missing[0]}")
        lat, self.prompts, self._emb = [], [], {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    ps = json.loads(h.metadata()["prompts"])
                    x, e = h.get_tensor("latents"), h.get_tensor("text_embeds")
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
                raise ShardError(f"shard {f} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                                 "it is truncated or not a shard: delete it and run the same synth / encode command "
                                 "to write it again") from None
            lat.append(x)
            self.prompts += ps
            self._emb.update({p: e[i] for i, p in enumerate(ps)})
        self.latents = torch.cat(lat)
        self.pipe = pipe
        self.seed = seed

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def indices(self, start: int, n: int) -> np.ndarray:
        """Positions ``start .. start + n`` of the endless stream of shuffled epochs."""
        pos = np.arange(start, start + n)
        out = np.empty(n, dtype=np.int64)
        for epoch in np.unique(pos // len(self)):
            sel = pos // len(self) == epoch
            out[sel] = self._order(int(epoch))[pos[sel] % len(self)]
        return out

    def batch(self, step: int, batch_size: int, micro: int = 0, accum: int = 1, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        start = ((step * accum + micro) * global_batch) + rank * batch_size
        idx = self.indices(start, batch_size)
        return self.latents[idx].clone(), [self.prompts[i] for i in idx]

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        for p in dict.fromkeys(prompts):
            if p not in self._emb:
                if self.pipe is None:
                    raise ShardError(f"prompt {p!r} is not in the shards and no text encoder was given")

                L = next(iter(self._emb.values())).shape[0]
                self._emb[p] = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [p], L)[0]
        return torch.stack([self._emb[p] for p in prompts])

    def null(self, n: int) -> torch.Tensor:
        return self.embed([""] * n)


def training_batches(pipe, data: str, num_frames: int, seed: int):
    """The batch source a training config names: ``moving_digits`` or a shard folder."""
    if data == "moving_digits":
        return ToyBatches(pipe, num_frames=num_frames, seed=seed)
    return LatentShards(data, pipe=pipe, seed=seed)
