"""Running ToyBench on a model folder: generate the prompt set at each step count, score it, write
``toybench.json`` and the figures (:func:`run_toybench`; the scores are :mod:`anystep.eval.toybench`'s).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from anystep.conditioning import context_latents
from anystep.data.moving_digits import WorldConfig
from anystep.eval.clip_analysis import as_numpy
from anystep.eval.toybench import (
    TOYBENCH_VERSION,
    clip_features,
    feature_stats,
    frechet_distance,
    real_clips_for,
    score_videos,
    toybench_prompts,
)
from anystep.models.loaded import load_model
from anystep.sampling import DEFAULT_TEACHER_GUIDANCE, generate, nfe
from anystep.fsutil import atomic_write, folder_digest


# --- running a model -----------------------------------------------------------------------------


def _atomic_write_json(path: Path, obj) -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1), binary=False)


def _to_image(frame: np.ndarray) -> np.ndarray:
    return np.clip((np.transpose(frame, (1, 2, 0)) + 1.0) * 0.5, 0.0, 1.0)


def save_sample_grid(videos, prompts: list[str], path, title: str = "") -> None:
    """PNG grid of clips: one row per clip (labelled with its prompt), frames as columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    videos = as_numpy(videos)
    n, nf, _, h, w = videos.shape
    pad = 2
    grid = np.full((n * (h + pad) - pad, nf * (w + pad) - pad, 3), 0.35, np.float32)
    for i in range(n):
        for f in range(nf):
            grid[i * (h + pad) : i * (h + pad) + h, f * (w + pad) : f * (w + pad) + w] = _to_image(videos[i, f])
    fig = Figure(figsize=(1.0 + 0.55 * nf + 2.2, 0.6 + 0.6 * n), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([i * (h + pad) + h / 2 for i in range(n)])
    ax.set_yticklabels(prompts, fontsize=7)
    ax.set_xticks([f * (w + pad) + w / 2 for f in range(nf)])
    ax.set_xticklabels([str(f) for f in range(nf)], fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path))


def _short(folder: str) -> str:
    """The last two path parts: model folders are usually ``<run>/model``."""
    parts = Path(folder).parts
    return "/".join(parts[-2:])


def plot_toybench(result: dict, path) -> None:
    """Quality / Semantic / Total against NFE (log2 axis), real-clip ceiling dashed; FD beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(result["results"].values(), key=lambda r: r["nfe"])
    x = [r["nfe"] for r in rows]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, col in (("Quality", "tab:blue"), ("Semantic", "tab:orange"), ("Total", "tab:green")):
        ax.plot(x, [r[key] for r in rows], "o-", color=col, label=key)
        if "real" in result:
            ax.axhline(result["real"][key], color=col, ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE per clip")
    ax.set_ylabel("ToyBench score (0-100)")
    ax.set_ylim(0, 102)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])
    ax.legend(fontsize=8, title="dashed: real clips", title_fontsize=7)
    ax.set_title(f"{result.get('kind', '')}: {_short(result.get('model_folder', ''))}", fontsize=9)
    ax2.plot(x, [r["frechet"] for r in rows], "o-", color="tab:red")
    if "real" in result:
        ax2.axhline(result["real"]["frechet"], color="tab:red", ls="--", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(x)
    ax2.set_xticklabels([str(v) for v in x])
    ax2.set_xlabel("NFE per clip")
    ax2.set_ylabel("Frechet distance to held-out clips")
    fig.tight_layout()
    fig.savefig(str(path))


def _generate_all(model, prompts: list[tuple[str, int]], steps: int, num_frames: int, batch_size: int,
                  context: torch.Tensor | None = None, guidance_scale: float | None = None) -> np.ndarray:
    """Pixels of every (prompt, seed), ``batch_size`` at a time; with ``context`` (FAR models), clip i
    continues its own context row. A model with ``generate_videos`` (a velocity field that is not a
    folder, the empirical flow) generates them itself."""
    if hasattr(model, "generate_videos"):
        return model.generate_videos(prompts, steps, num_frames, guidance_scale)
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        texts, seeds = [p for p, _ in chunk], [sd for _, sd in chunk]
        ctx = context[s : s + len(chunk)] if context is not None else None
        kw = dict(num_frames=num_frames, guidance_scale=guidance_scale)
        if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
            # generate() draws clip i of a batch from seed + i: a contiguous run batches exactly.
            out.append(as_numpy(generate(model, texts, steps, seed=seeds[0], context=ctx, **kw)))
        else:
            for i, (t, sd) in enumerate(zip(texts, seeds)):
                one = ctx[i : i + 1] if ctx is not None else None
                out.append(as_numpy(generate(model, [t], steps, seed=sd, context=one, **kw)))
    return np.concatenate(out)


def real_context(model, real: np.ndarray, context_frames: int) -> torch.Tensor:
    """Latents of the first ``context_frames`` frames of each real clip (B, f, C, h, w), for
    image-to-video (1 frame) or video-to-video ToyBench. They must end on a chunk boundary of the
    model's partition and leave at least one chunk to generate."""
    if getattr(model, "kind", None) != "anyflow_far":
        raise ValueError(f"--context-frames conditions a causal AnyFlow-FAR model; {model.folder} is a {model.kind!r} folder")
    part = [int(c) for c in model.transformer.config.chunk_partition]
    ft = int(model.codec.config.scale_factor_temporal)
    ends = [(sum(part[: k + 1]) - 1) * ft + 1 for k in range(len(part) - 1)]
    if context_frames not in ends:
        raise ValueError(f"--context-frames {context_frames} does not end a chunk of the partition {part} "
                         f"with a chunk left to generate; use one of {ends}")
    h, w = real.shape[-2:]
    return torch.cat([context_latents(model, torch.from_numpy(np.ascontiguousarray(r[:context_frames])), h, w) for r in real])


