"""``anystep reproduce``, ``synth``, ``encode``, ``export``, ``student`` and ``plot``."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from anystep.commands.inputs import check_frames, default_frames, load, read_prompts
from anystep.data.shards import ShardError, check_shard_out, encode_clips, write_synthetic
from anystep.errors import UserError
from anystep.export import ExportError, export_run
from anystep.fsutil import check_out_folder, check_parent_writable, folder_lock, has_entries, read_marker, write_marker
from anystep.models.folders import ModelFolderError
from anystep.models.students import student_folder_from_teacher
from anystep.plot import PlotError, plot_run
from anystep.reproduce import SettingsChanged, reproduce


def _check_reproduce_out(out: Path) -> None:
    """A reproduction resumes in its own folder (marker, or job records of an older run); a foreign
    non-empty folder is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and has_entries(out):
        marker = read_marker(out)
        ours = (marker or {}).get("kind") == "reproduce" if marker else (
            (out / "results.json").is_file() or any(out.glob("*/reproduce_job.json")) or any(out.glob("*/*/reproduce_job.json")))
        if not ours:
            raise UserError(f"--out {out} is a non-empty folder that is not a reproduction; it is left as it is: "
                            "choose a new or empty --out")
    check_parent_writable(out / "x")


def cmd_reproduce(args) -> int:
    if args.teacher is not None and load(args.teacher).kind != "teacher":
        raise UserError(f"{args.teacher}: --teacher must be a Wan teacher folder")
    out = Path(args.out)
    _check_reproduce_out(out)
    command = "anystep " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("anystep") else ""
    try:
        with folder_lock(out):
            write_marker(out, "reproduce")
            reproduce(out, quick=args.quick, teacher=args.teacher, measure_cost=not args.no_cost, command=command)
    except SettingsChanged as e:
        raise UserError(str(e)) from None
    print(f"report written to {out / 'report.md'}")
    return 0


def cmd_synth(args) -> int:
    prompts = read_prompts(args)
    check_shard_out(Path(args.out))  # before the lock file goes into it
    model = load(args.teacher)
    if model.kind != "teacher":
        raise UserError(f"{args.teacher}: synthetic data comes from a Wan teacher folder, got a {model.kind!r} folder")
    if args.steps < 1 or args.shard_size < 1:
        raise UserError("--steps and --shard-size must be >= 1")
    num_frames = args.num_frames if args.num_frames is not None else default_frames(model)
    try:
        check_frames(model, num_frames, args.height, args.width)
        # Under torchrun every rank writes its own shards; rank 0 holds the folder's lock for all.
        lock = folder_lock(args.out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
        with lock:
            paths = write_synthetic(model, prompts, args.out, steps=args.steps, guidance=args.guidance,
                                    num_frames=num_frames, height=args.height, width=args.width,
                                    shard_size=args.shard_size, seed=args.seed)
    except (ShardError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"{len(paths)} shard(s) of this rank in {args.out}")
    return 0


def cmd_export(args) -> int:
    check_out_folder(args.out, "model", overwrite=args.overwrite)
    try:
        dest = export_run(args.run, args.out, lora_file=args.lora_file, use_ema=not args.no_ema)
    except (ExportError, ModelFolderError) as e:
        raise UserError(str(e)) from None
    print(f"exported to {dest}" + (" (LoRA in pytorch_lora_weights.safetensors)" if args.lora_file else ""))
    return 0


def cmd_encode(args) -> int:
    model = load(args.model)
    if args.shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    check_shard_out(Path(args.out))  # before the lock file goes into it
    try:
        with folder_lock(args.out):
            paths = encode_clips(model, args.clips, args.out, shard_size=args.shard_size)
    except (ShardError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"{len(paths)} shard(s) in {args.out}")
    return 0


def cmd_student(args) -> int:

    check_out_folder(args.out, "model", overwrite=args.overwrite)
    part = None
    if args.chunk_partition:
        try:
            part = tuple(int(x) for x in args.chunk_partition.split(","))
        except ValueError:
            raise UserError(f"--chunk-partition must be comma-separated integers, got {args.chunk_partition!r}") from None
    try:
        dest = student_folder_from_teacher(args.teacher, args.out, causal=args.causal, chunk_partition=part)
    except (ModelFolderError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"student written to {dest}")
    return 0


def cmd_plot(args) -> int:
    try:
        out = plot_run(args.run, args.out)
    except PlotError as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_studio(args) -> int:
    from anystep.studio import run  # Gradio: imported only when the page is served

    return run(args.model, host=args.host, port=args.port)
