"""Build a sampler: from a loaded policy (HF) or a model folder (vLLM), as a config says."""

from __future__ import annotations

import os
from typing import Any, Literal

from shell.sampling.api import Sampler

__all__ = ["build_sampler", "make_sampler"]


def make_sampler(
    backend: Literal["hf", "vllm"],
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> Sampler:
    """``HFSampler(model, tokenizer, **kw)`` or ``VLLMSampler(model_path, **kw)``."""
    if backend == "hf":
        from shell.sampling.hf import HFSampler

        if model is None or tokenizer is None:
            raise ValueError("the hf backend needs model and tokenizer")
        return HFSampler(model, tokenizer, **kw)
    if backend == "vllm":
        from shell.sampling.vllm import VLLMSampler

        if model_path is None:
            raise ValueError("the vllm backend needs model_path")
        return VLLMSampler(model_path, **kw)
    raise ValueError(f"unknown sampler backend {backend!r}; use 'hf' or 'vllm'")


def build_sampler(model_cfg: Any, sampler_cfg: Any, *, seed: int = 0) -> tuple[Any, Any, Sampler]:
    """Load the policy of ``model_cfg`` (a :class:`shell.config.ModelConfig`) and wrap it in the sampler of
    ``sampler_cfg`` (a :class:`shell.config.SamplerConfig`): ``(model, tokenizer, sampler)``. Under torchrun the
    sampler is a :class:`shell.distributed.ShardedSampler` (each rank samples its share of the prompts)."""
    from shell.distributed import ShardedSampler, active, sampler_copy_dtype
    from shell.models import load_policy, resolve_model_path

    model, tokenizer = load_policy(model_cfg.name_or_path, device=model_cfg.device, dtype=model_cfg.dtype)
    if sampler_cfg.backend == "hf":
        generation_dtype = sampler_cfg.generation_dtype
        if active():  # the policy is sharded for training: sampling needs its own whole copy
            generation_dtype = sampler_copy_dtype(generation_dtype, model)
        sampler = make_sampler("hf", model, tokenizer, batch_size=sampler_cfg.batch_size,
                               generation_dtype=generation_dtype)
    else:
        kw: dict[str, Any] = {"gpu_memory_utilization": sampler_cfg.gpu_memory_utilization, "seed": seed,
                              "enforce_eager": sampler_cfg.enforce_eager}
        if sampler_cfg.vllm_device:
            kw["device"] = sampler_cfg.vllm_device
        if active():  # one engine per rank, on its own GPU, inside torchrun's processes (as TRL's colocate mode)
            kw["distributed_executor_backend"] = "external_launcher"
        sampler = make_sampler("vllm", model_path=str(resolve_model_path(model_cfg.name_or_path)), **kw)
    return model, tokenizer, (ShardedSampler(sampler) if active() else sampler)
