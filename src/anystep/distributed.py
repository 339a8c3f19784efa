"""torchrun + FSDP2: process group, device, sharding, and the few collectives training needs.

Outside torchrun every function here is the identity (world size 1, no process group), so one code
path trains the toy model on a laptop and Wan under ``torchrun --nproc_per_node=N -m anystep``.

* ``setup()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), initialises the process
  group (NCCL on CUDA, gloo on CPU) and picks the device.
* ``shard()`` applies ``fully_shard`` to every transformer block and then to the root, with bf16
  parameters and fp32 gradient reduction on CUDA. Gradients are averaged over ranks by FSDP, so a
  rank's loss must be the mean over its own samples: with equal per-rank batches that is the
  gradient of the global-batch mean, the same as one process with the whole batch.
* ``all_sum()`` / ``global_mean()`` give the statistics Algorithm 1 defines over the *global* batch
  (the adaptive weight's mu) and the logged losses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(timeout_s: float | None = None) -> DistEnv:
    """The process group and device for this process (idempotent)."""
    world = launched_world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s or float(os.environ.get("ANYSTEP_DIST_TIMEOUT_S", "1800")))
        _report_termination(rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def _report_termination(rank: int) -> None:
    """torchrun stops the surviving ranks with SIGTERM when one dies: say so in one line (the
    checkpoint folder is swapped in by rename, so the last complete checkpoint stays loadable).

    The main thread may be blocked inside a collective waiting for the dead rank, where a Python
    signal handler would never run; so SIGTERM is blocked for every thread (before the process
    group starts its own) and taken by one waiting thread instead.
    """
    import threading

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_term():
        signal.sigwait({signal.SIGTERM})
        print(f"anystep: rank {rank} stopped (SIGTERM): another rank failed or the job was cancelled; "
              "the last complete checkpoint is kept", file=sys.stderr, flush=True)
        os._exit(2)

    threading.Thread(target=wait_for_term, name="anystep-sigterm", daemon=True).start()


def current() -> DistEnv:
    """The environment of an already set-up process (world size 1 without a process group)."""
    if not dist.is_initialized():
        return DistEnv(device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    return setup()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a small tensor over ranks (a float64 copy; the identity without a process group)."""
    if not dist.is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(buf)
    return buf.to(values.device)


def global_mean(local: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks, keys in sorted order so every rank reduces the same list."""
    if not dist.is_initialized() or not local:
        return local
    keys = sorted(local)
    vals = all_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)) / dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, vals.tolist())}


def transformer_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks diffusers marks as not splittable (``_no_split_modules``), in order."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks and hasattr(module, "blocks"):
        blocks = list(module.blocks)
    return blocks


def shard(module: torch.nn.Module, env: DistEnv, mixed_precision: bool = True) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` per transformer block, then the root (embedders, head, leftovers).

    A no-op at world size 1. Frozen and trainable parameters may share a block (LoRA, the critic's
    adapters on the teacher): FSDP2 shards both and reduces gradients only for the trainable ones.
    """
    if not env.distributed:
        return module
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # No input casting: FSDP would round the timesteps (sigma x 1000) to bf16, whose spacing above
    # 512 is 4 -- coarser than Eq. 4's +-5 finite-difference offsets -- and would copy the KV-cache
    # dict a causal rollout writes into. The velocity helpers cast latents and text embeddings to
    # ``anystep_compute_dtype`` themselves; timesteps stay fp32.
    mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    bf16 = mixed_precision and (env.device.type == "cuda" or os.environ.get("ANYSTEP_FSDP_BF16_ON_CPU") == "1")
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    module.to(env.device)
    module.anystep_compute_dtype = torch.bfloat16 if bf16 else None
    for block in transformer_blocks(module):
        fully_shard(block, mp_policy=mp)
    # The root reshards after forward too: a no-grad forward (a rollout, a score) is never followed
    # by a backward that would reshard it, and a root left unsharded hides its DTensor parameters
    # from the optimiser / checkpoint state dicts.
    fully_shard(module, mp_policy=mp, reshard_after_forward=True)
    return module


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def autocast(env: DistEnv, enabled: bool = True):
    """bf16 autocast for an unsharded model on CUDA (FSDP's policy casts a sharded one)."""
    if enabled and env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def local_value(t):
    """A plain tensor from a DTensor (the full value, gathered) or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shutdown(together: bool = True) -> None:
    """Leave together: a rank that tears its group down while another still talks to it aborts.
    ``together=False`` after a failure, when the other ranks may be gone."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
