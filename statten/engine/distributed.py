"""Process-group setup for ``torchrun`` (NCCL on GPUs, Gloo on CPU) and metric reduction."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0  # torch's default for Gloo
# What a failed collective says when a peer died or stopped answering: Gloo raises RuntimeErrors
# from its TCP transport ("[.../gloo/transport/tcp/...] Timed out waiting ...", "... Connection
# closed by peer ...") or, once the pair is closed, "Application timeout caused pair closure";
# NCCL and the store raise torch.distributed.DistError.
_GLOO_LOST_PEER = ("gloo/transport/", "Application timeout caused pair closure")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    A collective that waits ``timeout_s`` for another process fails instead of hanging for good
    (with NCCL the watchdog then ends the process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        torch_device = torch.device(
            "cuda", local_rank if world_size > 1 else (torch_device.index or 0)
        )
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch_device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    return DistributedContext(rank, world_size, local_rank, torch_device)


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum a tensor over all ranks (identity in a single process)."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def lost_contact(error: BaseException) -> str | None:
    """What went wrong, in one short phrase, if ``error`` is a collective that lost its peers."""
    if not isinstance(error, dist.DistError) and not any(
        marker in str(error) for marker in _GLOO_LOST_PEER
    ):
        return None
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    without_source = re.sub(r"^\[[^\]]*\]\s*", "", first_line)  # "[.../pair.cc:561] ..."
    return without_source.split(". ")[0].rstrip(".")


@contextmanager
def leave_group_after(ctx: DistributedContext) -> Iterator[None]:
    """Leave the process group (if any) when the ``with`` block ends.

    A block that ends normally first waits at a barrier for every rank, so that no rank tears
    down its Gloo connections while another still uses them (which can abort the slower rank at
    exit); one that raises leaves at once, since its peers may be gone.
    """
    try:
        yield
        if ctx.distributed:
            dist.barrier()
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