def default_num_frames(model) -> int:
    """The world's 7 frames; for a causal (AnyFlow-FAR) student, the frame count its chunk partition
    covers (``(latent_frames - 1) * temporal_factor + 1``), since it can only generate that."""
    nf = WorldConfig().num_frames
    if getattr(model, "kind", None) == "anyflow_far":
        part = getattr(model.transformer.config, "chunk_partition", None)
        if part:
            ft = int(model.codec.config.scale_factor_temporal)
            nf = (int(sum(part)) - 1) * ft + 1
    return nf


def teacher_reference_features(teacher_folder, prompts: list[tuple[str, int]], num_frames: int, world: WorldConfig,
                               steps: int = 50, cache: Path | None = None, batch_size: int = 20) -> np.ndarray:
    """Clip features of the teacher's samples of ``prompts`` (their seeds) at ``steps`` Euler steps
    with its default CFG, cached in ``cache`` (an ``.npz``) for the same teacher, prompts and steps."""
    in_memory = hasattr(teacher_folder, "generate_videos")
    name = teacher_folder.name if in_memory else str(Path(teacher_folder).resolve())
    # The folder's bytes, not only its path: a teacher retrained in place is another reference.
    digest = "" if in_memory else folder_digest(teacher_folder)
    key = json.dumps({"teacher": name, "digest": digest, "steps": int(steps), "num_frames": int(num_frames),
                      "prompts": [list(p) for p in prompts], "version": TOYBENCH_VERSION}, sort_keys=True)
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["features"]
    model = teacher_folder if hasattr(teacher_folder, "generate_videos") else load_model(teacher_folder)
    if model.kind not in ("teacher", "empirical_flow"):
        raise ValueError(f"teacher_reference {teacher_folder} is a {model.kind!r} folder, not a teacher")
    feats = clip_features(_generate_all(model, prompts, int(steps), num_frames, batch_size), world)
    if cache is not None:
        atomic_write(cache, lambda f: np.savez(f, key=np.array(key), features=feats))
    return feats


