"""Scale-out on ``torch.distributed``: one process per rank under ``torchrun``, FSDP2 data parallelism.

    torchrun --nproc-per-node 2 -m shell.grpo ...        # or --nnodes N with a rendezvous, for several machines

A plain ``python -m shell.grpo`` is world size 1: no process group, nothing here changes what it does.

The loops stay SPMD and world-size blind: every rank runs the same loop on the same *global* data (the
same batch indices, rollouts, rewards, held-out set), and the expensive parts are split under it:

* **sampling** -- :class:`ShardedSampler`: each rank samples its share of the prompts (prompt ``i`` on rank
  ``i mod N``) with its own engine and every rank gets all completions back, in order. The noise of a sample
  is a function of (seed, key, sample index), so HF rollouts do not depend on the world size.
* **grading** -- :func:`shell.grading.grade_batch` grades each rank's share of the items.
* **training** -- the policy is sharded with FSDP2 (:func:`shard_model`); each rank runs its share of each
  optimizer step's microbatches (the microbatches a single process would run, ``k / N`` of them), and FSDP
  *sums* the gradients, so the update equals the single-process update on the same global batch. Logged
  sums (loss, tokens) are summed over ranks (:func:`sum_over_ranks`).
* **I/O** -- rank 0 alone writes metrics, generations, plots, wandb and ``final/``; checkpoints are
  ``torch.distributed.checkpoint`` folders each rank writes its part of (:func:`save_sharded_checkpoint`).

Collectives must be called by every rank in the same order. FSDP2's are kept independent of what a rank's
microbatches look like: every layer stays gathered from its forward through its backward
(``reshard_after_forward=False``), so a shared-prompt-prefix forward or activation checkpointing adds no
all-gather; inference passes run inside one :func:`gathered` block (one all-gather, any number of forwards);
and a microbatch with nothing to learn still runs a zero-gradient pass (:func:`zero_gradient_pass`).

Backends: NCCL for CUDA tensors (gloo for CPU ones) when a GPU is present, else gloo. Threads: torchrun sets
``OMP_NUM_THREADS=1`` per rank when it starts several on a node (set it yourself to give each rank more).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from shell.checkpoint import (
    Checkpoint, list_checkpoints, newest_intact_checkpoint, prune_checkpoints, rng_state, set_rng_state, write_manifest,
)
from shell.files import publish_dir

__all__ = [
    "SHARDED",
    "GatheredWeights",
    "ShardedSampler",
    "World",
    "active",
    "add_up",
    "barrier",
    "check_resume_world",
    "checkpoint_world_size",
    "close_world",
    "from_main",
    "gather",
    "gather_state_dict",
    "gathered",
    "init_world",
    "interleave",
    "is_main",
    "is_sharded",
    "launched_world_size",
    "load_sharded_checkpoint",
    "main_first",
    "max_abs_weight",
    "require_world_multiple",
    "sampler_copy_dtype",
    "save_sharded_checkpoint",
    "shard_model",
    "share",
    "share_evenly",
    "share_of",
    "sum_over_ranks",
    "unshare",
    "unsharded_copy",
    "world",
    "zero_gradient_pass",
]

T = TypeVar("T")

SHARDED = "sharded"
"""The folder of a checkpoint that holds its ``torch.distributed.checkpoint`` shards (model and optimizer)."""

TIMEOUT = datetime.timedelta(minutes=30)
"""How long a collective waits for the slowest rank (a rank evaluating its share, rank 0 writing a checkpoint)."""


# ------------------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` ranks, and on its node."""

    rank: int = 0
    """This process's rank (``RANK``); 0 writes."""
    size: int = 1
    """How many ranks in all (``WORLD_SIZE``)."""
    local_rank: int = 0
    """This process's rank on its node (``LOCAL_RANK``): its GPU."""
    local_size: int = 1
    """Ranks on this node (``LOCAL_WORLD_SIZE``): the resume command's ``--nproc-per-node``."""

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


