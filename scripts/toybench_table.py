"""Markdown table of ToyBench results at chosen NFE from ``toybench.json`` files, with bootstrap 95%
intervals over prompts (the same intervals ``anystep reproduce``'s report uses).

    python scripts/toybench_table.py --nfe 2,4,32,100 EVAL_DIR [EVAL_DIR ...]

Each EVAL_DIR holds one ``toybench.json`` (``anystep eval --out``, or ``<run>/eval/<arch>/<method>``
of a reproduction). For reading a run whose evaluations finished but whose report was not written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from anystep.report import bootstrap_ci

COLUMNS = ("imaging_sharpness", "imaging_grain", "digit_accuracy")


def table(dirs, nfes) -> str:
    lines = ["| eval | NFE | Total [95% CI] | Quality | Semantic | sharpness | grain | digit % | FD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in dirs:
        res = json.loads((Path(d) / "toybench.json").read_text())
        for row in sorted(res["results"].values(), key=lambda r: r["nfe"]):
            if int(row["nfe"]) not in nfes:
                continue
            m, lo, hi = bootstrap_ci(row["per_clip"]["total"])
            extra = " | ".join(f"{row[k]:.1f}" for k in COLUMNS)
            lines.append(f"| {Path(d).name} | {row['nfe']} | {m:.1f} [{lo:.1f}, {hi:.1f}] | {row['Quality']:.1f} | "
                         f"{row['Semantic']:.1f} | {extra} | {row['frechet']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--nfe", default="4,32", help="comma list of NFE to show")
    args = ap.parse_args(argv)
    print(table(args.dirs, {int(x) for x in args.nfe.split(",")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
