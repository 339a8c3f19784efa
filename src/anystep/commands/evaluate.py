"""``anystep eval``: ToyBench at several step counts, or VBench's videos and scores."""

from __future__ import annotations

import json
from pathlib import Path

from anystep.commands.inputs import check_frames, default_frames, load, steps_list
from anystep.data.moving_digits import WorldConfig
from anystep.errors import UserError
from anystep.eval.toybench_run import run_toybench
from anystep.eval.vbench import (
    VBenchInputError,
    generate_vbench_videos,
    read_prompt_pairs,
    score_with_vbench,
    vbench_available,
)
from anystep.fsutil import atomic_write, check_parent_writable, folder_lock, has_entries
from anystep.report import bootstrap_ci


def cmd_eval(args) -> int:
    if args.suite == "vbench":
        return _eval_vbench(args)
    steps = steps_list(args.steps)
    if args.n_prompts < 1:
        raise UserError(f"--n-prompts must be >= 1, got {args.n_prompts}")
    _check_eval_out(Path(args.out), "toybench.json")
    model = load(args.model)
    canvas = WorldConfig().canvas
    if (args.height, args.width) != (canvas, canvas):
        raise UserError(f"eval toybench scores the {canvas}x{canvas} toy world; --height/--width apply to vbench only")
    if args.num_frames is not None:
        check_frames(model, args.num_frames, args.height, args.width)
    del model  # validated; run_toybench loads it itself
    domain = {}
    for key in ("colors", "directions"):
        value = getattr(args, key)
        if value:
            domain[key] = tuple(v.strip() for v in value.split(",") if v.strip())
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
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    if out.is_dir() and has_entries(out) and not (out / result_file).exists() and not (out / "videos").is_dir():
        raise UserError(f"--out {out} is a non-empty folder that holds no {result_file}; it is left as it is: choose a "
                        "new or empty --out")
    check_parent_writable(out / "x")


def _eval_vbench(args) -> int:
    steps = steps_list(args.steps)
    if len(steps) != 1:
        raise UserError("eval vbench takes one --steps value")
    if args.prompts is None:
        raise UserError("eval vbench needs --prompts FILE (one VBench prompt per line)")
    _check_eval_out(Path(args.out), "vbench.json")
    try:
        pairs = read_prompt_pairs(args.prompts, args.augmented)
    except VBenchInputError as e:
        raise UserError(str(e)) from None
    model = load(args.model)
    num_frames = args.num_frames if args.num_frames is not None else default_frames(model)
    try:
        check_frames(model, num_frames, args.height, args.width)
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
