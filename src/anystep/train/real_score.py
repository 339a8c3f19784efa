"""What Stage 2 and the consistency ODE-init distil from (``real_score``): the teacher network, as on
Wan and in the paper, or - on the toy world - the exact flow of its training clips, a real score
whose converged samples are clean (docs/method.md, "The toy's real score"). Either way the student
and the critic start from the teacher folder's network."""

from __future__ import annotations

from anystep.config import ConfigError
from anystep.data.moving_digits import WorldConfig
from anystep.flow.empirical import EmpiricalFlow

REAL_SCORES = ("teacher", "empirical")


def check_real_score(kind: str, data: str) -> bool:
    """True for ``empirical``, False for ``teacher``; a ConfigError for anything it cannot be."""
    if kind not in REAL_SCORES:
        raise ConfigError(f"config key 'real_score' must be one of {', '.join(REAL_SCORES)}, got {kind!r}")
    if kind == "empirical" and data != "moving_digits":
        raise ConfigError(f"real_score: empirical is the exact flow of the toy world's clips; it needs data: "
                          f"moving_digits, got {data!r}")
    return kind == "empirical"


def empirical_real_score(kind: str, data: str, vae, num_frames: int, clips_per_prompt: int) -> EmpiricalFlow | None:
    """The empirical flow a ``real_score: empirical`` run distils from (None for ``teacher``), in the
    latent space of ``vae`` (the student folder's codec). Its clip set does not follow the run's
    seed: the real score is one fixed teacher for every run."""
    if not check_real_score(kind, data):
        return None
    return EmpiricalFlow.cached(vae, WorldConfig(num_frames=num_frames), clips_per_prompt)
