"""The transformers backend: :class:`HFSampler`, a batched KV-cache decode loop (the CPU default)."""

from __future__ import annotations

import copy
import functools
import gc
import random
from collections.abc import Sequence
from typing import Any

import torch

from shell.sampling.weights import merged_state_dict
from shell.models import cache_kwarg, resolve_dtype, set_attn_implementation
from shell.progress import progress_bar
from shell.sampling.api import Completion, SamplingParams, first_stop_end
from shell.seeds import derive_seed

__all__ = [
    "HFSampler", "eos_token_ids", "generation_copy_dtype", "make_cache", "random_seed", "sample_next_tokens", "tempered_nucleus",
]


def random_seed() -> int:
    return random.SystemRandom().randrange(2**62)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
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


def generation_copy_dtype(requested: str | torch.dtype | None, policy_dtype: torch.dtype,
                          device: str | torch.device) -> torch.dtype | None:
    """The dtype of :class:`HFSampler`'s generation copy of a policy in ``policy_dtype`` on ``device``, or None
    for no copy (sample with the policy itself). ``"auto"``: bfloat16 when the policy is float32, on CPU and GPU
    alike (float32 master weights train; a bf16 copy, refreshed at each weight sync, samples: on a 2-core CPU the
    fastest measured setting, on a GPU half the memory traffic per decoded token); no copy otherwise."""
    if requested is None:
        return None
    if requested == "auto":
        return torch.bfloat16 if policy_dtype == torch.float32 else None
    return resolve_dtype(requested, device)


