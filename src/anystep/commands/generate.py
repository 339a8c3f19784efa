"""``anystep generate``: clips from a model folder at any step count (chunk by chunk for FAR models)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from anystep.commands.inputs import check_frames, default_frames, load, positive, read_prompts
from anystep.conditioning import context_latents, read_frames
from anystep.errors import UserError
from anystep.fsutil import atomic_files, atomic_save_folder, check_out_file, check_out_folder
from anystep.io import clip_name, frame_grid, mp4_item, png_item, write_mp4, write_png
from anystep.models.latents import temporal_factor
from anystep.sampling import generate, generate_latents, latents_to_video


def cmd_generate(args) -> int:

    prompts = read_prompts(args)
    positive(args, "steps", "batch_size", "fps", "height", "width", "num_frames")
    out = Path(args.out)
    # Every output path is checked before the model is even loaded: a refusal costs nothing.
    if len(prompts) == 1:
        if out.suffix.lower() != ".mp4":
            raise UserError(f"--out must name an .mp4 file for a single prompt, got {out}")
        check_out_file(out, args.overwrite)
        check_out_file(out.with_suffix(".png"), args.overwrite, what="--out (its .png frame grid)")
    else:
        check_out_folder(out, "clips", overwrite=args.overwrite)
    model = load(args.model)
    num_frames = args.num_frames if args.num_frames is not None else default_frames(model)
    if (args.image or args.video) and model.kind != "anyflow_far":
        raise UserError(f"--image / --video condition a causal AnyFlow-FAR model; {args.model} is a {model.kind!r} folder")
    if args.image and args.video:
        raise UserError("give either --image or --video, not both")
    try:
        check_frames(model, num_frames, args.height, args.width)
        if model.kind == "anyflow_far":
            videos = _generate_far(model, prompts, args, num_frames, out)
        else:
            videos = []
            for i in range(0, len(prompts), args.batch_size):
                chunk = prompts[i : i + args.batch_size]
                videos.append(
                    generate(
                        model, chunk, args.steps, seed=args.seed + i, num_frames=num_frames,
                        height=args.height, width=args.width, guidance_scale=args.guidance_scale,
                    )
                )
            videos = torch.cat(videos)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    if len(prompts) == 1:
        # The clip and its grid are renamed into place together, after both were written and checked.
        atomic_files([mp4_item(videos[0], out, fps=args.fps),
                      png_item(frame_grid(videos[:1], scale=4, labels=prompts), out.with_suffix(".png"))])
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        def write(tmp):
            for i, (v, prompt) in enumerate(zip(videos, prompts)):
                write_mp4(v, tmp / clip_name(i, prompt), fps=args.fps)
            write_png(frame_grid(videos, scale=2, labels=prompts), tmp / "grid.png")
            (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")

        atomic_save_folder(write, out, kind="clips")
        print(f"wrote {len(prompts)} clips and grid.png to {out}")
    return 0


def _generate_far(model, prompts, args, num_frames: int, out: Path):
    """FAR models: chunk by chunk (T2V, or I2V / V2V from --image / --video). A single clip is
    rewritten after every chunk, so a long clip shows its progress as it grows -- under a temporary
    name beside ``out``, removed at the end: ``out`` itself is written once, complete."""


    if args.guidance_scale not in (None, 1.0) and model.sampler != "euler_cfg":
        raise UserError("AnyFlow-FAR students are guidance-fused: --guidance-scale is not used with them")
    ctx = None
    if args.image or args.video:
        frames = read_frames(args.image or args.video)
        ctx = context_latents(model, frames, args.height, args.width)
        used = (ctx.shape[1] - 1) * temporal_factor(model.codec) + 1
        if used < frames.shape[0]:  # whole chunks only: say which frames condition the clip
            print(f"conditioning on the first {used} of the {frames.shape[0]} given frame(s) (the whole chunks they "
                  f"cover); the rest is generated", flush=True)
    n_chunks = len(model.transformer.config.chunk_partition)
    partial = None
    if len(prompts) == 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.partial.", suffix=".mp4")
        os.close(fd)

    def on_chunk(k, lat):
        where = ""
        if partial is not None:
            write_mp4(latents_to_video(model, lat)[0], partial, fps=args.fps)
            where = f" -> {partial}"
        print(f"chunk {k + 1}/{n_chunks} done ({lat.shape[1]} latent frames){where}", flush=True)

    try:
        videos = []
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]
            lat = generate_latents(model, chunk, args.steps, seed=args.seed + i, num_frames=num_frames, height=args.height,
                                   width=args.width, context=ctx, on_chunk=on_chunk,
                                   guidance_scale=args.guidance_scale if model.sampler == "euler_cfg" else None)
            videos.append(latents_to_video(model, lat))
        return torch.cat(videos)
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
