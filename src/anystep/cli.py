"""``anystep`` command line.

Every user mistake (bad folder, bad flag value, bad recipe) ends in one ``anystep: error: ...``
line on stderr and exit code 2, with nothing half-written left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

SHIPPED_TEACHER = Path(__file__).resolve().parents[2] / "models" / "toy-teacher"


from anystep.errors import EXIT_INTERRUPTED, EXIT_USER, UserError, disk_full_line, message_line, os_error_line

class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)  # every help shows its default
        super().__init__(*args, **kw)

    def error(self, message):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message}")


def _steps_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--steps must be a comma-separated list of integers, got {text!r}") from None
    if not steps:
        raise UserError("--steps is empty")
    bad = [s for s in steps if s < 1]
    if bad:
        raise UserError(f"--steps must be >= 1, got {bad[0]}")
    return steps


def _read_prompts(args) -> list[str]:
    if args.prompt is not None and args.prompts is not None:
        raise UserError("give either --prompt or --prompts, not both")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        return [args.prompt]
    if args.prompts is None:
        raise UserError("one of --prompt or --prompts is required")
    path = Path(args.prompts)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    while lines and not lines[-1].strip():  # a trailing newline is not an empty prompt
        lines.pop()
    if not lines:
        raise UserError(f"prompt file is empty: {path}")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise UserError(f"prompt file {path} has an empty line at line {i}")
    return [line.strip() for line in lines]


def _load(folder):
    from anystep.models.folders import ModelFolderError
    from anystep.models.loaded import load_model

    try:
        return load_model(folder)
    except ModelFolderError as e:
        raise UserError(str(e)) from None


def _positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def cmd_generate(args) -> int:
    import torch

    from anystep.fsutil import check_out_file, check_out_folder
    from anystep.io import frame_grid, write_mp4, write_png
    from anystep.sampling import generate

    prompts = _read_prompts(args)
    _positive(args, "steps", "batch_size", "fps", "height", "width", "num_frames")
    out = Path(args.out)
    # Every output path is checked before the model is even loaded: a refusal costs nothing.
    if len(prompts) == 1:
        if out.suffix.lower() != ".mp4":
            raise UserError(f"--out must name an .mp4 file for a single prompt, got {out}")
        check_out_file(out, args.overwrite)
        check_out_file(out.with_suffix(".png"), args.overwrite, what="--out (its .png frame grid)")
    else:
        check_out_folder(out, "clips", overwrite=args.overwrite)
    model = _load(args.model)
    num_frames = args.num_frames if args.num_frames is not None else _default_frames(model)
    if (args.image or args.video) and model.kind != "anyflow_far":
        raise UserError(f"--image / --video condition a causal AnyFlow-FAR model; {args.model} is a {model.kind!r} folder")
    if args.image and args.video:
        raise UserError("give either --image or --video, not both")
    try:
        _check_frames(model, num_frames, args.height, args.width)
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
        from anystep.fsutil import atomic_files
        from anystep.io import mp4_item, png_item

        # The clip and its grid are renamed into place together, after both were written and checked.
        atomic_files([mp4_item(videos[0], out, fps=args.fps),
                      png_item(frame_grid(videos[:1], scale=4), out.with_suffix(".png"))])
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        from anystep.train.common import atomic_save_folder

        def write(tmp):
            for i, v in enumerate(videos):
                write_mp4(v, tmp / f"{i:04d}.mp4", fps=args.fps)
            write_png(frame_grid(videos, scale=2), tmp / "grid.png")
            (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")

        atomic_save_folder(write, out, kind="clips")
        print(f"wrote {len(prompts)} clips and grid.png to {out}")
    return 0


def _generate_far(model, prompts, args, num_frames: int, out: Path):
    """FAR models: chunk by chunk (T2V, or I2V / V2V from --image / --video). A single clip is
    rewritten after every chunk, so a long clip shows its progress as it grows -- under a temporary
    name beside ``out``, removed at the end: ``out`` itself is written once, complete."""
    import os
    import tempfile

    import torch

    from anystep.conditioning import context_latents, read_frames
    from anystep.io import write_mp4
    from anystep.sampling import generate_latents, latents_to_video

    if args.guidance_scale not in (None, 1.0) and model.sampler != "euler_cfg":
        raise UserError("AnyFlow-FAR students are guidance-fused: --guidance-scale is not used with them")
    ctx = None
    if args.image or args.video:
        frames = read_frames(args.image or args.video)
        ctx = context_latents(model, frames, args.height, args.width)
        from anystep.models.latents import temporal_factor

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


def _default_frames(model) -> int:
    if model.kind == "anyflow_far":
        return int(sum(model.transformer.config.chunk_partition))
    return 7


def _check_frames(model, num_frames: int, height: int, width: int) -> None:
    if num_frames < 1:
        raise UserError(f"--num-frames must be >= 1, got {num_frames}")
    if height < 1 or width < 1:
        raise UserError(f"--height and --width must be >= 1, got {height}x{width}")
    f_lat, _, h_lat, w_lat = model.latent_shape(num_frames, height, width)  # raises ValueError on a bad canvas
    cfg = model.transformer.config
    limit = getattr(cfg, "rope_max_seq_len", None)
    if limit:
        p = list(cfg.patch_size)
        tokens = {"frames": (f_lat // p[0], num_frames), "height": (h_lat // p[1], height), "width": (w_lat // p[2], width)}
        over = {k: v for k, v in tokens.items() if v[0] > limit}
        if over:
            k, (n, asked) = next(iter(over.items()))
            raise UserError(f"--{'num-frames' if k == 'frames' else k} {asked} makes {n} positions along the {k}, "
                            f"more than this model's {limit} (rope_max_seq_len); use a smaller value")
    if model.kind == "anyflow_far":
        part = list(model.transformer.config.chunk_partition)
        f_lat = model.latent_shape(num_frames, height, width)[0]
        if sum(part) != f_lat:
            raise UserError(
                f"{f_lat} latent frames do not match the chunk partition {part} (sum {sum(part)})"
            )


def cmd_eval(args) -> int:
    if args.suite == "vbench":
        return _eval_vbench(args)
    from anystep.eval.toybench import run_toybench

    steps = _steps_list(args.steps)
    if args.n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    _check_eval_out(Path(args.out), "toybench.json")
    model = _load(args.model)
    from anystep.data.moving_digits import WorldConfig

    canvas = WorldConfig().canvas
    if (args.height, args.width) != (canvas, canvas):
        raise UserError(f"eval toybench scores the {canvas}x{canvas} toy world; --height/--width apply to vbench only")
    if args.num_frames is not None:
        _check_frames(model, args.num_frames, args.height, args.width)
    del model  # validated; run_toybench loads it itself
    domain = {}
    for key in ("colors", "directions"):
        value = getattr(args, key)
        if value:
            domain[key] = tuple(v.strip() for v in value.split(",") if v.strip())
    from anystep.fsutil import folder_lock

    try:
        with folder_lock(args.out):
            result = run_toybench(args.model, steps=steps, out_dir=args.out, n_prompts=args.n_prompts,
                                  num_frames=args.num_frames, context_frames=args.context_frames,
                                  guidance_scale=args.guidance_scale, teacher_reference=args.teacher_reference,
                                  sampler=args.sampler, **domain)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    _print_table(result)
    return 0


def _check_eval_out(out: Path, result_file: str) -> None:
    """An eval folder is reused (its finished step counts are kept); a foreign one is not written into."""
    from anystep.fsutil import check_parent_writable, has_entries

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and has_entries(out) and not (out / result_file).exists() and not (out / "videos").is_dir():
        raise UserError(f"--out {out} is a non-empty folder that holds no {result_file}; it is left as it is: choose a "
                        "new or empty --out")
    check_parent_writable(out / "x")


def _eval_vbench(args) -> int:
    from anystep.eval.vbench import (
        VBenchInputError, generate_vbench_videos, read_prompt_pairs, score_with_vbench, vbench_available,
    )
    from anystep.train.common import atomic_write

    steps = _steps_list(args.steps)
    if len(steps) != 1:
        raise UserError("eval vbench takes one --steps value")
    if args.prompts is None:
        raise UserError("eval vbench needs --prompts FILE (one VBench prompt per line)")
    _check_eval_out(Path(args.out), "vbench.json")
    try:
        pairs = read_prompt_pairs(args.prompts, args.augmented)
    except VBenchInputError as e:
        raise UserError(str(e)) from None
    model = _load(args.model)
    num_frames = args.num_frames if args.num_frames is not None else _default_frames(model)
    try:
        _check_frames(model, num_frames, args.height, args.width)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    videos = Path(args.out) / "videos"
    generate_vbench_videos(model, pairs, steps[0], videos, num_frames=num_frames, height=args.height, width=args.width)
    if not vbench_available():
        print(f"{len(pairs) * 5} videos in {videos}; VBench is not installed here, so they are not scored: "
              "re-run this command where `pip install vbench` works (the videos are reused)")
        return 0
    result = score_with_vbench(videos, Path(args.out) / "vbench")
    atomic_write(Path(args.out) / "vbench.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"VBench Quality {result['Quality']:.2f}  Semantic {result['Semantic']:.2f}  Total {result['Total']:.2f}")
    return 0


def _print_table(result: dict) -> None:
    rows = sorted(result.get("results", {}).values(), key=lambda r: r["steps"])
    ctx = result.get("context_frames", 0)
    given = f"  (first {ctx} frame(s) of each real clip given)" if ctx else ""
    print(f"\nToyBench  {result.get('model_folder', '')}{given}")
    from anystep.report import bootstrap_ci

    fdt = any("frechet_teacher" in r for r in rows)
    print(f"{'steps':>5} {'NFE':>5} {'Quality':>8} {'Semantic':>9} {'Total':>7} {'95% CI':>15} {'digit':>6} {'color':>6} "
          f"{'dir':>6} {'axis':>6} {'sharp':>6} {'grain':>6} {'FD':>8}" + (f" {'FD-teach':>8}" if fdt else ""))
    for r in rows:
        ci = "[{1:.1f}, {2:.1f}]".format(*bootstrap_ci(r["per_clip_total"])) if r.get("per_clip_total") else "n/a"
        print(
            f"{r['steps']:>5} {r['nfe']:>5} {r['Quality']:>8.2f} {r['Semantic']:>9.2f} {r['Total']:>7.2f} {ci:>15} "
            f"{r.get('digit_accuracy', float('nan')):>6.1f} {r.get('color_accuracy', float('nan')):>6.1f} "
            f"{r.get('direction_accuracy', float('nan')):>6.1f} {r.get('direction_axis_accuracy', float('nan')):>6.1f} "
            f"{r.get('imaging_sharpness', float('nan')):>6.1f} {r.get('imaging_grain', float('nan')):>6.1f} "
            f"{r.get('frechet', float('nan')):>8.2f}" + (f" {r.get('frechet_teacher', float('nan')):>8.2f}" if fdt else "")
        )
    real = result.get("real")
    if real:
        print(f"{'real':>5} {'':>5} {real['Quality']:>8.2f} {real['Semantic']:>9.2f} {real['Total']:>7.2f} {'':>15} "
              f"{'':>6} {'':>6} {'':>6} {'':>6} {real.get('imaging_sharpness', float('nan')):>6.1f} "
              f"{real.get('imaging_grain', float('nan')):>6.1f} {real.get('frechet', float('nan')):>8.2f}"
              + (f" {real.get('frechet_teacher', float('nan')):>8.2f}" if fdt else ""))


def _check_stage1(cfg) -> None:
    _load(cfg.init or cfg.teacher)  # a bad folder is a one-line error, before any output exists


def _check_teacher_only(cfg) -> None:
    if _load(cfg.teacher).kind != "teacher":
        raise UserError(f"{cfg.teacher}: consistency ODE-init starts from a Wan teacher folder")


def _check_stage2(cfg) -> None:
    if cfg.rollout not in ("flowmap", "consistency"):
        raise UserError(f"rollout must be 'flowmap' or 'consistency', got {cfg.rollout!r}")
    student, teacher = _load(cfg.student), _load(cfg.teacher)  # bad folders: one-line errors first
    if student.kind not in ("anyflow", "anyflow_far") or (student.kind == "anyflow_far") != cfg.causal:
        raise UserError(
            f"{cfg.student}: the Stage-2 student must be an AnyFlow{'-FAR' if cfg.causal else ''} folder "
            f"(causal={cfg.causal}), got a {student.kind!r} folder"
        )
    if teacher.kind != "teacher":
        raise UserError(f"{cfg.teacher}: the Stage-2 teacher must be a Wan teacher folder, got a {teacher.kind!r} folder")


def _check_teacher_train(cfg) -> None:
    from anystep.train.checkpoint import has_checkpoint, read_meta

    if cfg.init and has_checkpoint(cfg.init):
        if str(read_meta(cfg.init).get("name")) != "teacher":
            raise UserError(f"init={cfg.init}: a teacher fine-tune starts from a teacher run or a teacher folder")
    elif cfg.init and Path(cfg.init).is_dir():
        if _load(cfg.init).kind != "teacher":
            raise UserError(f"init={cfg.init}: a teacher fine-tune starts from a Wan teacher folder")
        from anystep.models.toy import TOY_TRANSFORMER

        have = json.loads((Path(cfg.init) / "transformer" / "config.json").read_text())
        want = {**TOY_TRANSFORMER, **cfg.transformer}
        differ = [f"{k} {have[k]} != {v}" for k, v in want.items()
                  if k in have and (list(have[k]) if isinstance(have[k], (list, tuple)) else have[k])
                  != (list(v) if isinstance(v, (list, tuple)) else v)]
        if differ:
            raise UserError(f"init={cfg.init}: its transformer does not match this run's ({', '.join(differ)}); "
                            f"set transformer={{...}} to the folder's config")
    elif cfg.init:
        raise UserError(
            f"init={cfg.init}: neither a teacher checkpoint (the out= folder of `anystep train teacher`) nor a teacher folder"
        )
    if cfg.long_frac and cfg.long_num_frames <= 0:
        raise UserError(f"long_frac={cfg.long_frac} needs long_num_frames > 0")


# Each method's pre-flight check: a bad folder or setting is one line before any output exists.
_PREFLIGHT = {
    "teacher": _check_teacher_train,
    "stage1": _check_stage1,
    "stage2": _check_stage2,
    "consistency_init": _check_teacher_only,
}


def cmd_train(args) -> int:
    from anystep.config import build_config, to_yaml

    from anystep.train.registry import method_info, method_names

    if args.method not in method_names():
        raise UserError(f"unknown training method {args.method!r}")
    info = method_info(args.method)
    train, check, what = info.train, _PREFLIGHT[args.method], info.what
    cfg = build_config(info.config, args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from anystep.distributed import launched_world_size
    from anystep.train.runfolder import claim_run_folder

    if launched_world_size() > 1 and args.method == "teacher":
        raise UserError("the toy teacher trains in one process; run `anystep train teacher` without torchrun")
    check(cfg)
    allow = _allowed_changes(args.allow_changed, cfg)
    from anystep.distributed import all_sum, setup, shutdown

    env = setup()
    with contextlib.ExitStack() as stack:
        # Rank 0 owns the folder (lock, marker, metrics); the other ranks only write checkpoint shards.
        state, refusal = None, None
        if env.is_main:
            try:
                state = stack.enter_context(claim_run_folder(args.method, cfg, allow))
            except (UserError, OSError) as e:
                refusal = e
        # Every rank learns rank 0's verdict: a refusal there must not leave the others in a collective.
        import torch

        code = (1 if refusal is not None else 2 if state is not None and state.finished else 0) if env.is_main else 0
        verdict = int(all_sum(torch.tensor([float(code)]))[0])
        if verdict == 1:
            shutdown(together=False)
            raise refusal if refusal is not None else UserError(f"rank 0 refused out={cfg.out} (its log says why)")
        if verdict == 2:
            shutdown()
            if env.is_main:
                print(f"{cfg.out} already finished at step {state.step} (steps={cfg.steps}); the {what} is in "
                      f"{state.model} -- raise steps= to train further")
            return 0
        return _run_training(cfg, train, what)


def _allowed_changes(items, cfg) -> set[str]:
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    allow = {k.strip() for item in (items or []) for k in item.split(",") if k.strip()}
    unknown = sorted(allow - names)
    if unknown:
        raise UserError(f"--allow-changed: unknown config key(s) {', '.join(unknown)}")
    return allow


def _run_training(cfg, train, what: str) -> int:
    from anystep.distributed import setup, shutdown
    from anystep.train.checkpoint import CheckpointError

    env = setup()
    try:
        folder = train(cfg)
    except CheckpointError as e:
        shutdown(together=False)
        raise UserError(str(e)) from None
    except RuntimeError as e:  # DistBackendError included: a peer died or hung mid-collective
        if not env.distributed:
            raise
        shutdown(together=False)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {env.rank} stopped ({first}); if another rank failed, its log says why; the last "
                        f"complete checkpoint in {getattr(cfg, 'out', '?')}/checkpoint is kept") from None
    shutdown()
    if env.is_main:
        print(f"{what} written to {folder}")
    return 0


def _check_reproduce_out(out: Path) -> None:
    """A reproduction resumes in its own folder (marker, or job records of an older run); a foreign
    non-empty folder is refused."""
    from anystep.fsutil import check_parent_writable, has_entries, read_marker

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
    from anystep.reproduce import SettingsChanged, reproduce

    if args.teacher is not None and _load(args.teacher).kind != "teacher":
        raise UserError(f"{args.teacher}: --teacher must be a Wan teacher folder")
    out = Path(args.out)
    _check_reproduce_out(out)
    command = "anystep " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("anystep") else ""
    from anystep.fsutil import folder_lock, write_marker

    try:
        with folder_lock(out):
            write_marker(out, "reproduce")
            reproduce(out, quick=args.quick, teacher=args.teacher, measure_cost=not args.no_cost, command=command)
    except SettingsChanged as e:
        raise UserError(str(e)) from None
    print(f"report written to {out / 'report.md'}")
    return 0


def cmd_synth(args) -> int:
    from anystep.data.shards import ShardError, check_shard_out, write_synthetic
    from anystep.fsutil import folder_lock

    prompts = _read_prompts(args)
    check_shard_out(Path(args.out))  # before the lock file goes into it
    model = _load(args.teacher)
    if model.kind != "teacher":
        raise UserError(f"{args.teacher}: synthetic data comes from a Wan teacher folder, got a {model.kind!r} folder")
    if args.steps < 1 or args.shard_size < 1:
        raise UserError("--steps and --shard-size must be >= 1")
    num_frames = args.num_frames if args.num_frames is not None else _default_frames(model)
    try:
        _check_frames(model, num_frames, args.height, args.width)
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
    from anystep.export import ExportError, export_run
    from anystep.fsutil import check_out_folder
    from anystep.models.folders import ModelFolderError

    check_out_folder(args.out, "model", overwrite=args.overwrite)
    try:
        dest = export_run(args.run, args.out, lora_file=args.lora_file, use_ema=not args.no_ema)
    except (ExportError, ModelFolderError) as e:
        raise UserError(str(e)) from None
    print(f"exported to {dest}" + (" (LoRA in pytorch_lora_weights.safetensors)" if args.lora_file else ""))
    return 0


def cmd_encode(args) -> int:
    from anystep.data.shards import ShardError, encode_clips

    model = _load(args.model)
    if args.shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    from anystep.data.shards import check_shard_out
    from anystep.fsutil import folder_lock

    check_shard_out(Path(args.out))  # before the lock file goes into it
    try:
        with folder_lock(args.out):
            paths = encode_clips(model, args.clips, args.out, shard_size=args.shard_size)
    except (ShardError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"{len(paths)} shard(s) in {args.out}")
    return 0


def cmd_student(args) -> int:
    from anystep.models.folders import ModelFolderError
    from anystep.models.students import student_folder_from_teacher

    from anystep.fsutil import check_out_folder

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
    from anystep.plot import PlotError, plot_run

    try:
        out = plot_run(args.run, args.out)
    except PlotError as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")
    return 0


def _train_method_help(argv: list[str]) -> bool:
    """`anystep train METHOD --help`: the usual help, then every config key of that method."""
    if len(argv) < 2 or argv[0] != "train" or not ({"-h", "--help"} & set(argv)):
        return False
    from anystep.train.registry import method_info, method_names

    if argv[1] not in method_names():
        return False
    from anystep.config_help import config_keys_help

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    print(sub.format_help())
    print(config_keys_help(method_info(argv[1]).config))
    return True


def build_parser() -> argparse.ArgumentParser:
    from anystep import __version__
    from anystep.train.registry import method_names

    p = _Parser(prog="anystep", description="AnyFlow any-step video diffusion distillation on diffusers.")
    p.add_argument("--version", action="version", version=f"anystep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate clips at any step count")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", help="one prompt (or --prompts FILE)")
    g.add_argument("--prompts", help="a file with one prompt per line")
    g.add_argument("--steps", type=int, default=4, help="sampling steps (network calls per clip: x2 for a guided teacher)")
    g.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    g.add_argument("--out", required=True, help="an .mp4 for one prompt, a folder for a prompt file")
    g.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the model's)")
    g.add_argument("--height", type=int, default=32, help="pixels")
    g.add_argument("--width", type=int, default=32, help="pixels")
    g.add_argument("--guidance-scale", type=float, default=None, help="teacher default 4.0; students 1.0")
    g.add_argument("--batch-size", type=int, default=16, help="clips generated together")
    g.add_argument("--image", default=None, help="FAR models: image-to-video from this first frame")
    g.add_argument("--video", default=None, help="FAR models: video-to-video continuing this clip's first chunks")
    g.add_argument("--fps", type=int, default=4, help="frames per second of the mp4")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .png)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="score a model: ToyBench at several step counts (default) or VBench")
    e.add_argument("suite", nargs="?", default="toybench", choices=["toybench", "vbench"])
    e.add_argument("--model", required=True)
    e.add_argument("--steps", default="1,2,4,8,16,32")
    e.add_argument("--out", required=True)
    e.add_argument("--n-prompts", type=int, default=40)
    e.add_argument("--colors", default=None, help="toybench on a shifted domain, e.g. magenta,cyan,white")
    e.add_argument("--directions", default=None, help="toybench on a shifted domain, e.g. up-left,down-right")
    e.add_argument("--prompts", default=None, help="vbench: prompt file (names the videos)")
    e.add_argument("--augmented", default=None, help="vbench: augmented prompts, line by line, fed to the model")
    e.add_argument("--num-frames", type=int, default=None)
    e.add_argument("--guidance-scale", type=float, default=None,
                   help="toybench: CFG of a teacher / flow-matching student (default 4.0)")
    e.add_argument("--context-frames", type=int, default=0,
                   help="toybench, FAR models: continue the first N frames of each prompt's real clip (1 = image-to-video)")
    e.add_argument("--sampler", choices=["flowmap", "consistency"], default=None,
                   help="toybench: sample a flow-map or consistency student with this sampler instead of its own")
    e.add_argument("--teacher-reference", default=None,
                   help="toybench: also the Frechet distance to this teacher's 50-step samples of the same prompts and seeds")
    e.add_argument("--height", type=int, default=32)
    e.add_argument("--width", type=int, default=32)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="train a model")
    t.add_argument("method", choices=method_names())
    t.add_argument("--config", default=None)
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--allow-changed", action="append", default=[], metavar="KEY[,KEY]",
                   help="resume a run although these config keys changed (the new values apply from the resumed step)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("reproduce", help="the paper in miniature: train every method, sweep NFE, write the report")
    r.add_argument("--out", required=True)
    r.add_argument("--quick", action="store_true", help="the ~15-minute CPU version (the README's main job)")
    r.add_argument("--teacher", default=None, help="a Wan teacher folder (default: the shipped toy teacher)")
    r.add_argument("--no-cost", action="store_true", help="skip the per-iteration cost measurement")
    r.set_defaults(func=cmd_reproduce)

    y = sub.add_parser("synth", help="teacher-generated training data: latents + text embeddings in shards")
    y.add_argument("--teacher", required=True)
    y.add_argument("--prompt", default=None)
    y.add_argument("--prompts", default=None, help="a file with one prompt per line")
    y.add_argument("--out", required=True)
    y.add_argument("--steps", type=int, default=50)
    y.add_argument("--guidance", type=float, default=4.0, help="CFG in the usual form (the reference real score's 1 + 3)")
    y.add_argument("--num-frames", type=int, default=None)
    y.add_argument("--height", type=int, default=32)
    y.add_argument("--width", type=int, default=32)
    y.add_argument("--shard-size", type=int, default=16)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=cmd_synth)

    c = sub.add_parser("encode", help="your own clips (name.mp4 + name.txt caption) -> training shards")
    c.add_argument("--model", required=True, help="the model folder whose codec and text encoder to use")
    c.add_argument("--clips", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--shard-size", type=int, default=16)
    c.set_defaults(func=cmd_encode)

    x = sub.add_parser("export", help="a training run's checkpoint -> a diffusers folder (LoRA merged or separate)")
    x.add_argument("--run", required=True, help="a training output folder (holds checkpoint/, written by any number of ranks)")
    x.add_argument("--out", required=True)
    x.add_argument("--lora-file", action="store_true", help="keep the LoRA as pytorch_lora_weights.safetensors")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out model folder written by anystep")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("student", help="build a flow-map student folder from a Wan teacher folder")
    s.add_argument("--teacher", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--causal", action="store_true", help="AnyFlow-FAR (causal) instead of bidirectional")
    s.add_argument("--chunk-partition", default=None, help="e.g. 1,3,3,3,3 (causal only)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out model folder written by anystep")
    s.set_defaults(func=cmd_student)
    pl = sub.add_parser("plot", help="a training run's loss curves as a PNG")
    pl.add_argument("run", help="a training run's out folder (holds metrics.jsonl)")
    pl.add_argument("--out", default=None, help="the PNG (default: RUN/losses.png)")
    pl.set_defaults(func=cmd_plot)
    return p


def _report(line: str) -> None:
    """The one error line, on a line of its own: a progress bar left open by the failure is closed first."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except Exception:  # never let the bars hide the message
        pass
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the single place where failures become one ``anystep: error:`` line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if _train_method_help(list(sys.argv[1:] if argv is None else argv)):
            return 0
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # argparse cannot interleave a nargs="*" positional with options, so key=value
        # overrides that follow an option arrive here.
        if getattr(args, "overrides", None) is not None:
            args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
            extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
        if extra:
            raise UserError(f"anystep: unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except UserError as e:
        _report(message_line(e))
        return EXIT_USER
    except KeyboardInterrupt:
        _report("anystep: error: interrupted (Ctrl-C); files written before are kept as they were")
        return EXIT_INTERRUPTED
    except FloatingPointError as e:
        _report(f"anystep: error: training diverged: {str(e).splitlines()[0]}; try a lower lr, a longer warmup or a "
                "smaller grad_clip; the last checkpoint is kept and resumes with the same command")
        return EXIT_USER
    except BrokenPipeError:  # `anystep ... | head` closed the pipe: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        _report(f"anystep: error: {line}")
        return EXIT_USER
    except Exception as e:
        line = disk_full_line(e)
        if line is None:
            raise  # a bug: its traceback, exit code 1
        _report(f"anystep: error: {line}")
        return EXIT_USER


if __name__ == "__main__":
    sys.exit(main())