# ------------------------------------------------------------------------------------------------ the policy


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: Any) -> bool:
    """Is ``model`` sharded by FSDP2 (:func:`shard_model`)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer (the model's ``_no_split_modules``) and at the root, in place,
    over all ranks; returns ``model``.

    Gradients are *summed* over ranks (each rank's loss is already its part of the global batch's loss). Layers
    stay gathered from their forward through their backward (``reshard_after_forward=False``: ZeRO-2-like
    memory, the whole policy gathered during a microbatch), which keeps the collectives the same on every rank
    whatever its microbatches do. On GPU: float32 master weights, bf16 compute, float32 gradient reduction
    (``MixedPrecisionPolicy``); on CPU: float32 (the loops' bf16 autocast still applies).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world().size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        model.float()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for m in _fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


_GATHERED: dict[int, int] = {}


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the sharded ``model`` is whole on every rank (one all-gather on entry, resharded on
    exit), so each rank may run any number of forwards (inference passes: old log-probs, entropies) without a
    collective. Re-entrant; nothing for a model that is not sharded."""
    if not is_sharded(model):
        yield
        return
    if _GATHERED.get(id(model)):  # already whole: an inner block
        _GATHERED[id(model)] += 1
        try:
            yield
        finally:
            _GATHERED[id(model)] -= 1
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
    _GATHERED[id(model)] = 1
    try:
        yield
    finally:
        _GATHERED.pop(id(model), None)
        for m in modules:
            m.reshard()