def tempered_nucleus(logits: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    r"""The logits of the distribution :func:`sample_next_tokens` draws from at ``temperature > 0``:
    ``logits / temperature``, with ``-inf`` outside the nucleus (the most probable tokens whose mass before them
    is at most ``top_p``; the top token always stays). ``log_softmax`` of it is that distribution's log-probs."""
    scaled = logits / temperature if temperature != 1.0 else logits
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove = (probs.cumsum(-1) - probs) > top_p  # keeps at least the top token
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    return scaled


def sample_next_tokens(
    logits: torch.Tensor, *, temperature: float, top_p: float, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    r"""One token per row of ``logits`` (rows, vocab): greedy at ``temperature == 0``, else drawn from

    .. math::  p_v \propto \exp(z_v / T) \;\text{on the nucleus}, \quad
               \text{nucleus} = \text{the most probable tokens whose mass before them is} \le \text{top\_p}

    (:func:`tempered_nucleus`), by inverse CDF: row ``r`` takes the first token whose cumulative
    probability reaches ``1 - uniforms[r]`` (one uniform per row; ``torch.multinomial`` draws one exponential
    per vocabulary entry, which dominated a decode step on CPU). ``uniforms`` are ``(rows,)`` draws from
    [0, 1) (drawn here when None); ``1 - u`` lies in (0, 1], so a zero-probability token is never taken.
    A pure function of ``(logits, uniforms)``. Returns ``(rows,)`` token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    cdf = torch.softmax(tempered_nucleus(logits, temperature=temperature, top_p=top_p), dim=-1).cumsum(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], device=cdf.device)
    u = (1.0 - uniforms.to(cdf.device, cdf.dtype)).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)


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
            (refreshed by :meth:`load_weights`); ``"auto"``: a bfloat16 copy of a float32 policy
            (:func:`generation_copy_dtype`); None: no copy.
        attn_implementation: attention of the generation copy; ``"auto"``: ``"eager"`` on CPU (fastest for
            one-token decode there), the policy's own on GPU; ignored without a copy.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        generation_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.policy = model
        self.device = next(model.parameters()).device
        dtype = generation_copy_dtype(generation_dtype, next(model.parameters()).dtype, self.device)
        if dtype is None:
            self.model = model
        else:
            self.model = copy.deepcopy(model).to(dtype=dtype)
            for param in self.model.parameters():
                param.grad = None
            self.model.requires_grad_(False)
            self.model.eval()
            if attn_implementation == "auto":
                attn_implementation = "eager" if self.device.type == "cpu" else None
            if attn_implementation is not None:
                set_attn_implementation(self.model, attn_implementation)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    @property
    def owns_copy(self) -> bool:
        return self.model is not self.policy

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights into the generation model in place (no-op when it is the same object: a
        policy with LoRA adapters then samples through them). A LoRA policy's weights arrive merged
        (:func:`shell.lora.merged_state_dict`), so the generation copy stays a plain model."""
        if model is self.model:
            return
        source = merged_state_dict(model)
        target = self.model.state_dict()
        missing = [name for name in target if name not in source]
        if missing:
            raise ValueError(f"load_weights: the model lacks {len(missing)} tensors of the sampler's, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in target.items():
                tensor.copy_(source[name])

    def sleep(self) -> None:
        """Nothing to free: this backend holds no cache between calls (its KV cache lives within ``generate``)."""

    def close(self) -> None:
        if self.owns_copy:
            del self.model
            self.model = None
        gc.collect()

    # ----------------------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, keys: Sequence[int] | None = None, progress: bool = False
    ) -> list[list[Completion]]:
        """``params.n`` samples of each prompt. Sample ``j`` of prompt ``i`` draws its noise from its own
        generator, seeded by ``(params.seed, keys[i], j)`` (``keys`` defaults to the prompt positions), so a
        sample does not depend on which other prompts share the call, their order, or the batch size."""
        prompts = list(prompts)
        if not prompts:
            return []
        if self.model is None:
            raise RuntimeError("sampler is closed")
        keys = list(range(len(prompts))) if keys is None else list(keys)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        encoded = [self.tokenizer.encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
        seed = params.seed if params.seed is not None else random_seed()

        # Jobs: (prompt index, first sample, how many samples); prompts sorted by length to limit padding.
        per_job = min(params.n, self.batch_size)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        jobs: list[tuple[int, int, int]] = []
        for i in order:
            for first in range(0, params.n, per_job):
                jobs.append((i, first, min(per_job, params.n - first)))
        results: list[list[Completion]] = [[] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        bar = progress_bar(total=len(prompts) * params.n, desc="sampling", unit="response", enabled=progress)
        try:
            chunk: list[tuple[int, int, int]] = []
            for job in jobs:
                if chunk and (job[2] != chunk[0][2] or (len(chunk) + 1) * job[2] > self.batch_size):
                    self._run_chunk(chunk, encoded, keys, seed, params, results)
                    bar.update(sum(c[2] for c in chunk))
                    chunk = []
                chunk.append(job)
            if chunk:
                self._run_chunk(chunk, encoded, keys, seed, params, results)
                bar.update(sum(c[2] for c in chunk))
        finally:
            bar.close()
            if was_training:
                self.model.train()
        return results

    def _run_chunk(
        self,
        chunk: list[tuple[int, int, int]],
        encoded: list[list[int]],
        keys: list[int],
        seed: int,
        params: SamplingParams,
        results: list[list[Completion]],
    ) -> None:
        prompt_ids = [encoded[i] for i, _, _ in chunk]
        repeats = chunk[0][2]
        generators = [
            torch.Generator().manual_seed(derive_seed(seed, "sample", keys[i], first + j))
            for i, first, count in chunk for j in range(count)
        ]
        rows = self._decode(prompt_ids, repeats, params, generators)
        for j, (i, _, count) in enumerate(chunk):
            results[i].extend(rows[j * count : (j + 1) * count])

    @torch.inference_mode()
    def _decode(
        self, prompt_ids: list[list[int]], repeats: int, params: SamplingParams, generators: list[torch.Generator]
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

        cache = make_cache(model, capacity=width + min(params.max_tokens, 256))
        cache_kw = cache_kwarg(model)
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
            if params.logprobs:  # of the distribution sampled from (before min_tokens' eos ban); T = 0: the model's own
                t = params.temperature if params.temperature > 0 else 1.0
                full = torch.log_softmax(logits / t if t != 1.0 else logits, dim=-1)
                entropy = -(full.exp() * full).nan_to_num().sum(-1)
                logp = (torch.log_softmax(tempered_nucleus(logits, temperature=t, top_p=params.top_p), dim=-1)
                        if params.top_p < 1.0 and params.temperature > 0 else full)
            if step < params.min_tokens and eos.numel():
                logits[:, eos] = float("-inf")
            uniforms = None
            if params.temperature != 0:
                uniforms = torch.cat([torch.rand(1, generator=generators[row]) for row in alive])
            chosen = sample_next_tokens(logits, temperature=params.temperature, top_p=params.top_p, uniforms=uniforms)
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
                    if first_stop_end(full, stops, len(prev)) is not None:
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

    def _completion(
        self, ids: list[int], logps: list[float] | None, ents: list[float] | None, reason: str, stops: Sequence[str]
    ) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if reason == "stop":
            prev = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
            end = first_stop_end(text, stops, len(prev))
            if end is None:  # decoding of the prefix was not a prefix of the text: fall back to the last stop
                end = max(text.rfind(s) + len(s) for s in stops if s in text)
            text = text[:end]
        return Completion(text=text, token_ids=ids, logprobs=logps, entropies=ents, finish_reason=reason)


@functools.cache
def growing_layer_class() -> type | None:
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


def make_cache(model: Any, capacity: int) -> Any:
    """A ``DynamicCache`` for ``model`` whose plain layers are growing buffers (see ``growing_layer_class``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    layer_cls = growing_layer_class()
    try:
        from transformers.cache_utils import DynamicLayer

        layers = cache.layers
        if layer_cls is not None and layers and all(type(layer) is DynamicLayer for layer in layers):
            cache.layers = [layer_cls(capacity) for _ in layers]
    except (ImportError, AttributeError):  # pragma: no cover - older transformers: keep the plain cache
        pass
    return cache
