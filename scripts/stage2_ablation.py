"""Stage-2 ablation of bidirectional AnyFlow on the toy world (issue 18, item 6).

From one Stage-1 folder (the full reproduction's ``bidirectional/stage1/model``) and its teacher
(``teacher_ft/model``), trains AnyFlow's Stage 2 once per row - the full-mode recipe of
``anystep reproduce`` with one setting changed - and scores every row with ToyBench at 4 and 32
NFE (each row's own sampler, 40 prompts, bootstrap 95% intervals, FD to real clips). Rows are
independent and resumable: a finished row is reused, as in ``anystep reproduce``.

The ``consistency_*`` and ``flowmap_consistency_*`` rows train the two consistency baselines with
the same change, so that a setting that helps AnyFlow is also given to what it is compared with;
they need ``--consistency-init`` (the run's ``bidirectional/consistency_init/model``).

    python scripts/stage2_ablation.py --stage1 RUN/bidirectional/stage1/model --teacher RUN/teacher_ft/model \
        --consistency-init RUN/bidirectional/consistency_init/model --out DIR

Causal rows (``--arch causal``) start from the run's ``causal/`` folders and teacher fine-tune; full
mode gives causal jobs half the iterations, so ``--scale 0.5`` keeps its proportions.

Writes ``DIR/ablation.json`` and ``DIR/ablation.md`` after every row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from anystep.fsutil import atomic_write
from anystep.reproduce import CAUSAL_FRAMES, FULL, OTHER_SAMPLER, Job, _eval, _toy, run_job
from anystep.report import bootstrap_ci

# name -> (what it tests, Stage-2 config overrides on top of the full-mode recipe, start); start is
# the student folder a row begins from: AnyFlow's Stage 1 or the consistency ODE-init.
ROWS = {
    "recipe": ("the full-mode recipe: 200 iterations, lr 1e-4, full fine-tune, EMA 0.99", {}, "stage1"),
    "iters_800": ("4x the iterations (the reference runs 800-1200)", {"steps": 800}, "stage1"),
    "iters_1200": ("6x the iterations (the top of the reference's range)", {"steps": 1200}, "stage1"),
    "reference_lr_lora": ("the reference's optimiser: lr 2e-6 with LoRA (rank 64), 800 iterations",
                          {"steps": 800, "lr": 2e-6, "critic_lr": 2e-6, "lora_rank": 64, "lora_alpha": 64}, "stage1"),
    "budgets_1_2_4": ("few-step rollout budgets s ~ U{1, 2, 4} instead of {2, 4, 8, 16, 50}", {"step_budgets": [1, 2, 4]},
                      "stage1"),
    "no_ema": ("the raw weights instead of the EMA (decay 0)", {"ema_decay": 0.0}, "stage1"),
    "no_stage1": ("no co-trained Stage-1 term (DMD alone)", {"stage1_weight": 0.0}, "stage1"),
    "consistency_recipe": ("baseline: consistency ODE-init + consistency BS, the full-mode recipe",
                           {"rollout": "consistency"}, "consistency_init"),
    "consistency_iters_800": ("baseline: consistency ODE-init + consistency BS, 4x the iterations",
                              {"rollout": "consistency", "steps": 800}, "consistency_init"),
    "consistency_iters_1200": ("baseline: consistency ODE-init + consistency BS, 6x the iterations",
                               {"rollout": "consistency", "steps": 1200}, "consistency_init"),
    "flowmap_consistency_iters_800": ("baseline: flow-map training + consistency BS, 4x the iterations",
                                      {"rollout": "consistency", "steps": 800}, "stage1"),
}


def row_scores(res: dict) -> dict:
    out = {}
    for s, row in res["results"].items():
        m, lo, hi = bootstrap_ci(row["per_clip"]["total"])
        out[s] = {"nfe": row["nfe"], "Total": m, "low": lo, "high": hi, "frechet": row["frechet"],
                  "digit_accuracy": row["digit_accuracy"], "imaging_sharpness": row["imaging_sharpness"],
                  "imaging_grain": row["imaging_grain"]}
    return out


def markdown(results: dict) -> str:
    lines = ["| row | what | Total @4 | FD @4 | Total @32 | FD @32 | digit @4 / @32 | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        c4, c32 = r["scores"].get("4"), r["scores"].get("32")
        cell = lambda c: f"{c['Total']:.1f} [{c['low']:.1f}, {c['high']:.1f}]" if c else "n/a"  # noqa: E731
        fd = lambda c: f"{c['frechet']:.1f}" if c else "n/a"  # noqa: E731
        dig = f"{c4['digit_accuracy']:.0f} / {c32['digit_accuracy']:.0f}" if c4 and c32 else "n/a"
        lines.append(f"| {name} | {r['what']} | {cell(c4)} | {fd(c4)} | {cell(c32)} | {fd(c32)} | {dig} | {r['train_seconds']:.0f} |")
    crossed = {name: r for name, r in results.items() if r.get("cross")}
    if crossed:
        lines += ["", "The same weights under the other sampler (`--cross`): Total [95% CI] (FD).", "",
                  "| row | own sampler | other sampler | own @4 | other @4 | own @32 | other @32 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in crossed.items():
            both = [(r["scores"].get(s), r["cross"]["scores"].get(s)) for s in ("4", "32")]
            cells = " | ".join(f"{cell(c)} ({fd(c)})" for pair in both for c in pair)
            lines.append(f"| {name} | {r['sampler']} | {r['cross']['sampler']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", required=True, help="Stage-1 AnyFlow folder every row starts from")
    ap.add_argument("--teacher", required=True, help="teacher folder: critic start (and codec of the real score)")
    ap.add_argument("--consistency-init", help="consistency ODE-init folder the consistency_* rows start from")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--n-prompts", type=int, default=40)
    ap.add_argument("--cross", action="store_true", help="also score each row under the other sampler (the report's cross table)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every row's iterations (causal rows as in full mode: 0.5; a smoke test: 0.01)")
    ap.add_argument("--arch", choices=("bidirectional", "causal"), default="bidirectional",
                    help="causal: the run's causal/ folders, 13-frame clips, a FAR student (Stage 1 and ODE-init causal too)")
    args = ap.parse_args(argv)
    names = args.rows.split(",")
    # Checked before any row trains: a bad name or a missing folder must not surface an hour in.
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if not args.consistency_init and any(ROWS[n][2] == "consistency_init" for n in names):
        ap.error("the consistency_* rows need --consistency-init")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    causal = args.arch == "causal"
    base = {**_toy("stage2"), "student": args.stage1, "teacher": args.teacher, "rollout": "flowmap",
            "steps": FULL.stage2, "num_frames": CAUSAL_FRAMES if causal else 7, "causal": causal,
            "real_score": FULL.real_score,
            "real_score_clips": FULL.real_score_clips, "threads": 0}
    path = out / "ablation.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        what, over, start = ROWS[name]
        student = args.consistency_init if start == "consistency_init" else args.stage1
        cfg = {**base, "student": student, **over, "out": str(out / name)}
        cfg["steps"] = max(1, round(cfg["steps"] * args.scale))
        t0 = time.time()
        folder = run_job(Job(name, "stage2", cfg))
        trained = time.time() - t0
        res = _eval(str(folder), (4, 32), out / "eval" / name, args.n_prompts)
        own = cfg["rollout"]  # each Stage-2 student samples as it was rolled out in training
        previous = results.get(name, {})
        results[name] = {"what": what, "overrides": over, "sampler": own, "scores": row_scores(res),
                         "train_seconds": previous.get("train_seconds", trained)}
        if args.cross or previous.get("cross"):
            other = OTHER_SAMPLER[own]
            res = _eval(str(folder), (4, 32), out / "eval" / f"{name}_{other}_sampler", args.n_prompts, sampler=other)
            results[name]["cross"] = {"sampler": other, "scores": row_scores(res)}
        atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))
        atomic_write(out / "ablation.md", lambda f: f.write(markdown(results).encode()))
        print(f"[ablation] {name}: " + ", ".join(f"{s} NFE Total {c['Total']:.1f} [{c['low']:.1f}, {c['high']:.1f}]"
                                                 for s, c in results[name]["scores"].items()), flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