def zero_gradient_pass(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    """A forward and backward with zero gradient (on one token of ``input_ids``): a rank whose microbatch has
    nothing to learn still takes part in FSDP's gradient reduction."""
    out = model(input_ids=input_ids[:1, :1])
    (out.logits.float().sum() * 0.0).backward()


def max_abs_weight(params: Sequence[torch.Tensor]) -> float:
    """The largest |weight| over ``params`` (over every rank's shards of sharded ones)."""
    from torch.distributed.tensor import DTensor

    local = [(p.to_local() if isinstance(p, DTensor) else p).detach() for p in params]
    with torch.no_grad():
        maxima = [t.abs().max() for t in local if t.numel()]
        value = float(torch.stack(maxima).max()) if maxima else 0.0
    return max(gather(value))


def gather_state_dict(model: torch.nn.Module, *, tied_once: bool = False) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s full (unsharded) state dict on every rank (every rank must call it): every
    name, tied ones included (what samplers load), or with ``tied_once`` a tied weight under its first name
    only (what ``save_pretrained`` writes for a model in one process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if tied_once:
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        later = {n for same in names.values() for n in same[1:]}
        state = {k: v for k, v in state.items() if k not in later}
    return state


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A whole, independent copy of the policy on every rank (a frozen KL reference): ``deepcopy`` for a plain
    model; for a sharded one (FSDP forbids deepcopy) the same architecture rebuilt from its config and loaded
    with the gathered state dict."""
    import copy

    if not is_sharded(model):
        return copy.deepcopy(model)
    from transformers import AutoModelForCausalLM

    state = gather_state_dict(model)
    first = next(iter(state.values()))
    with torch.device(first.device):
        out = AutoModelForCausalLM.from_config(model.config, dtype=first.dtype)
    out.load_state_dict(state)
    return out


class GatheredWeights:
    """A sharded policy's full weights in the one shape the samplers read them: ``state_dict()``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def sampler_copy_dtype(requested: str | torch.dtype | None, model: torch.nn.Module) -> str | torch.dtype:
    """The HF sampler's ``generation_dtype`` under torchrun, where the policy gets sharded and sampling needs its
    own whole copy: the requested dtype, or the policy's own where the request would sample with the policy
    itself (None, or "auto" for a policy it would not copy): :func:`shell.sampling.hf.generation_copy_dtype`'s rule,
    with the policy's dtype where that rule makes no copy."""
    from shell.sampling.hf import generation_copy_dtype

    param = next(model.parameters())
    return generation_copy_dtype(requested, param.dtype, param.device) or param.dtype


class ShardedSampler:
    """A sampler under torchrun. Every rank calls :meth:`generate` with the same prompts; rank ``r`` samples
    prompts ``r, r + N, …`` (with their own keys, so each sample's noise is what one process would draw) and
    every rank gets every completion back, in order. :meth:`load_weights` gathers the sharded policy's full
    state dict (every rank calls it) and hands it to this rank's engine."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def generate(self, prompts: Sequence[str], params: Any, *, keys: Sequence[int] | None = None,
                 progress: bool = False) -> list[list[Any]]:
        prompts = list(prompts)
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        mine = share(list(zip(prompts, keys)))
        local = self.inner.generate([p for p, _ in mine], params, keys=[k for _, k in mine], progress=progress) if mine else []
        return unshare(local)

    def load_weights(self, model: torch.nn.Module) -> None:
        self.inner.load_weights(GatheredWeights(gather_state_dict(model)) if is_sharded(model) else model)

    def sleep(self) -> None:
        self.inner.sleep()

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_world_size(path: Path) -> int:
    """How many ranks wrote checkpoint ``path`` (1: a single process's ``save_pretrained`` checkpoint)."""
    if not (path / SHARDED).is_dir():
        return 1
    return int(torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)["world_size"])


def check_resume_world(run_dir: Path) -> None:
    """``ValueError`` when the run's newest checkpoint was written by another number of ranks than this run has."""
    found = list_checkpoints(run_dir)
    if not found:
        return
    wrote, now = checkpoint_world_size(found[-1]), world().size
    if wrote != now:
        how = "python -m … (no torchrun)" if wrote == 1 else f"torchrun with {wrote} ranks in all"
        raise ValueError(f"{found[-1]} was written by {wrote} rank(s) and this run has {now}: resume with {how}")


def save_sharded_checkpoint(
    run_dir: Path | str, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    tokenizer: Any, state: dict[str, Any], keep_last: int = 2,
) -> Path:
    """``checkpoints/step_{step:06d}`` of a sharded policy (every rank calls it): each rank writes its shards of
    the model and optimizer (``torch.distributed.checkpoint`` into ``sharded/``) and its RNG states
    (``rng_rank{r}.pt``) into rank 0's temporary folder; then rank 0 writes ``trainer_state.pt`` (``state``, the
    schedule, the step and world size), the tokenizer and the manifest, renames the folder into place
    (:func:`shell.files.publish_dir`) and prunes all but the last ``keep_last``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    model_state, optim_state = get_state_dict(model, optimizer)
    w = world()

    def write_shards(tmp: Path) -> None:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED))
        torch.save(rng_state(), tmp / f"rng_rank{w.rank}.pt")

    def fill(tmp: Path) -> None:  # rank 0
        from_main(str(tmp))
        write_shards(tmp)
        barrier()
        torch.save({"step": step, "world_size": w.size, "scheduler": scheduler.state_dict(), **state},
                   tmp / "trainer_state.pt")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)

    if w.main:
        publish_dir(target, fill)
        prune_checkpoints(run_dir, keep_last)
    else:
        write_shards(Path(from_main("")))
        barrier()
    barrier()  # the checkpoint is in place for every rank
    return target


def load_sharded_checkpoint(
    run_dir: Path | str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    restore_rng: bool = True,
) -> Checkpoint | None:
    """Load the newest intact checkpoint of ``run_dir`` (rank 0 verifies the manifests and picks it, falling back
    to an older one as :func:`shell.checkpoint.load_latest_checkpoint` does) into the sharded ``model``,
    ``optimizer`` and ``scheduler`` in place, and this rank's RNG states; returns its trainer state (None when
    there is no checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def newest() -> Path | None:
        found = newest_intact_checkpoint(run_dir, lambda path: None)
        return None if found is None else found[0]

    path = main_first(newest)
    if path is None:
        return None
    model_state, optim_state = get_state_dict(model, optimizer)
    states = {"model": model_state, "optimizer": optim_state}
    dcp.load(states, checkpoint_id=str(path / SHARDED))
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    trainer = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    rng = path / f"rng_rank{world().rank}.pt"
    if restore_rng and rng.exists():
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    elif restore_rng:
        warnings.warn(f"{rng} is missing: this rank's RNG starts afresh", stacklevel=2)
    return Checkpoint(path=path, step=int(trainer["step"]), state=trainer)
