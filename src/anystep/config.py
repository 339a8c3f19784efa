"""Recipes: YAML files plus ``key=value`` overrides, resolved into a method's config dataclass."""

from __future__ import annotations

from anystep.errors import UserError

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot be used (reported as a one-line error)."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=3", "name=x"]`` -> ``{"a": {"b": 3}, "name": "x"}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def build_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Instantiate dataclass ``cls`` from a YAML file and overrides, rejecting unknown keys."""
    return build_config_from_dict(cls, deep_merge(load_yaml(path), parse_overrides(overrides or [])))


def build_config_from_dict(cls, data: dict):
    """Instantiate dataclass ``cls`` from a mapping, with the same key checks and type coercion."""
    data = dict(data)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, list(names), n=1)) else k
                 for k in unknown]
        raise ConfigError(f"unknown config key(s) for {cls.__name__}: {', '.join(hints)}")
    for k, v in list(data.items()):
        data[k] = _coerce(k, v, names[k])
    try:
        cfg = cls(**data)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    validate(cfg)
    return cfg


# Checked by field name, so every method's config (and any later one) gets the same rules.
_AT_LEAST_ONE = ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "probe_every", "num_frames",
                 "consistency_steps", "grid_steps", "ode_steps", "min_chunks", "real_score_clips")
_NON_NEGATIVE = ("weight_decay", "warmup", "cooldown", "ema_start", "threads", "lora_rank", "lora_alpha",
                 "critic_lora_rank", "critic_lora_alpha", "long_num_frames", "seed", "sign_weight", "text_sep_weight",
                 "dmd_weight", "stage1_weight", "adaptive_c", "fd_eps")
_POSITIVE = ("lr", "critic_lr", "grad_clip", "shift", "text_lr_mult")
_FRACTIONS = ("ema_decay", "chunk_sample_prob", "bidirectional_aux_prob", "null_prob", "boundary_frac", "zero_frac",
              "long_frac", "uniform_t_frac", "text_sep_ratio")
_CHOICES = {
    "loss_weight": ("beta", "uniform", "normal"),
    "method": ("flowmap", "flow_matching"),
    "timestep_cond": ("interpolated", "zero_init"),
    "rollout": ("flowmap", "consistency"),
    "real_score": ("teacher", "empirical"),
}
_INT_LISTS = ("chunk_partition", "step_budgets")
_NAME_LISTS = {"log_to": ("tensorboard", "wandb")}


def validate(cfg) -> None:
    """Refuse values that would only fail (or silently do nothing) deep inside a run."""
    import math

    values = dataclasses.asdict(cfg)

    def bad(key, want):
        raise ConfigError(f"config key {key!r} must be {want}, got {values[key]!r}")

    for k in _AT_LEAST_ONE:
        if k in values and values[k] < 1:
            bad(k, ">= 1")
    for k in _NON_NEGATIVE:
        if k in values and not values[k] >= 0:
            bad(k, ">= 0")
    for k in _POSITIVE:
        if k in values and not (values[k] > 0 and math.isfinite(values[k])):
            bad(k, "a finite number > 0")
    for k in _FRACTIONS:
        if k in values and not 0 <= values[k] <= 1:
            bad(k, "between 0 and 1")
    for k, choices in _CHOICES.items():
        if k in values and values[k] not in choices:
            bad(k, f"one of {', '.join(choices)}")
    if "betas" in values:
        b = values["betas"]
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            bad("betas", "two numbers in [0, 1), e.g. [0.9, 0.95]")
    for k in _INT_LISTS:
        if k in values and not all(isinstance(x, int) and x >= 1 for x in values[k]):
            bad(k, "a list of integers >= 1")
    for k, choices in _NAME_LISTS.items():
        if k in values and not all(x in choices for x in values[k]):
            bad(k, f"a list of {', '.join(choices)} (none: an empty list)")


def _coerce(key: str, value, f: dataclasses.Field):
    """Bring a YAML value to the field's type: YAML reads ``1e-3`` as a string, for one."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if default is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float) and not isinstance(value, bool):
            return float(value)
        if key in _NAME_LISTS:
            # On the command line a list of names reads as `key=a,b`, and `key=none` is no names.
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
                value = []
            elif isinstance(value, str):
                value = [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return tuple(type(d)(x) for d, x in zip(default, value)) if len(value) == len(default) else tuple(value)
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {type(default).__name__}, got {value!r}") from None
    return value


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
