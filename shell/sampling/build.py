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


def build_sampler(model_cfg: Any, sampler_cfg: Any, *, seed: int = 0, training: bool) -> tuple[Any, Any, Sampler]:
    """Load the policy of ``model_cfg`` (a :class:`shell.config.ModelConfig`; ``training``: float32 master weights
    on GPU under ``--model.dtype auto``) and wrap it in the sampler of ``sampler_cfg`` (a
    :class:`shell.config.SamplerConfig`): ``(model, tokenizer, sampler)``. A colocated vLLM engine goes on the
    policy's GPU, a dedicated one on ``--sampler.vllm-device``. Under torchrun the sampler is a
    :class:`shell.sampling.sharded.ShardedSampler` (each rank samples its share of the prompts; with vLLM, one
    colocated engine per rank, each in a world of one)."""
    import torch

    from shell.sampling.sharded import ShardedSampler, sampler_copy_dtype
    from shell.world import active
    from shell.models import load_policy, resolve_model_path

    model, tokenizer = load_policy(model_cfg.name_or_path, device=model_cfg.device, dtype=model_cfg.dtype, training=training)
    sharded = active()  # under torchrun the policy gets sharded for training
    if sampler_cfg.backend == "hf":
        generation_dtype = sampler_cfg.generation_dtype
        if sharded:  # sampling needs its own whole copy
            generation_dtype = sampler_copy_dtype(generation_dtype, model)
        sampler = make_sampler("hf", model, tokenizer, batch_size=sampler_cfg.batch_size,
                               generation_dtype=generation_dtype)
    else:
        policy_device = next(model.parameters()).device
        device = str(policy_device) if sampler_cfg.placement == "colocate" else sampler_cfg.vllm_device
        if policy_device.type == "cuda" and sampler_cfg.placement == "dedicated" and torch.device(device) == policy_device:
            raise ValueError(f"--sampler.placement dedicated: --sampler.vllm-device {device} is the policy's GPU "
                             f"(--model.device); give vLLM another GPU or use --sampler.placement colocate")
        # Under torchrun each rank builds its own in-process engine on its own GPU, in a world of one
        # (shell.sampling.vllm.world_of_one: the handout's world-size patch), so no collective spans the engines.
        sampler = make_sampler(
            "vllm", model_path=str(resolve_model_path(model_cfg.name_or_path)), placement=sampler_cfg.placement,
            device=device, gpu_memory_utilization=sampler_cfg.gpu_memory_utilization, sleep=sampler_cfg.sleep,
            kv_cache_gib=sampler_cfg.kv_cache_gib, seed=seed, enforce_eager=sampler_cfg.enforce_eager,
        )
    return model, tokenizer, (ShardedSampler(sampler) if sharded else sampler)
