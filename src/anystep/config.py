"""Recipes: YAML files plus ``key=value`` overrides, resolved into a method's config dataclass."""

from __future__ import annotations

from anystep.errors import UserError

import dataclasses
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
        raise ConfigError(f"unknown config key(s) for {cls.__name__}: {', '.join(unknown)}")
    for k, v in list(data.items()):
        data[k] = _coerce(k, v, names[k])
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(str(e)) from None


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
