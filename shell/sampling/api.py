"""The sampler interface shared by both backends.

* :class:`SamplingParams` -- what to sample (n, temperature, top_p, max/min tokens, stop strings, seed, logprobs).
* :class:`Completion` -- one sample: text, token ids, optional per-token log-probs and entropies, finish reason.
* :class:`Sampler` -- ``generate(prompts, params) -> list[list[Completion]]`` (prompts in order, then the n
  samples), ``load_weights(model)`` (take the policy's current weights), ``sleep()`` (free what it holds on the
  accelerator while the policy trains; the next call wakes it), ``close()``.

Semantics shared by both backends (vLLM's): the text is cut right after the first stop string (the stop string
is kept) and ``token_ids`` end with the token that completes it; an eos token ends a sample (its id is kept in
``token_ids``, its text is not); ``min_tokens`` forbids eos and ignores stop strings that end within the first
``min_tokens`` tokens; ``temperature == 0`` is greedy. Log-probs are those of the distribution the token was
drawn from: ``softmax(logits / T)`` restricted to the top-p nucleus and renormalised (vLLM's
``processed_logprobs``), before ``min_tokens``' eos ban; at ``T = 0`` the model's own (T = 1). With ``top_p = 1``
they equal :func:`core.get_response_log_probs` at the same temperature, so an on-policy importance ratio is 1;
with ``top_p < 1`` each exceeds the trainer's by ``-log`` (the nucleus' mass), which truncated importance
sampling (``--tis-cap``) corrects. Entropies (HF only) are of the whole ``softmax(logits / T)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = ["Completion", "FinishReason", "Sampler", "SamplingParams", "first_stop_end"]

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
    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, keys: Sequence[int] | None = None, progress: bool = False
    ) -> list[list[Completion]]:
        """Sample ``params.n`` completions of each prompt: outer list = prompts in order, inner = the n samples.

        The noise of prompt ``i``'s samples is a function of ``(params.seed, keys[i])`` and the sample index
        (``keys``: stable ids such as question indices; default the positions); ``progress`` shows a bar."""
        ...

    def load_weights(self, model: torch.nn.Module) -> None:
        """Take ``model``'s current weights (in place)."""
        ...

    def sleep(self) -> None:
        """Free what the backend holds on the accelerator until its next ``generate`` or ``load_weights`` (a
        loop calls it before training): colocated vLLM frees its KV cache; a no-op where nothing is held."""
        ...

    def close(self) -> None:
        """Free the backend's resources."""
        ...


def first_stop_end(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """End offset of the stop string completing earliest among those ending after ``new_from`` (vLLM's rule)."""
    best: int | None = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1:
            end = idx + len(s)
            if best is None or end < best:
                best = end
    return best
