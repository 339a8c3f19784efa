"""The trainable student of every distillation method, built from its folder alone.

Stage 1, Stage 2, the consistency ODE-init and ``anystep export`` all call :func:`build_student`
with a :class:`StudentSpec`: convert a Wan teacher into a flow-map student (or, for plain flow
matching of the teacher, keep the Wan network), or continue an AnyFlow folder; then the ablation's
timestep conditioning and the LoRA adapters. Nothing else is loaded -- no teacher for the real
score, no critic -- so exporting a Stage-2 run costs one student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from anystep.distributed import shard
from anystep.models.far_attention import far_attention_for_device
from anystep.models.folders import save_anyflow_folder, save_teacher_folder
from anystep.models.latents import temporal_factor
from anystep.models.loaded import load_model
from anystep.models.lora import REFERENCE_LORA_TARGETS, add_student_lora, merge_student_lora
from anystep.models.students import check_chunk_partition, student_from_teacher
from anystep.train.checkpoint import load_checkpoint

TIMESTEP_CONDS = ("interpolated", "zero_init")


@dataclass(frozen=True)
class StudentSpec:
    source: str  # a Wan teacher folder to convert, or an AnyFlow / AnyFlow-FAR folder to continue
    causal: bool = False
    chunk_partition: tuple[int, ...] = ()
    num_frames: int = 7
    train_wan: bool = False  # plain flow matching of a teacher: train the Wan network itself
    gate_value: float = 0.25
    timestep_cond: str = "interpolated"  # interpolated (gate on emb'(r)) | zero_init (emb(t) + emb'(t - r))
    lora_rank: int = 0
    lora_alpha: int = 0
    lora_targets: tuple[str, ...] = REFERENCE_LORA_TARGETS


def build_student(spec: StudentSpec):
    """``(module, pipe)``: the student in fp32 train mode (with its adapters when ``lora_rank`` > 0)
    and the pipeline of ``spec.source``, whose frozen text encoder and codec it is trained and
    exported with. The caller seeds torch first when the adapters' initialisation must repeat."""
    if spec.timestep_cond not in TIMESTEP_CONDS:
        raise ValueError(f"timestep_cond must be 'interpolated' or 'zero_init', got {spec.timestep_cond!r}")
    src = load_model(spec.source)
    wan = src.kind == "teacher" and spec.train_wan and not spec.causal
    if wan:
        student = src.transformer
    elif src.kind == "teacher":
        student = student_from_teacher(src.transformer, causal=spec.causal, gate_value=spec.gate_value,
                                       chunk_partition=tuple(spec.chunk_partition) if spec.causal else None)
    elif (src.kind == "anyflow_far") != spec.causal:
        raise ValueError(f"{spec.source}: a {src.kind} folder does not fit causal={spec.causal}")
    else:
        student = src.transformer
    if spec.timestep_cond == "zero_init":
        if wan:
            raise ValueError("timestep_cond='zero_init' is a flow-map student's conditioning; a Wan teacher has no emb'")
        zero_init_delta(student)
    student = student.float().train()
    src.pipe.text_encoder.requires_grad_(False)
    if spec.lora_rank > 0:
        add_student_lora(student, spec.lora_rank, spec.lora_alpha or spec.lora_rank, list(spec.lora_targets))
    if spec.causal:
        check_chunk_partition(spec.chunk_partition, spec.num_frames, temporal_factor(src.pipe.vae))
        far_attention_for_device(student, next(student.parameters()).device)
    return student, src.pipe


def zero_init_delta(student) -> None:
    """Ablation: the prior-work conditioning emb(t) + emb'(t - r) with emb' starting at zero output.

    diffusers' mixture is (1 - gate) emb(t) + gate emb'(.); gate 0.5 with both halves doubled is
    exactly emb(t) + emb'(t - r). emb' is zero-initialised at its output layer.
    """
    ce = student.condition_embedder
    ce.deltatime_type = "t-r"
    ce.delta_emb_gate.fill_(0.5)
    with torch.no_grad():
        ce.time_embedder.linear_2.weight.mul_(2.0)
        ce.time_embedder.linear_2.bias.mul_(2.0)
        ce.delta_embedder.linear_2.weight.zero_()
        ce.delta_embedder.linear_2.bias.zero_()
    student.register_to_config(gate_value=0.5, deltatime_type="t-r")


def is_wan(student, pipe) -> bool:
    """Plain flow matching of a teacher trains the Wan network itself (a teacher folder results)."""
    return student is pipe.transformer and type(pipe).__name__ == "WanPipeline"


def prepare_student(student, env, cfg) -> None:
    """Move the student to this rank's device, pick its FAR attention for that device (``cfg.causal``),
    switch on gradient checkpointing, shard it (FSDP2, ``cfg.mixed_precision``)."""
    student.to(env.device)
    if cfg.causal:  # flex attention on CUDA, the dense fallback on CPU
        far_attention_for_device(student, env.device)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    shard(student, env, mixed_precision=cfg.mixed_precision)


def save_student(dest, student, pipe, *, shift: float, sampler: str, wan: bool = False, training: dict | None = None,
                 lora: bool = False) -> Path:
    """The final diffusers folder of a trained student (LoRA merged): a teacher folder for a trained
    Wan network (``wan``, :func:`is_wan` of the built student), an AnyFlow / AnyFlow-FAR folder
    served by ``sampler`` otherwise."""
    student = student.eval()
    if lora:
        student = merge_student_lora(student)
    if wan:
        return save_teacher_folder(dest, student, pipe.text_encoder, pipe.tokenizer, pipe.vae, shift=shift,
                                   training=training)
    return save_anyflow_folder(dest, student, pipe.text_encoder, pipe.tokenizer, pipe.vae, shift=shift, sampler=sampler,
                               training=training)


def load_trained_student(run_dir, spec: StudentSpec, keys: tuple[str, str], use_ema: bool = True):
    """``(module, pipe)``: the student of ``spec`` with the trained (or EMA) weights of the run's
    checkpoint, on one process; ``keys`` name its trainable tensors and their EMA in the checkpoint."""
    module, pipe = build_student(spec)
    trained = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    ema = {n: torch.empty_like(p) for n, p in trained.items()}
    load_checkpoint(run_dir, {keys[0]: trained, keys[1]: ema}, single_process=True)
    if use_ema:
        with torch.no_grad():
            for n, v in ema.items():
                trained[n].copy_(v)
    return module, pipe
