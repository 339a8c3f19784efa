"""What `anystep train <method> --help` lists: every config key with its type, default and the
one-line note written beside the field in the config class."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_notes(cls) -> dict[str, str]:
    """name -> the comment on the field's line in the class source (empty when there is none)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = _FIELD.match(line)
            if m:
                notes[m.group(1)] = m.group(2).strip()
    return notes


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def config_keys_help(cls) -> str:
    notes = field_notes(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference that does not resolve: fall back to the written annotation
        hints = {}
    rows = [(f.name, _type_name(hints.get(f.name, f.type)), _default(f), notes.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    w_name = max(len(r[0]) for r in rows)
    w_type = max(len(r[1]) for r in rows)
    lines = [f"config keys of {cls.__name__} (set as key=value, or in the --config YAML):"]
    for name, tp, default, note in rows:
        lines.append(f"  {name:<{w_name}}  {tp:<{w_type}}  default {default}" + (f"  -- {note}" if note else ""))
    return "\n".join(lines)
