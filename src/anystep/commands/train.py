"""``anystep train METHOD``: pre-flight checks, the run folder's claim, and the method's training."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch

from anystep.commands.inputs import load
from anystep.config import build_config, to_yaml
from anystep.distributed import all_sum, launched_world_size, setup, shutdown
from anystep.errors import UserError
from anystep.models.toy import TOY_TRANSFORMER
from anystep.train.checkpoint import CheckpointError, has_checkpoint, read_meta
from anystep.train.loggers import check_loggers
from anystep.train.registry import method_info, method_names
from anystep.train.runfolder import claim_run_folder


def _check_stage1(cfg) -> None:
    load(cfg.init or cfg.teacher)  # a bad folder is a one-line error, before any output exists


def _check_teacher_only(cfg) -> None:
    if load(cfg.teacher).kind != "teacher":
        raise UserError(f"{cfg.teacher}: consistency ODE-init starts from a Wan teacher folder")


def _check_stage2(cfg) -> None:
    if cfg.rollout not in ("flowmap", "consistency"):
        raise UserError(f"rollout must be 'flowmap' or 'consistency', got {cfg.rollout!r}")
    student, teacher = load(cfg.student), load(cfg.teacher)  # bad folders: one-line errors first
    if student.kind not in ("anyflow", "anyflow_far") or (student.kind == "anyflow_far") != cfg.causal:
        raise UserError(
            f"{cfg.student}: the Stage-2 student must be an AnyFlow{'-FAR' if cfg.causal else ''} folder "
            f"(causal={cfg.causal}), got a {student.kind!r} folder"
        )
    if teacher.kind != "teacher":
        raise UserError(f"{cfg.teacher}: the Stage-2 teacher must be a Wan teacher folder, got a {teacher.kind!r} folder")


def _check_teacher_train(cfg) -> None:
    if cfg.init and has_checkpoint(cfg.init):
        if str(read_meta(cfg.init).get("name")) != "teacher":
            raise UserError(f"init={cfg.init}: a teacher fine-tune starts from a teacher run or a teacher folder")
    elif cfg.init and Path(cfg.init).is_dir():
        if load(cfg.init).kind != "teacher":
            raise UserError(f"init={cfg.init}: a teacher fine-tune starts from a Wan teacher folder")
        have = json.loads((Path(cfg.init) / "transformer" / "config.json").read_text())
        want = {**TOY_TRANSFORMER, **cfg.transformer}
        differ = [f"{k} {have[k]} != {v}" for k, v in want.items()
                  if k in have and (list(have[k]) if isinstance(have[k], (list, tuple)) else have[k])
                  != (list(v) if isinstance(v, (list, tuple)) else v)]
        if differ:
            raise UserError(f"init={cfg.init}: its transformer does not match this run's ({', '.join(differ)}); "
                            f"set transformer={{...}} to the folder's config")
    elif cfg.init:
        raise UserError(
            f"init={cfg.init}: neither a teacher checkpoint (the out= folder of `anystep train teacher`) nor a teacher folder"
        )
    if cfg.long_frac and cfg.long_num_frames <= 0:
        raise UserError(f"long_frac={cfg.long_frac} needs long_num_frames > 0")


# Each method's pre-flight check: a bad folder or setting is one line before any output exists.
_PREFLIGHT = {
    "teacher": _check_teacher_train,
    "stage1": _check_stage1,
    "stage2": _check_stage2,
    "consistency_init": _check_teacher_only,
}


def cmd_train(args) -> int:

    if args.method not in method_names():
        raise UserError(f"unknown training method {args.method!r}")
    info = method_info(args.method)
    train, check, what = info.train, _PREFLIGHT[args.method], info.what
    cfg = build_config(info.config, args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if launched_world_size() > 1 and args.method == "teacher":
        raise UserError("the toy teacher trains in one process; run `anystep train teacher` without torchrun")
    check(cfg)
    check_loggers(cfg.log_to)
    allow = _allowed_changes(args.allow_changed, cfg)
    env = setup()
    with contextlib.ExitStack() as stack:
        # Rank 0 owns the folder (lock, marker, metrics); the other ranks only write checkpoint shards.
        state, refusal = None, None
        if env.is_main:
            try:
                state = stack.enter_context(claim_run_folder(args.method, cfg, allow))
            except (UserError, OSError) as e:
                refusal = e
        # Every rank learns rank 0's verdict: a refusal there must not leave the others in a collective.
        code = (1 if refusal is not None else 2 if state is not None and state.finished else 0) if env.is_main else 0
        verdict = int(all_sum(torch.tensor([float(code)]))[0])
        if verdict == 1:
            shutdown(together=False)
            raise refusal if refusal is not None else UserError(f"rank 0 refused out={cfg.out} (its log says why)")
        if verdict == 2:
            shutdown()
            if env.is_main:
                print(f"{cfg.out} already finished at step {state.step} (steps={cfg.steps}); the {what} is in "
                      f"{state.model} -- raise steps= to train further")
            return 0
        return _run_training(cfg, train, what)


def _allowed_changes(items, cfg) -> set[str]:
    names = {f.name for f in dataclasses.fields(cfg)}
    allow = {k.strip() for item in (items or []) for k in item.split(",") if k.strip()}
    unknown = sorted(allow - names)
    if unknown:
        raise UserError(f"--allow-changed: unknown config key(s) {', '.join(unknown)}")
    return allow


def _run_training(cfg, train, what: str) -> int:
    env = setup()
    try:
        folder = train(cfg)
    except CheckpointError as e:
        shutdown(together=False)
        raise UserError(str(e)) from None
    except RuntimeError as e:  # DistBackendError included: a peer died or hung mid-collective
        if not env.distributed:
            raise
        shutdown(together=False)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {env.rank} stopped ({first}); if another rank failed, its log says why; the last "
                        f"complete checkpoint in {getattr(cfg, 'out', '?')}/checkpoint is kept") from None
    shutdown()
    if env.is_main:
        print(f"{what} written to {folder}")
    return 0
