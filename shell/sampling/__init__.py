"""Samplers: one small interface (:mod:`shell.sampling.api`) over transformers (:class:`HFSampler`, the CPU
default) and vLLM (:class:`VLLMSampler`, imported lazily: ``import shell.sampling`` never imports vllm)."""

from typing import Any

from shell.sampling.api import Completion
from shell.sampling.api import FinishReason
from shell.sampling.api import Sampler
from shell.sampling.api import SamplingParams
from shell.sampling.api import first_stop_end
from shell.sampling.build import build_sampler
from shell.sampling.build import make_sampler
from shell.sampling.hf import HFSampler
from shell.sampling.hf import sample_next_tokens

__all__ = [
    "Completion",
    "FinishReason",
    "HFSampler",
    "Sampler",
    "SamplingParams",
    "VLLMSampler",
    "build_sampler",
    "first_stop_end",
    "make_sampler",
    "sample_next_tokens",
]


def __getattr__(name: str) -> Any:
    if name == "VLLMSampler":  # its module imports vllm only when a sampler is built, but keep it lazy anyway
        from shell.sampling.vllm import VLLMSampler

        return VLLMSampler
    raise AttributeError(name)
