"""The reproduction report: paper Table 2 / Table 3 analogues with bootstrap intervals, the
test-time scaling plot (Fig. 1a) and the side-by-side sample grid (Fig. 1b).

Everything here is a pure function of ``results.json`` (written by :mod:`anystep.reproduce`), so
a report can be rebuilt, or two runs compared, without touching a model. Layout of the part read
here::

    {"meta": {...},
     "architectures": {arch: {"methods": {method: {"label": str, "sweep": {str(steps): {
         "steps", "nfe", "Quality", "Semantic", "Total", "per_clip": {"quality", "semantic", "total"}}}}}}},
     "cost": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from anystep.fsutil import atomic_write

SCORES = ("Quality", "Semantic", "Total")
PER_CLIP_KEY = {"Quality": "quality", "Semantic": "semantic", "Total": "total"}
TABLE_NFE = (4, 32)  # the paper's Table 2 columns
TEACHER_REFERENCE_STEPS = 50  # Table 3: the teacher at 50 steps with guidance (NFE 100)


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over prompts of the mean of ``values``.

    Resamples the prompt list with replacement ``n_boot`` times; the interval is the central
    ``level`` mass of the resampled means (percentile method, linear interpolation)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D list of per-prompt values")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(v.mean()), float(lo), float(hi)


def row_at_nfe(sweep: dict, nfe: int) -> dict | None:
    """The sweep entry with exactly ``nfe`` network evaluations per clip, if any."""
    for r in sweep.values():
        if int(r["nfe"]) == int(nfe):
            return r
    return None


def score_with_ci(row: dict, key: str, n_boot: int = 2000) -> dict:
    m, lo, hi = bootstrap_ci(row["per_clip"][PER_CLIP_KEY[key]], n_boot=n_boot)
    return {"mean": m, "low": lo, "high": hi}


def _fmt(ci: dict | None) -> str:
    if ci is None:
        return "n/a"
    return f"{ci['mean']:.1f} [{ci['low']:.1f}, {ci['high']:.1f}]"


def table2(results: dict, n_boot: int = 2000) -> dict:
    """{arch: {method: {nfe: {score: ci}}}} at the Table 2 NFE columns."""
    out: dict = {}
    for arch, a in results["architectures"].items():
        out[arch] = {}
        for method, m in a["methods"].items():
            cells = {}
            for nfe in TABLE_NFE:
                row = row_at_nfe(m["sweep"], nfe)
                cells[str(nfe)] = {k: score_with_ci(row, k, n_boot) for k in SCORES} if row else None
            out[arch][method] = cells
    return out


def _teacher(results: dict) -> tuple[str, dict] | None:
    for a in results["architectures"].values():
        for method, m in a["methods"].items():
            if m.get("is_teacher"):
                return method, m
    return None


def _teacher_reference(results: dict, arch: str) -> dict | None:
    """The teacher's row at 50x2 that ``arch``'s students are held against: the architecture's own
    (the causal one is scored on 13-frame clips) or else the shared teacher row."""
    own = results["architectures"].get(arch, {}).get("teacher_reference")
    if own is not None:
        return own
    t = _teacher(results)
    return t[1]["sweep"].get(str(TEACHER_REFERENCE_STEPS)) if t is not None else None


def table3(results: dict, n_boot: int = 2000) -> dict:
    """Teacher at 50 steps with guidance against AnyFlow (every architecture) at 4 and 32 NFE."""
    out: dict = {}
    t = _teacher(results)
    if t is not None:
        row = t[1]["sweep"].get(str(TEACHER_REFERENCE_STEPS))
        if row is not None:
            out[f"teacher {TEACHER_REFERENCE_STEPS}x2"] = {"nfe": int(row["nfe"]), **{k: score_with_ci(row, k, n_boot) for k in SCORES}}
    for arch, a in results["architectures"].items():
        own = a.get("teacher_reference")
        if own is not None:
            out[f"teacher {TEACHER_REFERENCE_STEPS}x2, {arch} clips ({own.get('num_frames', 13)} frames)"] = {
                "nfe": int(own["nfe"]), **{k: score_with_ci(own, k, n_boot) for k in SCORES}}
    for arch, a in results["architectures"].items():
        rs = a["methods"].get("real_score")
        row = rs["sweep"].get(str(TEACHER_REFERENCE_STEPS)) if rs else None
        if row is not None:
            out[f"real score (exact empirical flow) {TEACHER_REFERENCE_STEPS}x2, {arch} clips"] = {
                "nfe": int(row["nfe"]), **{k: score_with_ci(row, k, n_boot) for k in SCORES}}
    for arch, a in results["architectures"].items():
        m = a["methods"].get("anyflow")
        if m is None:
            continue
        for nfe in TABLE_NFE:
            row = row_at_nfe(m["sweep"], nfe)
            if row is not None:
                out[f"AnyFlow {arch} {nfe} NFE"] = {"nfe": nfe, **{k: score_with_ci(row, k, n_boot) for k in SCORES}}
    return out


def _total(m: dict | None, nfe: int) -> dict | None:
    if m is None:
        return None
    row = row_at_nfe(m["sweep"], nfe)
    return score_with_ci(row, "Total") if row else None


def claims(results: dict) -> list[dict]:
    """The paper's claims, checked on these numbers. A claim "holds" when the point estimates
    point its way; the verdict adds whether the two 95% intervals separate or overlap."""
    out = []

    def check(text, a, b, better: str, margin: float = 0.0):
        if a is None or b is None:
            out.append({"claim": text, "verdict": "not measured"})
            return
        diff = a["mean"] - b["mean"]
        holds = diff > margin if better == "greater" else diff >= margin
        separate = a["low"] > b["high"] or b["low"] > a["high"]
        verdict = ("holds" if holds else "does not hold") + (
            " (intervals separate)" if separate else " (within the 95% intervals)")
        if margin and not holds and diff > 0:
            verdict += f" (a gain of {diff:.2f}, below the {margin:g}-point bar)"  # 2 decimals: 4.99 must not print as 5.0
        out.append({"claim": text, "verdict": verdict, "a": a, "b": b, "difference": diff})

    for arch, a in results["architectures"].items():
        ms = a["methods"]
        any_ = ms.get("anyflow")
        check(f"{arch}: AnyFlow does not degrade from 4 to 32 NFE (Total at 32 >= at 4)",
              _total(any_, 32), _total(any_, 4), "not_less")
        for base in ("consistency", "flowmap_consistency"):
            if base in ms:
                check(f"{arch}: AnyFlow beats {ms[base]['label']} at 4 NFE", _total(any_, 4), _total(ms[base], 4), "greater")
                check(f"{arch}: AnyFlow beats {ms[base]['label']} at 32 NFE", _total(any_, 32), _total(ms[base], 32), "greater")
        if "consistency" in ms:
            c = ms["consistency"]
            check(f"{arch}: the consistency baseline degrades from 4 to 32 NFE (Total at 4 > at 32)",
                  _total(c, 4), _total(c, 32), "greater")
    for arch, a in results["architectures"].items():
        trow = _teacher_reference(results, arch)
        if trow is None:
            continue
        check(f"{arch}: AnyFlow at 4 NFE matches the teacher at {TEACHER_REFERENCE_STEPS}x2 (Total >=)",
              _total(a["methods"].get("anyflow"), 4), score_with_ci(trow, "Total"), "not_less")
    for arch, a in results["architectures"].items():
        ms = a["methods"]
        rs = ms.get("real_score")
        # Each architecture's own ceiling (13-frame clips for the causal one) where recorded.
        real = a.get("real") or results.get("meta", {}).get("real")
        if rs is not None:
            top = rs["sweep"].get(str(TEACHER_REFERENCE_STEPS))
            if top is not None and real:
                ci = score_with_ci(top, "Total")
                gap = real["Total"] - ci["mean"]
                out.append({"claim": f"{arch}: the real score at {2 * TEACHER_REFERENCE_STEPS} NFE is within 10 Total "
                                     f"of held-out real clips ({real['Total']:.1f})",
                            "verdict": "holds" if gap <= 10 else "does not hold", "a": ci,
                            "b": {"mean": real["Total"], "low": real["Total"], "high": real["Total"]}, "difference": -gap})
                check(f"{arch}: AnyFlow at 4 NFE matches the real score it distils at {TEACHER_REFERENCE_STEPS}x2 (Total >=)",
                      _total(ms.get("anyflow"), 4), ci, "not_less")
        # The paper's flow-matching model gains 9.2 Total from 4x2 to 32x2 NFE (74.6 -> 83.8).
        for key in ("flow_matching", "real_score"):
            if key in ms:
                check(f"{arch}: {ms[key]['label']} gains >= 5 Total from 4 to 32 NFE",
                      _total(ms[key], 32), _total(ms[key], 4), "not_less", margin=5.0)
    return out


def _invocations_note(meta: dict) -> str:
    inv = meta.get("invocations") or []
    if len(inv) < 2:
        return ""
    parts = ", ".join(f"{i['date']} {i['wall_seconds'] / 60:.1f} min" for i in inv)
    return f" over {len(inv)} invocations ({parts})"


def report_markdown(results: dict, n_boot: int = 2000) -> str:
    meta = results.get("meta", {})
    t2, t3 = table2(results, n_boot), table3(results, n_boot)
    lines = [
        "# anystep reproduce: AnyFlow in miniature (MovingDigits / ToyBench)",
        "",
        f"Command: `{meta.get('command', '?')}`  ",
        f"Mode: {'quick' if meta.get('quick') else 'full'}; date {meta.get('date', '?')}; "
        f"wall time {meta.get('wall_seconds', float('nan')) / 60:.1f} min{_invocations_note(meta)}; "
        f"{meta.get('n_prompts', '?')} prompts per cell.",
        "",
        "Every number is a ToyBench score (0-100) with a bootstrap 95% interval over prompts "
        f"({n_boot} resamples). Flow matching and the teacher use classifier-free guidance, so their "
        "NFE is twice their step count. FD: Frechet distance to held-out real clips in the digit "
        "classifier's feature space (lower is better; a point estimate over all prompts).",
        "",
        "## Table 2 analogue: methods at 4 and 32 NFE",
        "",
    ]
    for arch, rows in t2.items():
        lines += [f"### {arch}", "", "| method | Quality @4 | Semantic @4 | Total @4 | FD @4 | Quality @32 | Semantic @32 | Total @32 | FD @32 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, cells in rows.items():
            label = results["architectures"][arch]["methods"][method]["label"]
            vals = []
            for nfe in TABLE_NFE:
                c = cells[str(nfe)]
                vals += [_fmt(c[k]) if c else "n/a" for k in SCORES]
                row = row_at_nfe(results["architectures"][arch]["methods"][method]["sweep"], nfe)
                vals.append(f"{row['frechet']:.1f}" if row and "frechet" in row else "n/a")
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        lines.append("")
    lines += ["## Table 3 analogue: the teacher at 50x2 against AnyFlow", "", "| model | NFE | Quality | Semantic | Total |",
              "| --- | --- | --- | --- | --- |"]
    for name, r in t3.items():
        lines.append(f"| {name} | {r['nfe']} | " + " | ".join(_fmt(r[k]) for k in SCORES) + " |")
    for arch, a in results["architectures"].items():
        if not a.get("i2v"):
            continue
        lines += ["", f"## {arch}: image-to-video (the first frame of each prompt's real clip given)", "",
                  "Text-to-video (T2V) from Table 2 beside the same model continuing a real first frame (I2V).", "",
                  "| method | T2V Total @4 | I2V Total @4 | T2V Total @32 | I2V Total @32 | I2V direction @4 / @32 | I2V dynamic degree @4 / @32 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for method, sweep in a["i2v"].items():
            m = a["methods"][method]
            cells, dirs, dyn = [], [], []
            for nfe in TABLE_NFE:
                t2v, i2v = row_at_nfe(m["sweep"], nfe), row_at_nfe(sweep, nfe)
                cells += [_fmt(score_with_ci(t2v, "Total", n_boot)) if t2v else "n/a",
                          _fmt(score_with_ci(i2v, "Total", n_boot)) if i2v else "n/a"]
                dirs.append(f"{i2v['direction_accuracy']:.1f}" if i2v else "n/a")
                dyn.append(f"{i2v['dynamic_degree']:.1f}" if i2v else "n/a")
            lines.append(f"| {m['label']} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {' / '.join(dirs)} | {' / '.join(dyn)} |")
    lines += sampler_cross_markdown(results, n_boot)
    lines += ["", "## The paper's claims on these numbers", ""]
    for c in claims(results):
        detail = ""
        if "a" in c:
            detail = f" ({_fmt(c['a'])} vs {_fmt(c['b'])})"
        lines.append(f"- {c['claim']}: **{c['verdict']}**{detail}")
    real = meta.get("real")
    if real:
        lines += ["", f"Ceiling (held-out real clips, same prompts): Quality {real['Quality']:.1f}, "
                      f"Semantic {real['Semantic']:.1f}, Total {real['Total']:.1f}."]
    lines += ["", "Figures: `scaling.png` (Total against NFE, Fig. 1a analogue), `samples.png` and "
                  "`samples_<arch>_<method>.mp4` (the same prompts at 1, 4, 16 and 32 steps, Fig. 1b analogue)."
                  + (" Training cost: `cost.md`." if results.get("cost") else " Training cost was not measured in this run."), ""]
    return "\n".join(lines)


SAMPLER_NAME = {"flowmap": "flow-map Euler", "consistency": "consistency (x0, re-noise)"}


def sampler_cross_markdown(results: dict, n_boot: int = 2000) -> list[str]:
    """Each student's Total at 4 and 32 NFE under its own sampler and under the other one."""
    lines = []
    for arch, a in results["architectures"].items():
        cross = a.get("sampler_cross")
        if not cross:
            continue
        lines += ["", f"## {arch}: the same weights under both samplers", "",
                  "Total (FD) at 4 and 32 NFE. The trained-for sampler is the Table 2 row; the other column samples "
                  "the same weights with the other students' sampler.", "",
                  "| method | trained for | flow-map @4 | flow-map @32 | consistency @4 | consistency @32 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for method, c in cross.items():
            m = a["methods"][method]
            by = {c["own"]: m["sweep"], c["other"]: c["sweep"]}
            cells = []
            for smp in ("flowmap", "consistency"):
                for nfe in TABLE_NFE:
                    row = row_at_nfe(by[smp], nfe)
                    cells.append(f"{_fmt(score_with_ci(row, 'Total', n_boot))} ({row['frechet']:.1f})" if row else "n/a")
            lines.append(f"| {m['label']} | {SAMPLER_NAME[c['own']]} | " + " | ".join(cells) + " |")
    return lines


def cost_markdown(cost: dict) -> str:
    lines = ["# Training cost per iteration (Table 5 analogue), measured in this run", "",
             f"Toy model, batch {cost.get('batch', '?')}, {cost.get('threads', '?')} CPU threads, median of "
             f"{cost.get('repeats', '?')} iterations; absolute CPU seconds mean little, the ratios are the point.", "",
             "| component | " + " | ".join(cost["sec_per_iter"]) + " |", "| --- |" + " --- |" * len(cost["sec_per_iter"])]
    comps = list(next(iter(cost["sec_per_iter"].values())))
    for c in comps:
        lines.append(f"| {c} | " + " | ".join(f"{cost['sec_per_iter'][a][c]:.3f} s" for a in cost["sec_per_iter"]) + " |")
    lines += ["", "| ratio | " + " | ".join(cost["ratios"]) + " | paper (bidirectional / causal) |",
              "| --- |" + " --- |" * (len(cost["ratios"]) + 1)]
    # Paper Table 5 (Wan-1.3B, 8xH100): FM 9.7 / 5.8, Stage 1 16.8 / 10.4, consistency BS 41.8 / 45.9
    # at s = 4 and 96.6 / 93.8 at s = 16, flow-map BS 51.2 / 53.1 at any s (bidirectional / causal).
    paper = {"stage1_over_flow_matching": "1.73 / 1.79", "flowmap_s16_over_s4": "1.00 / 1.00",
             "consistency_s16_over_s4": "2.31 / 2.04", "flowmap_over_consistency_s4": "1.225 / 1.157",
             "flowmap_over_consistency_s16": "0.530 / 0.566"}
    for k in paper:
        if all(k in r for r in cost["ratios"].values()):
            lines.append(f"| {k} | " + " | ".join(f"{cost['ratios'][a][k]:.3f}" for a in cost["ratios"]) + f" | {paper[k]} |")
    lines.append("")
    return "\n".join(lines)


def plot_scaling(results: dict, path) -> None:
    """Total (with 95% bootstrap bands) and Frechet distance against NFE per method; one column
    per architecture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    archs = list(results["architectures"])
    fig = Figure(figsize=(6 * len(archs), 7.5), dpi=110)
    FigureCanvasAgg(fig)
    real = results.get("meta", {}).get("real")
    for i, arch in enumerate(archs):
        ax = fig.add_subplot(2, len(archs), i + 1)
        ax_fd = fig.add_subplot(2, len(archs), len(archs) + i + 1)
        for method, m in results["architectures"][arch]["methods"].items():
            rows = sorted(m["sweep"].values(), key=lambda r: r["nfe"])
            x = [r["nfe"] for r in rows]
            cis = [score_with_ci(r, "Total", 500) for r in rows]
            style = "s--" if m.get("is_teacher") else "o-"
            line = ax.plot(x, [c["mean"] for c in cis], style, label=m["label"])[0]
            ax.fill_between(x, [c["low"] for c in cis], [c["high"] for c in cis], color=line.get_color(), alpha=0.15)
            ax_fd.plot(x, [r.get("frechet", float("nan")) for r in rows], style, color=line.get_color(), label=m["label"])
        if real:
            ax.axhline(real["Total"], color="k", ls=":", lw=0.8, label="real clips")
            if "frechet" in real:
                ax_fd.axhline(real["frechet"], color="k", ls=":", lw=0.8, label="real clips")
        for a in (ax, ax_fd):
            a.set_xscale("log", base=2)
            a.set_xlabel("NFE per clip")
        ax.set_ylabel("ToyBench Total (higher is better)")
        ax_fd.set_ylabel("Frechet distance to real clips (lower is better)")
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path))


def write_report(results: dict, out_dir, n_boot: int = 2000) -> None:
    """report.md, cost.md (when costs were measured) and scaling.png from a results dict."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "report.md", lambda f: f.write(report_markdown(results, n_boot).encode()))
    if results.get("cost"):
        atomic_write(out_dir / "cost.md", lambda f: f.write(cost_markdown(results["cost"]).encode()))
    plot_scaling(results, out_dir / "scaling.png")
