"""ToyBench of a toy teacher with its prompt read as N zero-padded text rows (8: how toy teachers
were trained before 2026-12-04; 512: diffusers' default, what a user of the stock pipeline gets).

    python scripts/text_padding_check.py --model OLD_OR_NEW_FOLDER --rows 8 --steps 16,50 --out D

A folder from before the change (tokenizer ``model_max_length`` 8) is read from a temporary copy
that only says 512, since ``load_model`` refuses it as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import anystep.eval.toybench_run as toybench_run
from anystep.models.loaded import load_model
from anystep.models.padded_text import use_padded_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", type=int, choices=(8, 512), required=True)
    ap.add_argument("--steps", default="16,50")
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--num-frames", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / Path(args.model).name
        shutil.copytree(args.model, folder)
        cfg_path = folder / "tokenizer" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = 512
        cfg_path.write_text(json.dumps(cfg))

        def load(f):
            model = load_model(f)
            use_padded_text(model.transformer, args.rows)  # 8: the pads the old training saw
            return model

        toybench_run.load_model = load
        res = toybench_run.run_toybench(folder, steps=[int(s) for s in args.steps.split(",")], out_dir=args.out,
                                        n_prompts=args.n_prompts, num_frames=args.num_frames)
    for k, r in res["results"].items():
        print(f"rows {args.rows} steps {k}x2: Total {r['Total']:.1f} Quality {r['Quality']:.1f} Semantic "
              f"{r['Semantic']:.1f} digit {r.get('digit_accuracy', float('nan')):.3f} colour "
              f"{r.get('color_accuracy', float('nan')):.3f} direction {r.get('direction_accuracy', float('nan')):.3f} "
              f"FD {r.get('frechet', float('nan')):.1f}")


if __name__ == "__main__":
    main()
