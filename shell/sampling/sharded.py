"""The sampler under ``torchrun``: every rank calls :meth:`ShardedSampler.generate` with the same prompts, samples
its share of them (prompt ``i`` on rank ``i mod N``) with its own engine, and gets every completion back, in
order. The noise of a sample is a function of (seed, key, sample index), so HF rollouts do not depend on the
world size. Weight syncs gather the sharded policy's full state dict (every rank calls them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shell.fsdp import gather_state_dict, is_sharded
from shell.sampling.hf import generation_copy_dtype
from shell.world import share, unshare

__all__ = ["GatheredWeights", "ShardedSampler", "sampler_copy_dtype"]


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
