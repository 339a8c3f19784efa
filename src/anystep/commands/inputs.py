"""Command-line inputs every command checks the same way: step lists, prompts, model folders, frame counts."""

from __future__ import annotations

from pathlib import Path

from anystep.errors import UserError
from anystep.models.folders import ModelFolderError
from anystep.models.loaded import load_model


def steps_list(text: str) -> list[int]:
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


def read_prompts(args) -> list[str]:
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


def load(folder):
    try:
        return load_model(folder)
    except ModelFolderError as e:
        raise UserError(str(e)) from None


def positive(args, *names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def default_frames(model) -> int:
    if model.kind == "anyflow_far":
        return int(sum(model.transformer.config.chunk_partition))
    return 7


def check_frames(model, num_frames: int, height: int, width: int) -> None:
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
