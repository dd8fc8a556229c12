"""Several processes under torchrun: one place for ranks, the process group and sharding.

    torchrun --standalone --nproc_per_node 2 -m cma_clip.train ...      (one machine)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host:29500 -m cma_clip.train ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; without them (a plain
`python -m ...`) everything here is a no-op for a single process of rank 0. The backend
is NCCL on GPUs and gloo on the CPU.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .runtime import resolve_device


def setup() -> tuple[int, int, int, torch.device]:
    """(rank, world_size, local_rank, device); joins the process group when WORLD_SIZE > 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local_rank, device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (any picklable value; a no-op for one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean(value: float) -> float:
    """The mean of a number over all ranks."""
    if not active():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def shard(items: Sequence, rank: int, world: int) -> Sequence:
    """Rank `rank`'s contiguous share of `items`: shard sizes differ by at most one and,
    concatenated in rank order, give back `items`."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
