"""Models in, models out: every model the toolkit writes is a diffusers folder.

* teacher -> ``WanPipeline`` layout (``model_index.json``, ``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
* flow-map students -> ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` layouts.

The toy model's ``vae/`` is a :class:`~anystep.models.codec.SpaceToDepthCodec`; a real Wan folder
has ``AutoencoderKLWan`` there. Both load through the same diffusers call.
"""

from __future__ import annotations

from anystep.errors import UserError

import json
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, FlowMapEulerDiscreteScheduler

from anystep.models.card import write_model_card
import anystep.models.codec
from anystep.fsutil import atomic_save_folder


class ModelFolderError(UserError, ValueError):
    """A model folder is missing, malformed or of the wrong layout (reported as a one-line error)."""


PIPELINE_CLASSES = {"WanPipeline", "AnyFlowPipeline", "AnyFlowFARPipeline"}


def save_teacher_folder(dest, transformer, text_encoder, tokenizer, codec, shift: float = 5.0,
                        training: dict | None = None) -> Path:
    from diffusers import WanPipeline

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=codec,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
    )

    def write(tmp):
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_model_card(tmp, training, name=Path(dest).name)

    atomic_save_folder(write, dest, kind="model")
    return Path(dest)


SAMPLERS = ("flowmap", "consistency", "euler_cfg")
# Which sampler a student was trained for. diffusers ignores the file; ``anystep`` reads it so that
# a consistency baseline is evaluated with the consistency sampler it was trained to serve, and a
# flow-matching-trained (r = t only) student with Euler + CFG like a teacher.
SAMPLER_FILE = "anystep.json"


def read_sampler(folder) -> str:
    path = Path(folder) / SAMPLER_FILE
    if not path.exists():
        return "flowmap"
    try:
        sampler = json.loads(path.read_text()).get("sampler", "flowmap")
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if sampler not in SAMPLERS:
        raise ModelFolderError(f"{path}: unknown sampler {sampler!r} (expected one of {list(SAMPLERS)})")
    return sampler


def save_anyflow_folder(dest, transformer, text_encoder, tokenizer, codec, shift: float = 5.0, sampler: str = "flowmap",
                        training: dict | None = None) -> Path:
    from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, AnyFlowFARTransformer3DModel

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    cls = AnyFlowFARPipeline if isinstance(transformer, AnyFlowFARTransformer3DModel) else AnyFlowPipeline
    pipe = cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=codec,
        transformer=transformer,
        scheduler=FlowMapEulerDiscreteScheduler(shift=shift),
    )

    def write(tmp):
        pipe.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / SAMPLER_FILE).write_text(json.dumps({"sampler": sampler}) + "\n")
        write_model_card(tmp, training, name=Path(dest).name)

    atomic_save_folder(write, dest, kind="model")
    return Path(dest)


def read_model_index(folder) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise ModelFolderError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise ModelFolderError(f"not a folder: {folder}")
    index = folder / "model_index.json"
    if not index.exists():
        raise ModelFolderError(f"{folder} is not a diffusers model folder (no model_index.json)")
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{index} is not valid JSON: {e.msg} (line {e.lineno})") from None
    cls = data.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ModelFolderError(f"{folder}: unsupported pipeline class {cls!r} (expected one of {sorted(PIPELINE_CLASSES)})")
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in data:
            raise ModelFolderError(f"{folder}: model_index.json names no {part!r} component")
        if not (folder / part).is_dir():
            raise ModelFolderError(f"{folder}: component folder {part}/ is missing")
    return data


def is_toy_folder(folder) -> bool:
    """A folder of the toy world: its ``vae`` is our space-to-depth codec."""
    try:
        return json.loads((Path(folder) / "vae" / "config.json").read_text()).get("_class_name") == "SpaceToDepthCodec"
    except (OSError, json.JSONDecodeError):
        return False


def load_pipeline(folder, torch_dtype=None):
    """Load any supported folder with the diffusers pipeline class it names. A toy folder's
    transformer gets the padded-text cross-attention (anystep.models.padded_text)."""
    import diffusers
    from safetensors import SafetensorError

    from anystep.models.padded_text import WAN_TEXT_LENGTH, use_padded_text

    data = read_model_index(folder)
    cls = getattr(diffusers, data["_class_name"])
    try:
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        pipe = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{folder}: cannot load model: {first}") from None
    if is_toy_folder(folder):
        trained_on = int(getattr(pipe.tokenizer, "model_max_length", WAN_TEXT_LENGTH))
        if trained_on < WAN_TEXT_LENGTH:
            raise ModelFolderError(
                f"{folder}: a toy folder trained on text padded to {trained_on} rows (anystep before the toy "
                f"followed Wan's {WAN_TEXT_LENGTH}); diffusers' defaults would condition it wrongly: retrain it")
        use_padded_text(pipe.transformer)
        from anystep.models.toy import warn_if_narrow

        # Folders of the exact 48-channel codec (before 2026-12-04's projected codec) still load and
        # sample as they always did, noise and all.
        warn_if_narrow(pipe.transformer, str(folder))
    return pipe
