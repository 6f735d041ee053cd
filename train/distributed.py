"""Process-group setup and the few collectives the engine needs (gloo on CPU, nccl on GPU).

The same entry scripts run under `python` (one process), `torchrun` and the `deepspeed` launcher;
both launchers export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """cuda:local_rank when a GPU exists, else cpu."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes shared files."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(use_deepspeed: bool) -> DistInfo:
    """Join (or, for a single plain process, skip) the process group; returns this process's place.

    DeepSpeed always needs a process group, also for one process started with plain `python`:
    then a one-member group on a free local port is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if (world_size > 1 or use_deepspeed) and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # started by a launcher
            _init_process_group(backend, use_deepspeed, rank, world_size)
        else:
            # Plain `python`: a one-process group on a free local port. DeepSpeed reads these variables
            # itself (and would otherwise try MPI discovery), so they go into this process's environment.
            # The port is probed then bound: another process may take it in between, so retry.
            for attempt in range(5):
                os.environ.update(
                    RANK="0",
                    WORLD_SIZE="1",
                    LOCAL_RANK="0",
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(_free_port()),
                )
                try:
                    _init_process_group(backend, use_deepspeed, 0, 1)
                    break
                except dist.DistNetworkError:
                    if attempt == 4:
                        raise
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _init_process_group(backend: str, use_deepspeed: bool, rank: int, world_size: int) -> None:
    if use_deepspeed:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)


def is_distributed() -> bool:
    """True when a process group is up."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a short list of numbers over all ranks (float64, exact for counts)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Leave the process group."""
    if is_distributed():
        dist.destroy_process_group()
