"""Ranks and collectives under ``torchrun``: where this process stands (:class:`World`), joining and leaving
the process group, and the collectives the shell uses (barrier, gather, broadcast from rank 0, sums, sharing a
list among the ranks). It imports nothing from ``shell``: every layer above may use it.

    torchrun --nproc-per-node 2 -m shell.grpo ...        # or --nnodes N with a rendezvous, for several machines

A plain ``python -m shell.grpo`` is world size 1: no process group, and every function here is the identity
(or nothing) there.

The loops are SPMD: every rank runs the same loop on the same *global* data (the same batch indices,
rollouts, rewards, held-out set), and the expensive parts are split under it (sampling:
:class:`shell.sampling.sharded.ShardedSampler`; grading: :func:`shell.grading.grade_batch`; training:
:mod:`shell.fsdp`; I/O: rank 0, and checkpoints: :mod:`shell.checkpoint`). A loop needs the world size only
where it plans work that every rank must run evenly: the flag checks (:func:`require_world_multiple`), the
warm start's microbatches, and expert iteration's SFT plan (``shards=launched_world_size()``).

Collectives must be called by every rank in the same order. Backends: NCCL for CUDA tensors (gloo for CPU
ones) when a GPU is present, else gloo. Threads: torchrun sets ``OMP_NUM_THREADS=1`` per rank when it starts
several on a node (set it yourself to give each rank more).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "World",
    "active",
    "add_up",
    "barrier",
    "close_world",
    "from_main",
    "gather",
    "init_world",
    "interleave",
    "is_main",
    "launched_world_size",
    "main_first",
    "require_world_multiple",
    "share",
    "share_evenly",
    "share_of",
    "sum_over_ranks",
    "unshare",
    "world",
]

T = TypeVar("T")

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective waits for the slowest rank (a rank evaluating its share, rank 0 writing a checkpoint)."""


# ------------------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """Where this process stands: its ``rank`` (``RANK``; rank 0 writes) among ``size`` ranks in all
    (``WORLD_SIZE``), and on its node: ``local_rank`` (``LOCAL_RANK``, its GPU) of ``local_size`` ranks
    (``LOCAL_WORLD_SIZE``, the resume command's ``--nproc-per-node``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0


def launched_world_size() -> int:
    """The world size torchrun launched this process with (``WORLD_SIZE``; 1 without torchrun). Readable before
    the process group exists: the loops' flag checks use it."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def active() -> bool:
    """Is a process group of more than one rank up?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> World:
    """This process's :class:`World` (``World()`` without a process group)."""
    if not active():
        return World()
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def is_main() -> bool:
    """Rank 0, or the only process (from ``RANK`` before the process group exists)."""
    if active():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def init_world() -> World:
    """Join the process group torchrun set up (idempotent): NCCL for CUDA tensors and gloo for CPU ones when a
    GPU is present (each rank on GPU ``LOCAL_RANK``), gloo alone otherwise. World size 1: nothing."""
    if dist.is_available() and dist.is_initialized():
        return world()
    if launched_world_size() <= 1:
        return World()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    return world()


def close_world(*, wait: bool = True) -> None:
    """Leave the process group (if any). ``wait``: first wait for every rank to get here (a rank that tears its
    gloo connections down while another still writes can abort, "terminate called without an active
    exception"); a rank leaving on an error does not wait for the others."""
    if dist.is_available() and dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def require_world_multiple(value: int, flag: str) -> None:
    """``ValueError`` naming ``flag`` unless ``value`` is a multiple of the launched world size (each rank must
    run as many microbatches as the others)."""
    n = launched_world_size()
    if value % n:
        raise ValueError(f"{flag} ({value}) must be a multiple of the number of ranks ({n}): each rank runs "
                         f"{flag} / {n} of every optimizer step's microbatches")


# ------------------------------------------------------------------------------------------------ collectives


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        dist.barrier()


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in one process."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (one decision for all: a budget stop, a checkpoint's path)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; when it raises, every rank raises the
    same exception (so a refused start exits every rank together instead of leaving the others waiting)."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if dist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            outcome = (False, e)
    ok, value = from_main(outcome)
    if not ok:
        raise value
    return value


def add_up(values: Sequence[T]) -> T:
    """The element-wise sum of equally shaped values: numbers, dicts of numbers (a key missing from some counts
    0 there), or tuples of those."""
    first = values[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for v in values for k in v))  # type: ignore[union-attr]
        return {k: add_up([v[k] for v in values if k in v]) for k in keys}  # type: ignore[return-value,index]
    if isinstance(first, tuple):
        return tuple(add_up([v[i] for v in values]) for i in range(len(first)))  # type: ignore[return-value,index]
    return sum(values[1:], first)  # type: ignore[arg-type,return-value]


def sum_over_ranks(value: T) -> T:
    """:func:`add_up` of every rank's ``value`` (the value itself in one process)."""
    return add_up(gather(value)) if active() else value


def share_of(items: Sequence[T], rank: int, size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` among ``size`` ranks: items ``rank, rank + size, …`` (strided, so ranks
    get similar items when ``items`` are sorted, e.g. microbatches by length)."""
    return list(items[rank::size])


def interleave(parts: Sequence[Sequence[T]]) -> list[T]:
    """The inverse of :func:`share_of`: the items in their original order from every rank's share."""
    out: list[T] = []
    for i in range(max((len(p) for p in parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (all of them in one process)."""
    w = world()
    return share_of(items, w.rank, w.size)


def share_evenly(items: Sequence[T], what: str = "microbatches") -> list[T]:
    """:func:`share`, when every rank gets as many items (FSDP needs every rank to run as many microbatches);
    ``ValueError`` otherwise."""
    n = world().size
    if len(items) % n:
        raise ValueError(f"{len(items)} {what} cannot be shared evenly by {n} ranks")
    return share(items)


def unshare(local: Sequence[T]) -> list[T]:
    """Every rank's share (from :func:`share`) put back together, in the original order, on every rank."""
    return interleave(gather(list(local))) if active() else list(local)
