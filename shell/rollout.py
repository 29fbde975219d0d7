"""Rollouts and their scores: G responses per question from the sampler's (old) policy, graded by the
batch grader (their advantages: :func:`core.group_normalized_advantages`). Shared by GRPO and expert iteration."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from shell.config import GradingConfig, SamplingConfig
from shell.grading import grade_batch
from shell.prompts import PromptTemplate
from shell.sampling import Sampler, SamplingParams

__all__ = ["Rollouts", "grade", "rollout", "rollout_diagnostics"]


@dataclass
class Rollouts:
    """A rollout batch, grouped consecutively: rows ``g*G … g*G+G-1`` answer question ``g``."""

    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    truths: list[Any] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    entropies: list[float | None] = field(default_factory=list)
    """Each response's mean token entropy (the sampler's, or filled in by the policy)."""
    finish_reasons: list[str] = field(default_factory=list)
    sampler_token_ids: list[list[int]] = field(default_factory=list)
    """The sampled token ids of each response (with a final eos where the sampler stopped on one)."""
    sampler_log_probs: list[list[float] | None] = field(default_factory=list)
    """Per-token log-probs of each response under the sampler (None where it gave none)."""

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def mean_entropy(self) -> float | None:
        kept = [e for e in self.entropies if e is not None]
        return statistics.fmean(kept) if kept else None

    def select(self, rows: Sequence[int]) -> Rollouts:
        """The rollouts of ``rows``, in that order."""
        return Rollouts(**{f.name: [getattr(self, f.name)[i] for i in rows] for f in fields(self)})

    def extend(self, other: Rollouts) -> None:
        """Append ``other``'s rollouts."""
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def fill_entropies(self, score: Callable[[Sequence[str], Sequence[str]], list[float]]) -> None:
        """Where the sampler gave no entropies (vLLM), take them from ``score(prompts, responses)``."""
        missing = [i for i, e in enumerate(self.entropies) if e is None]
        if missing:
            values = score([self.prompts[i] for i in missing], [self.responses[i] for i in missing])
            for i, v in zip(missing, values):
                self.entropies[i] = v


def rollout(
    sampler: Sampler, questions: Sequence[Any], template: PromptTemplate, sampling: SamplingConfig, *,
    group_size: int, seed: int, keys: Sequence[int] | None = None, progress: bool = True,
) -> Rollouts:
    """``group_size`` responses per question (stop after ``</answer>``, kept). The noise of each response is a
    function of ``(seed, keys[q], sample index)``: pass the questions' dataset indices as ``keys``."""
    prompts = [template.format(q.question) for q in questions]
    params = SamplingParams(n=group_size, temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens,
                            stop=("</answer>",), seed=seed, logprobs=True)
    groups = sampler.generate(prompts, params, keys=keys, progress=progress)
    out = Rollouts()
    for q, prompt, comps in zip(questions, prompts, groups):
        for c in comps:
            out.prompts.append(prompt)
            out.responses.append(c.text)
            out.truths.append(q.answer)
            out.num_tokens.append(len(c.token_ids))
            out.entropies.append(statistics.fmean(c.entropies) if c.entropies else None)
            out.finish_reasons.append(c.finish_reason)
            out.sampler_token_ids.append(list(c.token_ids))
            out.sampler_log_probs.append(c.logprobs)
    return out


def grade(rollouts: Rollouts, template: PromptTemplate, grading: GradingConfig, *, progress: bool = True
          ) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Every response's rewards (the template's reward function, through the batch grader) and the grader's metadata."""
    return grade_batch(rollouts.responses, rollouts.truths, reward_fn=template.reward_fn_name,
                       timeout_s=grading.timeout_s, num_workers=grading.workers, progress=progress)


def rollout_diagnostics(rollouts: Rollouts) -> dict[str, float]:
    """TRL's completion diagnostics of a rollout batch: ``train/completions/clipped_ratio`` (the fraction that hit
    the token limit) and ``train/completions/mean_terminated_length`` (the mean length of the others; 0 if none)."""
    ended = [n for n, reason in zip(rollouts.num_tokens, rollouts.finish_reasons) if reason != "length"]
    return {"train/completions/clipped_ratio": 1.0 - len(ended) / max(1, len(rollouts)),
            "train/completions/mean_terminated_length": statistics.fmean(ended) if ended else 0.0}
