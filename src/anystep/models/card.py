"""The model card (``README.md``) written into every model folder: what the model is, how it was
made, how to sample it, and a diffusers snippet that runs as it is (a test runs it).

The card is read from the folder itself (pipeline class, sampler, sizes, codec), so it can be
written for a folder made by any version of the toolkit; ``training`` adds what only the training
run knows (method, steps, config).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

CARD_FILE = "README.md"
# The toy world's canvas and clip lengths (docs/toy-world.md); a Wan VAE folder gets the reference
# 81 frames at 480x832.
TOY_SIZE = (32, 32)

_KIND = {
    "WanPipeline": "teacher (flow matching, Euler + classifier-free guidance)",
    "AnyFlowPipeline": "AnyFlow flow-map student, bidirectional",
    "AnyFlowFARPipeline": "AnyFlow-FAR flow-map student, causal (chunk by chunk over a KV cache)",
}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def describe(folder) -> dict:
    """What the card says, from the folder's own files."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    cls = index.get("_class_name", "?")
    tcfg = _json(folder / "transformer" / "config.json")
    vcfg = _json(folder / "vae" / "config.json")
    sampler = _json(folder / "anystep.json").get("sampler", "flowmap") if cls != "WanPipeline" else "euler_cfg"
    toy = vcfg.get("_class_name") == "SpaceToDepthCodec"
    temporal = int(vcfg.get("scale_factor_temporal", 1 if toy else 4))
    part = tcfg.get("chunk_partition")
    if part:
        latent_frames = sum(part)
    else:
        latent_frames = 7 if toy else 21
    frames = (latent_frames - 1) * temporal + 1
    height, width = TOY_SIZE if toy else (480, 832)
    teacher = cls == "WanPipeline"
    steps = {"euler_cfg": 50 if teacher else 32, "flowmap": 4, "consistency": 4}[sampler]
    guidance = 4.0 if sampler == "euler_cfg" else 1.0
    params = 0
    for f in (folder / "transformer").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                params += _numel(h.get_slice(k).get_shape())
    return dict(cls=cls, kind=_KIND.get(cls, cls), sampler=sampler, toy=toy, frames=frames, height=height, width=width,
                steps=steps, guidance=guidance, params=params, chunk_partition=part, temporal=temporal,
                z_dim=int(vcfg.get("z_dim", 16)), spatial=int(vcfg.get("scale_factor_spatial", vcfg.get("patch", 8))),
                shift=_json(folder / "scheduler" / "scheduler_config.json").get("shift"))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def snippet(folder_name: str, d: dict) -> str:
    """diffusers code that samples the folder (run from the folder's parent directory)."""
    # diffusers' Wan-family pipelines round num_frames to (n - 1) // temporal * temporal + 1 and, for
    # a codec without temporal compression, add one frame: ask for one fewer there.
    ask_frames = d["frames"] - 1 if d["temporal"] == 1 else d["frames"]
    lines = ["import torch"]
    if d["toy"]:
        lines.append("import anystep.models.codec  # lets diffusers load the toy codec, the folder's stand-in for the Wan VAE")
    lines += [
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder_name}")  # {d["cls"]}',
        "video = pipe(",
        '    "a red three moving left",' if d["toy"] else '    "a cat walking on the grass, realistic",',
        f'    num_inference_steps={d["steps"]}, height={d["height"]}, width={d["width"]},',
        f'    num_frames={ask_frames},  # returns {d["frames"]} frames',
    ]
    if d["cls"] == "WanPipeline":
        lines.append(f'    guidance_scale={d["guidance"]},')
    lines += ['    generator=torch.Generator().manual_seed(0), output_type="np",', ").frames[0]",
              "print(video.shape)  # (frames, height, width, 3) in [0, 1]"]
    return "\n".join(lines)


def card_text(folder, training: dict | None = None, name: str | None = None) -> str:
    folder = Path(folder)
    d = describe(folder)
    name = name or folder.name
    rows = [
        ("model", d["kind"]),
        ("transformer parameters", f"{d['params'] / 1e6:.2f} M" if d["params"] < 1e9 else f"{d['params'] / 1e9:.2f} B"),
        ("clip", f"{d['frames']} frames at {d['height']}x{d['width']}"
         + (f", chunk partition {d['chunk_partition']} (latent frames)" if d["chunk_partition"] else "")),
        ("sampling", {"euler_cfg": f"Euler with classifier-free guidance {d['guidance']} (2 network calls a step)",
                      "flowmap": "flow-map steps z_r = z_t - (t - r) u(z_t, t, r), no guidance (fused in training), any step count",
                      "consistency": "the consistency sampler (x0 prediction and re-noising); sample it with `anystep generate`, "
                                     "diffusers' pipeline takes flow-map steps this baseline was not trained for"}[d["sampler"]]),
        ("recommended steps", f"{d['steps']}" + (" (any step count from 1 works: one model)" if d["sampler"] == "flowmap" else "")),
        ("time shift", str(d["shift"])),
    ]
    for k, v in (training or {}).items():
        rows.append((k, str(v)))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# {name}

A diffusers model folder written by anystep (AnyFlow: any-step video diffusion distillation with
flow maps).

| | |
| --- | --- |
{table}

## Sample it with diffusers

```python
{snippet(name, d)}
```

## Sample it with anystep

```bash
anystep generate --model {name} --prompt "{'a red three moving left' if d['toy'] else '...'}" --steps {d['steps']} --out clip.mp4
```

{_same_clip_note(d)}
"""


def _same_clip_note(d: dict) -> str:
    if d["cls"] == "WanPipeline":
        return ("`anystep generate` samples a teacher with its own Euler loop on the grid the students use,\n"
                "`shift(linspace(1, 0, N + 1))`, where `WanPipeline`'s scheduler ends at 1/1000 and then jumps to 0:\n"
                "the two give close but not identical clips.")
    return ("`anystep generate --seed S` draws clip i's noise from `torch.Generator().manual_seed(S + i)` in the\n"
            "pipeline's own layout, so the snippet above with `manual_seed(S)` gives exactly `anystep generate`'s clip\n"
            "for the same prompt, steps and seed; for several prompts pass one generator per prompt,\n"
            "`generator=[torch.Generator().manual_seed(S + i) for i in range(len(prompts))]`.")


def write_model_card(folder, training: dict | None = None, name: str | None = None) -> Path:
    """Write ``folder/README.md`` (call it on the temporary folder before it is renamed into place)."""
    path = Path(folder) / CARD_FILE
    path.write_text(card_text(folder, training, name))
    return path


def training_rows(cfg, method: str) -> dict:
    """The card's rows that only the training run knows."""
    rows = {"trained by": f"`anystep train {method}`"}
    for key, label in (("teacher", "teacher"), ("student", "initial student"), ("rollout", "rollout"),
                       ("steps", "training steps"), ("batch_size", "batch size per rank")):
        if getattr(cfg, key, None) not in (None, ""):
            rows[label] = getattr(cfg, key)
    if getattr(cfg, "out", None):
        rows["full config"] = f"`{Path(cfg.out) / 'config.json'}` of the run"
    return rows
