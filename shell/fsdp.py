"""FSDP2 data parallelism for the policy under ``torchrun``: sharding (:func:`shard_model`), whole-model blocks
for inference passes (:func:`gathered`), the zero-gradient pass that keeps a rank without work in step, and the
gathered views of a sharded policy (its largest weight, its full state dict, an unsharded copy).

Each rank runs its share of every optimizer step's microbatches (the microbatches a single process would run,
``k / N`` of them), and FSDP *sums* the gradients, so the update equals the single-process update on the same
global batch. FSDP2's collectives are kept independent of what a rank's microbatches look like: every layer
stays gathered from its forward through its backward (``reshard_after_forward=False``), so a shared-prompt-prefix
forward or activation checkpointing adds no all-gather; inference passes run inside one :func:`gathered` block
(one all-gather, any number of forwards); and a microbatch with nothing to learn still runs a zero-gradient pass
(:func:`zero_gradient_pass`). Nothing here does anything to a model that is not sharded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from shell.world import gather, world

__all__ = [
    "gather_state_dict",
    "gathered",
    "is_sharded",
    "max_abs_weight",
    "shard_model",
    "unsharded_copy",
    "zero_gradient_pass",
]


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: Any) -> bool:
    """Is ``model`` sharded by FSDP2 (:func:`shard_model`)?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, *, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on each decoder layer (the model's ``_no_split_modules``) and at the root, in place,
    over all ranks; returns ``model``.

    Gradients are *summed* over ranks (each rank's loss is already its part of the global batch's loss). Layers
    stay gathered from their forward through their backward (``reshard_after_forward=False``: ZeRO-2-like
    memory, the whole policy gathered during a microbatch), which keeps the collectives the same on every rank
    whatever its microbatches do.

    The sharded master weights (and so AdamW's state) keep the dtype the model was loaded in
    (``--model.dtype``, :func:`shell.models.resolve_dtype`); ``compute_dtype`` (the :class:`shell.update.Learner`
    passes bf16 on a GPU with ``--optim.autocast-bf16``) is the dtype FSDP gathers them in for forward and
    backward, with the gradients reduced in float32 (``MixedPrecisionPolicy``); None: compute in the weights'
    own dtype.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world().size,))
    policy = MixedPrecisionPolicy()
    if compute_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
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
