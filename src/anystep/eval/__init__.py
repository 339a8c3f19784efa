"""Evaluation: ToyBench, the toy analogue of VBench (docs/design.md section 4)."""

from anystep.eval.clip_analysis import QUALITY_KEYS, SEMANTIC_KEYS, SUB_KEYS, analyse_clip, clip_scores
from anystep.eval.toybench import (
    clip_features,
    frechet_distance,
    frechet_to_reference,
    real_clips_for,
    reference_stats,
    score_videos,
    toybench_prompts,
)
from anystep.eval.toybench_run import run_toybench

__all__ = [
    "QUALITY_KEYS",
    "SEMANTIC_KEYS",
    "SUB_KEYS",
    "analyse_clip",
    "clip_features",
    "clip_scores",
    "frechet_distance",
    "frechet_to_reference",
    "real_clips_for",
    "reference_stats",
    "run_toybench",
    "score_videos",
    "toybench_prompts",
]
