"""``anystep`` command line: the parser and the one place failures become an error line.

Every user mistake (bad folder, bad flag value, bad recipe) ends in one ``anystep: error: ...``
line on stderr and exit code 2, with nothing half-written left behind. The commands live in
:mod:`anystep.commands`; a command's module is imported when it runs (``args.func`` names it), so
``anystep --help`` loads neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from anystep import __version__
from anystep.config_help import config_keys_help
from anystep.errors import EXIT_INTERRUPTED, EXIT_USER, UserError, disk_full_line, message_line, os_error_line
from anystep.train.registry import method_info, method_names

class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)  # every help shows its default
        super().__init__(*args, **kw)

    def error(self, message):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message}")


def _train_method_help(argv: list[str]) -> bool:
    """`anystep train METHOD --help`: the usual help, then every config key of that method."""
    if len(argv) < 2 or argv[0] != "train" or not ({"-h", "--help"} & set(argv)):
        return False
    if argv[1] not in method_names():
        return False
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    print(sub.format_help())
    print(config_keys_help(method_info(argv[1]).config))
    return True


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="anystep", description="AnyFlow any-step video diffusion distillation on diffusers.")
    p.add_argument("--version", action="version", version=f"anystep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate clips at any step count")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", help="one prompt (or --prompts FILE)")
    g.add_argument("--prompts", help="a file with one prompt per line")
    g.add_argument("--steps", type=int, default=4, help="sampling steps (network calls per clip: x2 for a guided teacher)")
    g.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    g.add_argument("--out", required=True, help="an .mp4 for one prompt (its labelled frame grid beside it as .png); for a "
                   "prompt file, a folder of NNNN-<prompt>.mp4 clips and grid.png")
    g.add_argument("--num-frames", type=int, default=None, help="frames per clip (default: the model's)")
    g.add_argument("--height", type=int, default=32, help="pixels")
    g.add_argument("--width", type=int, default=32, help="pixels")
    g.add_argument("--guidance-scale", type=float, default=None, help="teacher default 4.0; students 1.0")
    g.add_argument("--batch-size", type=int, default=16, help="clips generated together")
    g.add_argument("--image", default=None, help="FAR models: image-to-video from this first frame")
    g.add_argument("--video", default=None, help="FAR models: video-to-video continuing this clip's first chunks")
    g.add_argument("--fps", type=int, default=4, help="frames per second of the mp4")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .png)")
    g.set_defaults(func="generate:cmd_generate")

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
    e.set_defaults(func="evaluate:cmd_eval")

    t = sub.add_parser("train", help="train a model")
    t.add_argument("method", choices=method_names())
    t.add_argument("--config", default=None)
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--allow-changed", action="append", default=[], metavar="KEY[,KEY]",
                   help="resume a run although these config keys changed (the new values apply from the resumed step)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.set_defaults(func="train:cmd_train")

    r = sub.add_parser("reproduce", help="the paper in miniature: train every method, sweep NFE, write the report")
    r.add_argument("--out", required=True)
    r.add_argument("--quick", action="store_true", help="the ~8-minute CPU version (the README's main job)")
    r.add_argument("--teacher", default=None, help="a Wan teacher folder (default: the shipped toy teacher)")
    r.add_argument("--no-cost", action="store_true", help="skip the per-iteration cost measurement")
    r.set_defaults(func="tools:cmd_reproduce")

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
    y.set_defaults(func="tools:cmd_synth")

    c = sub.add_parser("encode", help="your own clips (name.mp4 + name.txt caption) -> training shards")
    c.add_argument("--model", required=True, help="the model folder whose codec and text encoder to use")
    c.add_argument("--clips", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--shard-size", type=int, default=16)
    c.set_defaults(func="tools:cmd_encode")

    x = sub.add_parser("export", help="a training run's checkpoint -> a diffusers folder (LoRA merged or separate)")
    x.add_argument("--run", required=True, help="a training output folder (holds checkpoint/, written by any number of ranks)")
    x.add_argument("--out", required=True)
    x.add_argument("--lora-file", action="store_true", help="keep the LoRA as pytorch_lora_weights.safetensors")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out model folder written by anystep")
    x.set_defaults(func="tools:cmd_export")

    s = sub.add_parser("student", help="build a flow-map student folder from a Wan teacher folder")
    s.add_argument("--teacher", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--causal", action="store_true", help="AnyFlow-FAR (causal) instead of bidirectional")
    s.add_argument("--chunk-partition", default=None, help="e.g. 1,3,3,3,3 (causal only)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out model folder written by anystep")
    s.set_defaults(func="tools:cmd_student")
    st = sub.add_parser("studio", help="a web page to try a model at any step count (the anystep[studio] extra)")
    st.add_argument("--model", action="append", required=True, help="a model folder; repeat to compare two models")
    st.add_argument("--port", type=int, default=7860, help="the port to serve the page on")
    st.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    st.set_defaults(func="tools:cmd_studio")
    pl = sub.add_parser("plot", help="a training run's loss curves as a PNG")
    pl.add_argument("run", help="a training run's out folder (holds metrics.jsonl)")
    pl.add_argument("--out", default=None, help="the PNG (default: RUN/losses.png)")
    pl.set_defaults(func="tools:cmd_plot")
    return p


def _report(line: str) -> None:
    """The one error line, on a line of its own: a progress bar left open by the failure is closed first."""
    try:
        from tqdm import tqdm  # lazy: only a failure needs it, and --help must not pay for it

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
        module, func = args.func.split(":")
        return int(getattr(importlib.import_module(f"anystep.commands.{module}"), func)(args) or 0)
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
