"""Every training method, once: its config class, its method class and what it writes. Read by
``anystep train``, ``anystep reproduce`` and ``anystep export``.

Each method's module declares its :class:`MethodInfo` as ``METHOD``; this registry names the
modules and imports one when it is asked for -- lazily on purpose: ``anystep --help`` lists the
methods without loading torch and diffusers (start-up time).

A method class carries what export needs without building anything: ``sampler(cfg)`` (how its
folder is sampled) and ``weights`` (the checkpoint keys of the student's tensors and their EMA);
``student_spec(cfg)`` here gives the student :func:`anystep.train.student.build_student` makes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

_MODULES = {
    "teacher": "anystep.train.teacher",
    "stage1": "anystep.train.stage1",
    "stage2": "anystep.train.stage2",
    "consistency_init": "anystep.train.baselines",
}


@dataclass(frozen=True)
class MethodInfo:
    config: type
    method: type
    train: Callable  # cfg -> the written folder
    what: str  # what it writes, for the command line
    student_spec: Callable | None = None  # cfg -> StudentSpec; None: no student to export from a checkpoint


def method_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def method_info(name: str) -> MethodInfo:
    """The method called ``name`` (a checkpoint's ``stage1:flowmap`` is ``stage1``); KeyError if none."""
    return importlib.import_module(_MODULES[str(name).split(":")[0]]).METHOD
