"""Evaluation: sample one response per problem, grade it, summarise (the zero-shot entry point and every
training loop's held-out evaluation share :func:`evaluate`; the loops call it through :func:`run_eval`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shell.config import GradingConfig, SamplingConfig
from shell.data import Dataset, HeldOutConfig
from shell.files import append_text, atomic_write_jsonl, atomic_write_text
from shell.grading import grade_batch
from shell.progress import say
from shell.prompts import PromptTemplate
from shell.sampling import Sampler, SamplingParams
from shell.seeds import derive_seed

if TYPE_CHECKING:
    import torch

    from shell.loop import Run

__all__ = ["EvalResult", "FinalEvalConfig", "evaluate", "final_evaluation", "format_summary", "generation_stats",
           "log_generations", "mean_or_none", "run_eval", "summarize", "write_results"]

EntropyFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""``score(prompts, responses) -> mean token entropy of each response`` under the policy."""


@dataclass(frozen=True)
class FinalEvalConfig:
    """An evaluation of the final model on a whole held-out set, after the last step (a leaderboard's score)."""

    enabled: bool = False
    """Run it (writes <run>/final_eval/summary.json and results.jsonl, the format of shell.evaluate)."""
    data: HeldOutConfig = HeldOutConfig(limit=None)
    """The problems: by default every problem of the validation split that goes with --data."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=1024)
    """How each response is drawn (the leaderboard's rules: T=1, top-p 1, 1024 tokens)."""
    greedy: bool = False
    """Also evaluate greedily (T=0), written to final_eval/greedy/."""


@dataclass
class EvalResult:
    """Per-example records and the summary of one evaluation."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]


def mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The handout's three categories, rewards, accuracy and response lengths (tokens) of ``records``."""
    n = len(records)
    correct = [r for r in records if r["reward"] == 1.0]
    incorrect = [r for r in records if r["reward"] != 1.0]
    entropies = [r["mean_token_entropy"] for r in records if r.get("mean_token_entropy") is not None]
    return {
        "num_examples": n,
        "counts": {
            "format1_answer1": sum(1 for r in records if r["format_reward"] == 1 and r["answer_reward"] == 1),
            "format1_answer0": sum(1 for r in records if r["format_reward"] == 1 and r["answer_reward"] != 1),
            "format0": sum(1 for r in records if r["format_reward"] != 1),
        },
        "accuracy": len(correct) / n if n else 0.0,
        "format_reward": mean_or_none([r["format_reward"] for r in records]) or 0.0,
        "answer_reward": mean_or_none([r["answer_reward"] for r in records]) or 0.0,
        "reward": mean_or_none([r["reward"] for r in records]) or 0.0,
        "mean_length": mean_or_none([r["num_tokens"] for r in records]),
        "mean_length_correct": mean_or_none([r["num_tokens"] for r in correct]),
        "mean_length_incorrect": mean_or_none([r["num_tokens"] for r in incorrect]),
        "mean_token_entropy": mean_or_none(entropies),
        "finish_reasons": {k: sum(1 for r in records if r.get("finish_reason") == k) for k in ("stop", "eos", "length")},
    }


def evaluate(
    sampler: Sampler,
    dataset: Dataset | Sequence[Any],
    *,
    template: PromptTemplate,
    sampling: SamplingConfig = SamplingConfig(),
    grading: GradingConfig = GradingConfig(),
    seed: int | None = 0,
    entropy: EntropyFn | None = None,
    progress: bool = False,
) -> EvalResult:
    """Sample one response per problem with ``sampler``, grade it, and summarise.

    Args:
        sampler: a :class:`shell.sampling.Sampler` holding the policy's current weights.
        dataset: examples with ``question`` and ``answer``.
        template: the prompt; its reward function grades.
        sampling: temperature, top-p, min/max tokens (stop after ``</answer>``, kept).
        grading: grader timeout and workers.
        seed: sampling seed (None: fresh randomness); problem ``i``'s noise is a function of ``(seed, i)``.
        entropy: where the sampler reports no per-token entropies (vLLM), this scores the responses.
        progress: progress bars for sampling and grading (on a terminal).

    Returns:
        records (prompt, response, ground truth, the three rewards, token count, mean token entropy,
        finish reason) and the summary of :func:`summarize` plus ``seconds``.
    """
    t0 = time.perf_counter()
    examples = list(dataset)
    prompts = [template.format(ex.question) for ex in examples]
    params = SamplingParams(
        n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens, stop=("</answer>",), seed=seed, logprobs=True,
    )
    completions = [c[0] for c in sampler.generate(prompts, params, progress=progress)]
    entropies = [statistics.fmean(c.entropies) if c.entropies else None for c in completions]
    missing = [i for i, e in enumerate(entropies) if e is None and completions[i].token_ids]
    if missing and entropy is not None:
        for i, e in zip(missing, entropy([prompts[i] for i in missing], [completions[i].text for i in missing])):
            entropies[i] = e
    scores, grading_meta = grade_batch(
        [c.text for c in completions], [ex.answer for ex in examples], reward_fn=template.reward_fn_name,
        timeout_s=grading.timeout_s, num_workers=grading.workers, progress=progress,
    )
    records = []
    for ex, prompt, comp, score, ent in zip(examples, prompts, completions, scores, entropies):
        records.append({
            "prompt": prompt,
            "response": comp.text,
            "ground_truth": ex.answer,
            "format_reward": float(score["format_reward"]),
            "answer_reward": float(score["answer_reward"]),
            "reward": float(score["reward"]),
            "num_tokens": len(comp.token_ids),
            "mean_token_entropy": ent,
            "finish_reason": comp.finish_reason,
        })
    summary = summarize(records)
    summary["grading_timeouts"] = grading_meta.get("timeouts", 0)
    summary["seconds"] = time.perf_counter() - t0
    return EvalResult(records=records, summary=summary)


def log_generations(
    records: Sequence[dict[str, Any]],
    path: Path | str,
    *,
    step: int,
    max_samples: int = 8,
) -> dict[str, Any]:
    """Append a generation log entry to ``path`` (jsonl) and return its statistics.

    The entry holds ``max_samples`` samples (prompt, response, ground truth, rewards, mean token
    entropy) and the :func:`generation_stats` of all ``records``.
    """
    stats = generation_stats(records)
    keys = ("prompt", "response", "ground_truth", "format_reward", "answer_reward", "reward", "mean_token_entropy", "num_tokens")
    entry = {"step": step, "stats": stats, "samples": [{k: r.get(k) for k in keys} for r in list(records)[:max_samples]]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_text(path, json.dumps(entry) + "\n")
    return stats


def generation_stats(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Over ``records``: mean response length overall, for correct and for incorrect responses, the mean token
    entropy and the mean reward."""
    return {
        "mean_length": mean_or_none([r["num_tokens"] for r in records]),
        "mean_length_correct": mean_or_none([r["num_tokens"] for r in records if r["reward"] == 1.0]),
        "mean_length_incorrect": mean_or_none([r["num_tokens"] for r in records if r["reward"] != 1.0]),
        "mean_token_entropy": mean_or_none([r["mean_token_entropy"] for r in records if r.get("mean_token_entropy") is not None]),
        "reward": mean_or_none([r["reward"] for r in records]),
    }


def run_eval(
    run: Run, sampler: Sampler, model: torch.nn.Module, eval_set: Any, *, template: PromptTemplate,
    sampling: SamplingConfig, grading: GradingConfig, step: int, extra: dict[str, Any] | None = None,
    entropy: EntropyFn | None = None, prefix: str = "eval",
) -> dict[str, Any]:
    """A training loop's held-out evaluation: sync the policy's weights into the sampler, evaluate (noise
    seeded by the run's seed and ``step``), append the generations to ``generations.jsonl``, log
    ``{prefix}/…`` metrics with ``eval_step`` = ``step`` (plus the ``extra`` keys) and redraw the figures.
    Under torchrun the problems are shared among the ranks (sampling, grading) and rank 0 writes."""
    model.eval()
    sampler.load_weights(model)
    result = evaluate(sampler, eval_set, template=template, sampling=sampling, grading=grading,
                      seed=derive_seed(run.run_cfg.seed, "eval", step), entropy=entropy, progress=True)
    s = result.summary
    stats = (log_generations(result.records, run.dir / "generations.jsonl", step=step, max_samples=run.loop.log_generations)
             if run.world.main else generation_stats(result.records))
    metrics = {
        "eval_step": step,
        f"{prefix}/answer_reward": s["answer_reward"],
        f"{prefix}/format_reward": s["format_reward"],
        f"{prefix}/reward": s["reward"],
        f"{prefix}/mean_length": stats["mean_length"],
        f"{prefix}/mean_length_correct": stats["mean_length_correct"],
        f"{prefix}/mean_length_incorrect": stats["mean_length_incorrect"],
        f"{prefix}/mean_token_entropy": stats["mean_token_entropy"],
        f"{prefix}/num_examples": s["num_examples"],
        f"{prefix}/seconds": s["seconds"],
        **(extra or {}),
    }
    run.log(metrics)
    run.draw()
    say(f"[eval step {step}] answer {s['answer_reward']:.3f}  format {s['format_reward']:.3f}  "
        f"len {stats['mean_length'] or 0:.1f}  ({s['seconds']:.0f}s)")
    return metrics


def final_evaluation(
    run: Run, sampler: Sampler, model: torch.nn.Module, eval_set: Any, *, template: PromptTemplate,
    cfg: FinalEvalConfig, grading: GradingConfig, entropy: EntropyFn | None = None,
) -> dict[str, EvalResult]:
    """Evaluate the final policy on ``eval_set`` as ``cfg`` says (and greedily when asked), write
    ``<run>/final_eval/{summary.json, results.jsonl}`` (``greedy/`` for the greedy pass), log ``final/…``
    metrics and print the tables."""
    model.eval()
    sampler.load_weights(model)
    passes = {"": cfg.sampling}
    if cfg.greedy:
        passes["greedy"] = SamplingConfig(temperature=0.0, top_p=1.0, min_tokens=cfg.sampling.min_tokens,
                                          max_tokens=cfg.sampling.max_tokens)
    out = {}
    for name, sampling in passes.items():
        result = evaluate(sampler, eval_set, template=template, sampling=sampling, grading=grading,
                          seed=derive_seed(run.run_cfg.seed, "final-eval"), entropy=entropy, progress=True)
        folder = run.dir / "final_eval" / name if name else run.dir / "final_eval"
        if run.world.main:
            write_results(folder, result, {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                           "max_tokens": sampling.max_tokens, "step": run.completed})
        key = "final_greedy" if name else "final"
        run.log({"eval_step": run.completed, f"{key}/answer_reward": result.summary["answer_reward"],
                 f"{key}/format_reward": result.summary["format_reward"], f"{key}/num_examples": len(eval_set),
                 f"{key}/seconds": result.summary["seconds"]})
        say(f"final evaluation{' (greedy)' if name else f' (T={sampling.temperature:g})'} on {len(eval_set)} problems "
            f"-> {folder / 'summary.json'}\n{format_summary(result.summary)}")
        out[name or "sampled"] = result
    return out


def write_results(run_dir: Path, result: EvalResult, config: dict[str, Any]) -> None:
    """``results.jsonl`` (one record a line), ``summary.json`` and ``config.json``, each atomically."""
    atomic_write_jsonl(run_dir / "results.jsonl", result.records)
    atomic_write_text(run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")


def format_summary(summary: dict[str, Any]) -> str:
    """A short text table of a summary."""
    c = summary["counts"]
    n = summary["num_examples"]

    def pct(k: int) -> str:
        return f"{k:5d}  ({100 * k / n:5.1f}%)" if n else f"{k:5d}"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"examples                    {n:5d}",
        f"format 1, answer 1          {pct(c['format1_answer1'])}",
        f"format 1, answer 0          {pct(c['format1_answer0'])}",
        f"format 0                    {pct(c['format0'])}",
        f"accuracy (answer reward)    {100 * summary['answer_reward']:5.1f}%",
        f"format reward               {100 * summary['format_reward']:5.1f}%",
        f"mean length (tokens)        {num(summary['mean_length'])}  correct {num(summary['mean_length_correct'])}  incorrect {num(summary['mean_length_incorrect'])}",
    ]
    if summary.get("mean_token_entropy") is not None:
        lines.append(f"mean token entropy          {summary['mean_token_entropy']:.3f}")
    lines.append(f"seconds                     {summary.get('seconds', 0):.1f}")
    return "\n".join(lines)
