"""Data-parallel runs under ``torchrun``: process group, rank-0-only side effects, global batches.

``torchrun --nproc_per_node N -m medanomaly train ...`` starts N processes; :func:`init_from_env`
joins them (gloo on the CPU, NCCL on CUDA with one GPU per process, ``cuda:LOCAL_RANK``). Without
WORLD_SIZE (or with 1) every function here is a no-op: single-process runs are unchanged.

Equivalence with one process: every rank draws the same global batch and the same augmentation
from the same seeded generator; :class:`GlobalBatch` runs the network (wrapped in PyTorch's
``DistributedDataParallel``) on this rank's rows only and gathers the outputs of all ranks, so the
loss is the one of the whole global batch (pooled losses such as batch Dice included); gradients
are *summed* over ranks, which gives exactly the gradient of that loss.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medanomaly.core.errors import MedanomalyError
from medanomaly.core.runtime import resolve_device

log = logging.getLogger(__name__)
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """This process in a run: its rank among world_size, its rank on this node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent): known before any process group exists."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit():
        raise MedanomalyError(f"WORLD_SIZE={value!r} is not a number; launch with torchrun or unset it")
    return max(1, int(value))


def _device_for(device_arg: str, local_rank: int, world: int) -> torch.device:
    if world == 1:
        return resolve_device(device_arg)
    if device_arg == "cpu" or (device_arg == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device_arg not in ("auto", "cuda"):
        raise MedanomalyError(f"--device {device_arg} under torchrun: each process uses its own GPU, "
                              "cuda:LOCAL_RANK; pass --device cuda (or auto), or --device cpu")
    if not torch.cuda.is_available():
        raise MedanomalyError("--device cuda under torchrun but no CUDA GPU is available; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise MedanomalyError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                              "start at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_from_env(device_arg: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (a no-op without it).

    ``device_arg``: the --device flag (auto, cpu, cuda); under torchrun auto is cuda:LOCAL_RANK
    where CUDA is available, else the CPU. ``backend``: default nccl on CUDA, gloo on the CPU.
    """
    world = env_world_size()
    if world == 1:
        return DistInfo(device=str(_device_for(device_arg, 0, 1)))
    missing = [k for k in ENV_VARS if not os.environ.get(k)]
    if missing:
        raise MedanomalyError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                              "'torchrun --nproc_per_node N -m medanomaly ...' (or unset WORLD_SIZE)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = _device_for(device_arg, local_rank, world)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 alone validates and calibrates while the others wait: allow an hour for that
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method="env://",
                                timeout=timedelta(minutes=60))
        atexit.register(shutdown)
        log.info("process %d of %d (local rank %d) on %s, backend %s", rank, world, local_rank, device,
                 dist.get_backend())
    return DistInfo(rank, world, local_rank, str(device))


def world_size() -> int:
    """Processes in the current run (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """True in the process that logs and writes files (rank 0), and always in a single-process run."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op in a single-process run)."""
    if world_size() > 1:
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value of a picklable object on every rank (decisions that must agree)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(world_size())


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, n_train: int | None = None) -> None:
    """The global batch must split into equal shards, one per process (and, with ``n_train``
    training slices, be full: an epoch of fewer slices than a batch is one short batch)."""
    world = world_size()
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise MedanomalyError(f"--batch-size {batch_size} is the global batch and must divide evenly among the "
                              f"{world} processes; use --batch-size {upper}" + (f" or {lower}" if lower else ""))
    if world > 1 and n_train is not None and n_train < batch_size:
        fit = f"use --batch-size {n_train // world * world}" if n_train >= world else "add training cases"
        raise MedanomalyError(f"the training split has {n_train} slices, fewer than the global batch {batch_size} "
                              f"of {world} processes; {fit}")


def _allreduce_sum(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP communication hook: sum (not average) the gradients, see :class:`GlobalBatch`."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class GlobalBatch(torch.nn.Module):
    """Run ``module`` data-parallel on a global batch; return the output of the whole batch.

    Rank r takes rows r, r + W, r + 2W, ... (strided, so the lesion-rich rows that
    :func:`medanomaly.train.sources.batch_indices` puts first are spread over ranks), runs them through
    ``DistributedDataParallel(module)``, and all-gathers the outputs (float32) of the other ranks,
    detached, into the rows they came from. A loss of the returned tensor equals the
    single-process loss; backward reaches this rank's rows only, and DDP sums the gradients
    over ranks: the sum is the gradient of the global loss.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        dev = next(module.parameters()).device
        self.ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda"
                                                             else None)
        self.ddp.register_comm_hook(None, _allreduce_sum)
        self.world, self.rank = world_size(), rank()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x.shape[0])
        layout = torch.channels_last if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        local = self.ddp(x[self.rank::self.world].contiguous(memory_format=layout)).float()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.stack(parts, dim=1).flatten(0, 1)  # row i*W + r is row i of rank r


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself in a single-process run, else a :class:`GlobalBatch` around it. Build it
    again when the set of trainable parameters changes (DDP registers them once)."""
    return GlobalBatch(model) if world_size() > 1 else model
