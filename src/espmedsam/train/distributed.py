"""The process group of a ``torchrun`` launch: one process per device, who is rank 0, and the collectives.

``torchrun`` (or ``python -m torch.distributed.run``) starts the processes and gives each RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`process_group` joins them (``env://``) when
WORLD_SIZE > 1: nccl with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU. Multi-node runs join
the same way through torchrun's rendezvous. With one process nothing is initialised and every helper is
the single-process identity, so a run without torchrun takes exactly the code path it always did.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from espmedsam.device import resolve_device
from espmedsam.errors import ConfigError, InputError

T = TypeVar("T")
# one gradient bucket, reduced when the whole backward is done (see ``data_parallel``): 1 TiB
_ONE_BUCKET_MB = 2**20


def world_size() -> int:
    """Processes in the run: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun); read from RANK before the group is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def is_distributed() -> bool:
    """Inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[torch.device]:
    """This process's device, inside the process group that torchrun describes.

    One process: ``resolve_device(device)``, nothing else. Several: a CUDA device becomes
    cuda:LOCAL_RANK (any ``cuda:N`` asked for is replaced) with the nccl backend, the CPU uses gloo; the
    group is joined on entry (unless one exists already) and destroyed on exit if joined here.

    Raises:
        ConfigError: an unknown device, or CUDA asked for where there is none.
        InputError: more processes on a machine than it has GPUs (raised on the surplus ranks only).
    """
    target = resolve_device(device)
    if world_size() == 1:
        yield target
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1, but this torch build has no torch.distributed")
    if target.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} GPUs: start at most one "
                "process per GPU (torchrun --nproc_per_node)"
            )
        target = torch.device("cuda", local_rank())
        torch.cuda.set_device(target)
    joined = not dist.is_initialized()
    if joined and target.type == "cuda":  # device_id: the communicator is bound to this GPU at once
        dist.init_process_group("nccl", init_method="env://", device_id=target)
    elif joined:
        dist.init_process_group("gloo", init_method="env://")
    try:
        yield target
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device, *, unused_parameters: bool = True) -> nn.Module:
    """``module`` under DistributedDataParallel in a process group of several processes, else itself.

    ``unused_parameters`` (DDP's ``find_unused_parameters``): a modality absent from one rank's share
    leaves its controller and hypernetwork out of that rank's graph; DDP then reduces zeros for it there,
    and a parameter unused on every rank keeps its ``None`` gradient everywhere, so AdamW leaves it
    untouched as in one process. False where every trainable parameter is used in every step.
    One bucket: synchronised batch norm (``sync_batchnorm``) runs collectives inside the backward, and
    which buckets are ready when depends on each rank's graph; reducing all gradients once, after the
    backward, keeps every rank's collectives in the same order (at the cost of no overlap of the reduction
    with the backward).
    """
    if not is_distributed():
        return module
    # depthwise kernels (C, 1, k, k) get gradients whose stride differs only on the size-1 axis: the same
    # memory layout, which DDP still reports once per process
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=unused_parameters,
        bucket_cap_mb=_ONE_BUCKET_MB,
    )


def share(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (all of them in one process); shares differ by at most
    one item, and are empty where there are fewer items than processes."""
    count, size, index = len(items), world_size(), rank()
    return list(items[index * count // size : (index + 1) * count // size])


def strided_share(items: Sequence[T]) -> list[T]:
    """Items ``rank, rank + N, ...`` of ``items`` (all of them in one process)."""
    return list(items[rank() :: world_size()])


def fill_together(
    chunks: Sequence[Sequence[T]],
    fill: Callable[[Sequence[T]], int],
    missing: Callable[[], Sequence[Sequence[T]]],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill a cache with the ranks sharing the work: ``fill`` (which returns how many entries it wrote)
    runs on chunks ``rank, rank + N, ...`` of ``chunks`` (all of them in one process), and ``progress``
    gets (done, total) of this rank's share. Under torchrun, once every rank is done, each fills the
    chunks ``missing()`` still lists for it: a cache folder that the machines do not share.

    Every rank must list ``chunks`` before any rank writes (the barrier first), so all list the same.
    """
    barrier()
    mine = strided_share(chunks)
    total, done = sum(map(len, mine)), 0
    for chunk in mine:
        done += fill(chunk)
        if progress is not None:
            progress(done, total)
    if is_distributed():
        barrier()
        for chunk in missing():
            fill(chunk)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks, as a new tensor on ``values``' device (``values`` in one process)."""
    if not is_distributed():
        return values
    reduced = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(values.device)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank: decisions taken from rank-local clocks must agree, or ranks hang."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
