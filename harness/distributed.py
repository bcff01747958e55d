"""Process-group plumbing: torchrun's environment, device choice, barrier, gather of predictions.

Single process (no ``WORLD_SIZE`` > 1 in the environment) is a no-op path: nothing is initialized,
``barrier`` returns at once and ``gather_predictions`` only sorts. Under ``torchrun`` the process
group uses NCCL on CUDA and gloo on the CPU. Every rank computes; rank 0 writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from harness.errors import HarnessError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise HarnessError(f"environment variable {name}={value!r} is not an integer") from None


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are absent."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise HarnessError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world, local


def select_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``None`` = CUDA when visible, else CPU; ``"cuda"`` means this process's GPU (``cuda:LOCAL_RANK``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError("device 'cuda' was asked for but no CUDA device is visible (use --device cpu)")
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise HarnessError(f"cuda:{index} asked for but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise HarnessError(f"unsupported device {str(device)!r}: use cuda or cpu")
    return device


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Read torchrun's environment, pick the device and (world size > 1) join the process group.

    Backend: NCCL for CUDA, gloo for CPU. Calling it again in an initialized process reuses the group.
    """
    rank, world, local = read_env()
    dev = select_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise HarnessError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def current_env(device: str | torch.device | None = None) -> DistEnv:
    """The environment of an already set-up process (after ``init_distributed``, or single-process);
    ``device`` None = CUDA when visible, else CPU."""
    rank, world = get_rank(), get_world_size()
    local = _env_int("LOCAL_RANK", 0) if world > 1 else 0
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=select_device(device, local))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_initialized():
        dist.destroy_process_group()


def shard_indices(num_items: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's evaluation shard: ``range(rank, num_items, world_size)``; no padding, no duplicate."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(rank, num_items, world_size)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (identity in a single process)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def gather_predictions(
    indexed: Sequence[tuple[int, Any]], num_items: int | None = None, dst: int = 0
) -> list[Any] | None:
    """Gather ``(dataset index, prediction)`` pairs from all ranks onto rank ``dst``, in dataset order.

    Returns the predictions (without indices) on ``dst`` and ``None`` elsewhere. An index seen twice,
    or (with ``num_items``) one missing, is a bug in the sharding and raises ``RuntimeError``.
    """
    local = list(indexed)
    if get_world_size() > 1:
        rank = get_rank()
        parts: list[Any] | None = [None] * get_world_size() if rank == dst else None
        dist.gather_object(local, parts, dst=dst)
        if rank != dst:
            return None
        pairs = [pair for part in parts for pair in part]
    else:
        pairs = local
    pairs.sort(key=lambda pair: pair[0])
    indices = [index for index, _ in pairs]
    if len(set(indices)) != len(indices):
        raise RuntimeError("gather_predictions: an image was predicted more than once")
    if num_items is not None and indices != list(range(num_items)):
        missing = sorted(set(range(num_items)) - set(indices))
        raise RuntimeError(f"gather_predictions: expected {num_items} images, missing {missing[:10]}")
    return [prediction for _, prediction in pairs]
