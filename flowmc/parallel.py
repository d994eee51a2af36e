r"""The process group of a ``torch.distributed`` job, for data-parallel training and sharded runs.

Under ``torchrun`` (environment ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) :func:`process_group` joins the job's process group — NCCL when the device is
CUDA, gloo otherwise, never hard-coded — with a timeout on every collective: a rank that fails or
stalls makes the others raise after ``timeout_s`` instead of waiting forever (``torchrun`` also
stops the surviving workers when one exits with an error).

Used by both :mod:`flowmc.training.distributed` (data-parallel training) and
:mod:`flowmc.sampling.shards` (the chains of a run spread over the ranks), so that neither
imports the other.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "process_group",
    "torchrun_env",
    "backend_for",
    "rank_device",
    "broadcast_flag",
    "barrier",
]

#: Timeout of every collective operation, in seconds.
DEFAULT_TIMEOUT_S = 600.0


class DistInfo(NamedTuple):
    """This process's place in a distributed job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        backend: ``"gloo"`` or ``"nccl"``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the torchrun environment, or ``None`` outside it.

    Raises:
        ValueError: if the variables are malformed or inconsistent.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(
            "Expected integer WORLD_SIZE, RANK and LOCAL_RANK in the environment; got "
            f"{os.environ.get('WORLD_SIZE')!r}, {os.environ.get('RANK')!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"Expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0; got RANK={rank}, "
            f"WORLD_SIZE={world}, LOCAL_RANK={local}"
        )
    return rank, world, local


def backend_for(device: str | torch.device) -> str:
    """NCCL for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str | torch.device, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``; CPU stays CPU.

    Raises:
        ValueError: if an explicit CUDA index is given to a multi-rank job.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None and world_size > 1:
        raise ValueError(
            f"Expected --device cuda (one GPU per rank, chosen by LOCAL_RANK) in a distributed "
            f"run; got {device}"
        )
    return torch.device("cuda", local_rank if device.index is None else device.index)


@contextmanager
def process_group(
    device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> Iterator[DistInfo | None]:
    """Join the distributed job this process belongs to, if any.

    * A process group that is already initialised (by the caller) is used and left open.
    * Under torchrun with ``WORLD_SIZE > 1`` the group is initialised from the environment
      (``env://``) with the backend of :func:`backend_for` and a ``timeout_s`` timeout on every
      collective, and destroyed on exit, also after an error.
    * Otherwise (one process) ``None`` is yielded.

    Raises:
        ValueError: if ``timeout_s`` is not positive or the environment is malformed.
        RuntimeError: if torch was built without ``torch.distributed``.
    """
    if not timeout_s > 0:
        raise ValueError(f"Expected a distributed timeout > 0 seconds; got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        env = torchrun_env()
        local = env[2] if env is not None else dist.get_rank()
        yield DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
        return
    env = torchrun_env()
    if env is None or env[1] == 1:
        yield None
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot run under torchrun")
    rank, world, local = env
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world
    )
    try:
        yield DistInfo(rank, world, local, backend)
    finally:
        dist.destroy_process_group()


def broadcast_flag(flag: bool, device: str | torch.device = "cpu", src: int = 0) -> bool:
    """Rank ``src``'s value of ``flag`` on every rank."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src)
    return bool(t.item())


def barrier(device: str | torch.device = "cpu") -> None:
    """Wait for every rank (with the process group's timeout)."""
    device = torch.device(device)
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index if device.index is not None else 0])
    else:
        dist.barrier()