def _frechet_between(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def run_toybench(
    model_folder,
    steps=(1, 2, 4, 8, 16, 32),
    out_dir=None,
    n_prompts: int = 40,
    num_frames: int | None = None,
    batch_size: int = 20,
    n_show: int = 4,
    reuse: bool = False,
    colors: tuple[str, ...] | None = None,
    directions: tuple[str, ...] | None = None,
    context_frames: int = 0,
    guidance_scale: float | None = None,
    teacher_reference: str | None = None,
    teacher_reference_steps: int = 50,
    sampler: str | None = None,
) -> dict:
    """Generate the ToyBench prompt set at each step count, score it, write the results.

    Writes ``out_dir/toybench.json`` (rewritten atomically after every step count, so a partial run
    leaves valid results), ``out_dir/toybench.png`` (scores against NFE) and
    ``out_dir/samples_{steps}.png`` (the first ``n_show`` clips). ``out_dir`` defaults to
    ``<model_folder>/../toybench``. ``num_frames`` defaults to :func:`default_num_frames` (7, or what
    a causal student's chunk partition covers). Returns the JSON dict:
    ``model_folder``, ``kind``, ``toybench_version``, ``num_frames``, ``prompts`` (prompt, seed),
    ``real`` (the same prompts rendered from held-out real clips: the ceiling) and ``results``:
    ``{str(steps): {steps, nfe, Quality, Semantic, Total, <sub-scores>, frechet, per_clip_total,
    per_clip, seconds}}``. The first ``n_show`` clips of each step count are also kept as
    ``samples_{steps}.npy`` (float16 pixels) for figures that compare methods side by side.

    ``colors`` / ``directions`` evaluate on a shifted domain of the toy world (for example the extra
    colours magenta, cyan, white), with the same metrics and that domain's real clips as reference.

    ``context_frames`` > 0 (causal AnyFlow-FAR models only) gives the model the first frames of each
    prompt's held-out real clip, the ``real`` row's own clips, and scores the whole clip, given
    frames included: image-to-video ToyBench with 1, video-to-video with more. It must end on a
    chunk boundary (1, 4, 7 or 10 for the partition 1,3,3,3,3).

    ``guidance_scale`` sets the classifier-free guidance of models sampled with Euler + CFG (a
    teacher, a flow-matching student; default 4.0) and is recorded in the JSON; flow-map and
    consistency students are guidance-fused, so a value for them is a ``ValueError``.

    ``teacher_reference`` (a teacher folder) adds ``frechet_teacher`` to every row and to ``real``:
    the Frechet distance to that teacher's ``teacher_reference_steps``-step samples of the same
    prompts and seeds (cached as ``out_dir/teacher_reference.npz``). Text-to-video only.

    ``sampler`` samples a flow-map or consistency student with the other students' sampler
    (``"flowmap"`` or ``"consistency"``) instead of its own: the same weights under both samplers
    separate what the training does from what the sampler does. Recorded in the JSON.

    ``reuse=True`` keeps the step counts an earlier run with the same prompts already wrote to
    ``out_dir`` and generates only the missing ones (a killed sweep resumes).
    """
    if hasattr(model_folder, "generate_videos"):  # e.g. anystep.eval.empirical_teacher.EmpiricalFlowModel
        model, model_folder = model_folder, model_folder.name
        if out_dir is None:
            raise ValueError(f"{model_folder}: give out_dir, it has no folder of its own")
    else:
        model_folder = Path(model_folder)
        model = load_model(model_folder)
    out_dir = Path(out_dir) if out_dir is not None else model_folder.parent / "toybench"
    guided = model.kind == "teacher" or model.sampler == "euler_cfg"
    if sampler is not None:
        if guided:
            raise ValueError(f"{model_folder} is sampled with Euler + CFG; a sampler swap applies to flow-map and "
                             "consistency students")
        if sampler not in ("flowmap", "consistency"):
            raise ValueError(f"sampler must be 'flowmap' or 'consistency', got {sampler!r}")
        model.sampler = sampler
    if guidance_scale is not None and not guided:
        raise ValueError(f"{model_folder} is a guidance-fused {model.sampler} student: --guidance-scale "
                         "applies to teachers and flow-matching students only")
    out_dir.mkdir(parents=True, exist_ok=True)
    effective_g = (DEFAULT_TEACHER_GUIDANCE if guidance_scale is None else float(guidance_scale)) if guided else None
    num_frames = int(num_frames or default_num_frames(model))
    domain = {k: tuple(v) for k, v in (("colors", colors), ("directions", directions)) if v}
    world = WorldConfig(num_frames=num_frames, **domain)  # a shifted domain: other colours / directions
    world.validate()
    prompts = toybench_prompts(n_prompts, world)
    texts = [p for p, _ in prompts]

    real_videos = real_clips_for(prompts, world)
    real = score_videos(real_videos, texts, world)
    teacher_feats = None
    if teacher_reference is not None:
        if context_frames:
            raise ValueError("teacher_reference compares text-to-video samples; it does not apply with context_frames")
        teacher_feats = teacher_reference_features(teacher_reference, prompts, num_frames, world, teacher_reference_steps,
                                                   cache=out_dir / "teacher_reference.npz", batch_size=batch_size)
        real["frechet_teacher"] = _frechet_between(clip_features(real_videos, world), teacher_feats)
    context = real_context(model, real_videos, int(context_frames)) if context_frames else None
    result: dict = {
        "model_folder": str(model_folder),
        # A model that is not a folder is told apart by its name (the empirical flow's K, seed and
        # codec); a folder's path is not compared, so a renamed copy keeps its scores.
        "model_name": model.name if hasattr(model, "generate_videos") else None,
        "kind": model.kind,
        "toybench_version": TOYBENCH_VERSION,
        "num_frames": num_frames,
        "context_frames": int(context_frames),
        "guidance_scale": effective_g,
        "sampler": model.sampler,
        "teacher_reference": ({"folder": getattr(teacher_reference, "name", str(teacher_reference)),
                               "steps": int(teacher_reference_steps)}
                              if teacher_reference is not None else None),
        "prompts": [{"prompt": p, "seed": s} for p, s in prompts],
        "real": {k: v for k, v in real.items() if k != "per_clip"},
        "results": {},
    }
    old = out_dir / "toybench.json"
    if reuse and old.exists():
        prev = json.loads(old.read_text())
        # A JSON written before guidance was recorded used the default.
        # Scores of another ToyBench version are never reused.
        was = {"context_frames": 0, "guidance_scale": DEFAULT_TEACHER_GUIDANCE if guided else None, "toybench_version": 1,
               "teacher_reference": None, "sampler": result["sampler"] if sampler is None else None}
        same = all(prev.get(k, was.get(k)) == result[k]
                   for k in ("model_name", "prompts", "num_frames", "kind", "context_frames", "guidance_scale",
                             "toybench_version", "teacher_reference", "sampler"))
        if same:
            result["results"] = {k: v for k, v in prev.get("results", {}).items() if (out_dir / f"samples_{k}.npy").exists()}
    for s in steps:
        s = int(s)
        if str(s) in result["results"]:
            continue
        t0 = time.time()
        videos = _generate_all(model, prompts, s, num_frames, batch_size, context, guidance_scale)
        gen_s = time.time() - t0
        sc = score_videos(videos, texts, world)
        row = {"steps": s, "nfe": int(nfe(model, s))}
        row.update({k: v for k, v in sc.items() if k != "per_clip"})
        if teacher_feats is not None:
            row["frechet_teacher"] = _frechet_between(clip_features(videos, world), teacher_feats)
        row["per_clip_total"] = sc["per_clip"]["total"]
        row["per_clip"] = sc["per_clip"]
        row["seconds"] = round(gen_s, 2)
        result["results"][str(s)] = row
        save_sample_grid(
            videos[:n_show], texts[:n_show], out_dir / f"samples_{s}.png", title=f"{model.kind} ({model.sampler} sampler), {s} steps (NFE {row['nfe']})"
        )  # the sampler in the title: one folder is scored under two samplers in the cross table
        atomic_write(out_dir / f"samples_{s}.npy", lambda f, v=videos[:n_show]: np.save(f, v.astype(np.float16)))
        _atomic_write_json(out_dir / "toybench.json", result)
        print(
            f"[toybench] steps={s:<3d} nfe={row['nfe']:<3d} Quality={row['Quality']:5.1f} "
            f"Semantic={row['Semantic']:5.1f} Total={row['Total']:5.1f} FD={row['frechet']:.3g} "
            + (f"FD-teacher={row['frechet_teacher']:.3g} " if teacher_feats is not None else "")
            + f"(gen {gen_s:.1f}s)",
            flush=True,
        )
    plot_toybench(result, out_dir / "toybench.png")
    return result
