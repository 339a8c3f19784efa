"""LoRA on a flow-map student through peft (diffusers' ``PeftAdapterMixin``).

Reference recipe (docs/design.md section 3): rank 256, alpha 256 on attn1 q/k/v/out.0 and the
feed-forward (ffn.net.0.proj, ffn.net.2); the student also trains its time and delta embedders in
full. Export merges the adapters, so the written folder needs no peft to load.
"""

from __future__ import annotations

from peft import LoraConfig

#: The reference recipe's adapter targets: attn1 q/k/v/out and the feed-forward.
REFERENCE_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2")
EMBEDDER_PREFIXES = ("condition_embedder.time_embedder.", "condition_embedder.delta_embedder.")
ADAPTER = "anystep"


def add_student_lora(model, rank: int, alpha: int, targets: list[str], train_embedders: bool = True):
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = {n for n, _ in model.named_modules()}
    for t in targets:
        if not any(n.endswith(t) for n in names):
            raise ValueError(f"LoRA target {t!r} matches no module of {type(model).__name__}")
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True), adapter_name=ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or (train_embedders and n.startswith(EMBEDDER_PREFIXES)))
    return model


def merge_student_lora(model):
    """Fold the adapters into the base weights and drop them: a plain diffusers model again."""
    model.fuse_lora(lora_scale=1.0, adapter_names=[ADAPTER])
    model.unload_lora()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
