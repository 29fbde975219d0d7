"""Zero-shot (or any-checkpoint) evaluation: ``python -m shell.evaluate``.

Phases: load data → build prompts → sample → grade → write ``results.jsonl`` and ``summary.json``
under ``<runs_dir>/<run name>/`` → print the summary table. :func:`evaluate` is the same pipeline
for the training loops, on an existing sampler; :func:`log_generations` records samples during training.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shell.config import ModelConfig, RunConfig, SamplerConfig, asdict, cli
from shell.data import DataConfig, Dataset, load_dataset
from shell.prompts import PromptName, PromptTemplate, load_prompt
from shell.runlog import atomic_write_text


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation samples are drawn and graded."""

    prompt: PromptName = "r1_zero"
    """Prompt template; each has its own reward function (r1_zero → r1_zero_reward_fn)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_tokens: int = 1024
    """Most tokens generated per response."""
    min_tokens: int = 0
    """Fewest tokens generated before eos or a stop string may end a response."""
    grading_timeout_s: float = 5.0
    """Per-item grading time limit; an item past it counts as wrong."""
    grading_workers: int | None = None
    """Grader processes (None: one per core; 0: grade in this process)."""


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a policy on a data set and write per-example results and a summary."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="validation", limit=128)
    """Held-out problems: the embedded task (path None) or a MATH/GSM8K jsonl."""
    sampler: SamplerConfig = SamplerConfig()
    eval: EvalSettings = EvalSettings()
    run: RunConfig = RunConfig(name="zero_shot", logger="none")


@dataclass
class EvalResult:
    """Per-example records and the summary of one evaluation."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]


def _mean(values: Sequence[float]) -> float | None:
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
        "format_reward": _mean([r["format_reward"] for r in records]) or 0.0,
        "answer_reward": _mean([r["answer_reward"] for r in records]) or 0.0,
        "reward": _mean([r["reward"] for r in records]) or 0.0,
        "mean_length": _mean([r["num_tokens"] for r in records]),
        "mean_length_correct": _mean([r["num_tokens"] for r in correct]),
        "mean_length_incorrect": _mean([r["num_tokens"] for r in incorrect]),
        "mean_token_entropy": _mean(entropies),
        "finish_reasons": {k: sum(1 for r in records if r.get("finish_reason") == k) for k in ("stop", "eos", "length")},
    }


def evaluate(
    sampler: Any,
    dataset: Dataset | Sequence[Any],
    *,
    template: PromptTemplate,
    settings: EvalSettings = EvalSettings(),
    seed: int | None = 0,
    progress: bool = False,
) -> EvalResult:
    """Sample one response per problem with ``sampler``, grade it, and summarise.

    Args:
        sampler: a :class:`shell.sampling.Sampler` holding the policy's current weights.
        dataset: examples with ``question`` and ``answer``.
        template: the prompt; its reward function grades.
        settings: sampling and grading settings.
        seed: sampling seed (None: fresh randomness).

    Returns:
        records (prompt, response, ground truth, the three rewards, token count, mean token entropy,
        finish reason) and the summary of :func:`summarize` plus ``seconds``.
    """
    from shell.grading import grade_batch
    from shell.sampling import SamplingParams

    t0 = time.perf_counter()
    examples = list(dataset)
    prompts = [template.format(ex.question) for ex in examples]
    params = SamplingParams(
        n=1, temperature=settings.temperature, top_p=settings.top_p, max_tokens=settings.max_tokens,
        min_tokens=settings.min_tokens, stop=("</answer>",), seed=seed, logprobs=True,
    )
    completions = [c[0] for c in _generate(sampler, prompts, params, progress=progress)]
    scores, grading = grade_batch(
        [c.text for c in completions], [ex.answer for ex in examples], reward_fn=template.reward_fn_name,
        timeout_s=settings.grading_timeout_s, num_workers=settings.grading_workers,
    )
    records = []
    for ex, prompt, comp, score in zip(examples, prompts, completions, scores):
        records.append({
            "prompt": prompt,
            "response": comp.text,
            "ground_truth": ex.answer,
            "format_reward": float(score["format_reward"]),
            "answer_reward": float(score["answer_reward"]),
            "reward": float(score["reward"]),
            "num_tokens": len(comp.token_ids),
            "mean_token_entropy": _mean(comp.entropies) if comp.entropies else None,
            "finish_reason": comp.finish_reason,
        })
    summary = summarize(records)
    summary["grading_timeouts"] = grading.get("timeouts", 0)
    summary["seconds"] = time.perf_counter() - t0
    return EvalResult(records=records, summary=summary)


def _generate(sampler: Any, prompts: list[str], params: Any, *, progress: bool) -> list[list[Any]]:
    if not progress:
        return sampler.generate(prompts, params)
    from tqdm import tqdm

    step = max(1, getattr(sampler, "batch_size", 64))
    out: list[list[Any]] = []
    with tqdm(total=len(prompts), desc="sampling", unit="problem") as bar:
        for i in range(0, len(prompts), step):
            chunk_params = replace(params, seed=None if params.seed is None else params.seed + i)
            out.extend(sampler.generate(prompts[i : i + step], chunk_params))
            bar.update(len(prompts[i : i + step]))
    return out


def log_generations(
    records: Sequence[dict[str, Any]],
    path: Path | str,
    *,
    step: int,
    max_samples: int = 8,
) -> dict[str, Any]:
    """Append a generation log entry to ``path`` (jsonl) and return its statistics.

    The entry holds ``max_samples`` samples (prompt, response, ground truth, rewards, mean token
    entropy) and, over all ``records``: mean response length overall, for correct and for incorrect
    responses, and the mean token entropy.
    """
    stats = {
        "mean_length": _mean([r["num_tokens"] for r in records]),
        "mean_length_correct": _mean([r["num_tokens"] for r in records if r["reward"] == 1.0]),
        "mean_length_incorrect": _mean([r["num_tokens"] for r in records if r["reward"] != 1.0]),
        "mean_token_entropy": _mean([r["mean_token_entropy"] for r in records if r.get("mean_token_entropy") is not None]),
        "reward": _mean([r["reward"] for r in records]),
    }
    keys = ("prompt", "response", "ground_truth", "format_reward", "answer_reward", "reward", "mean_token_entropy", "num_tokens")
    entry = {"step": step, "stats": stats, "samples": [{k: r.get(k) for k in keys} for r in list(records)[:max_samples]]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return stats


def write_results(run_dir: Path, result: EvalResult, config: dict[str, Any]) -> None:
    """``results.jsonl`` (one record a line), ``summary.json`` and ``config.json``, each atomically."""
    atomic_write_text(run_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in result.records))
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


def build_sampler(model_cfg: ModelConfig, sampler_cfg: SamplerConfig, *, seed: int = 0) -> tuple[Any, Any, Any]:
    """Load the policy and wrap it in the configured sampler: ``(model, tokenizer, sampler)``."""
    from shell.models import load_policy, resolve_model_path
    from shell.sampling import make_sampler

    model, tokenizer = load_policy(model_cfg.name_or_path, device=model_cfg.device, dtype=model_cfg.dtype)
    if sampler_cfg.backend == "hf":
        sampler = make_sampler("hf", model, tokenizer, batch_size=sampler_cfg.batch_size,
                               generation_dtype=sampler_cfg.generation_dtype)
    else:
        kw: dict[str, Any] = {"gpu_memory_utilization": sampler_cfg.gpu_memory_utilization, "seed": seed,
                              "enforce_eager": sampler_cfg.enforce_eager}
        if sampler_cfg.vllm_device:
            kw["device"] = sampler_cfg.vllm_device
        sampler = make_sampler("vllm", model_path=str(resolve_model_path(model_cfg.name_or_path)), **kw)
    return model, tokenizer, sampler


PRESETS: dict[str, tuple[str, EvaluateConfig]] = {
    "laptop": (
        "CPU: SmolLM2-135M-Instruct on 128 held-out embedded arithmetic problems, 128 new tokens at most",
        EvaluateConfig(eval=EvalSettings(max_tokens=128)),
    ),
    "h100": (
        "GPU: Qwen2.5-Math-1.5B on the 5K MATH validation set through vLLM (T=1, top-p 1, 1024 tokens)",
        EvaluateConfig(
            model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
            data=DataConfig(path="../shared/data/math/validation.jsonl"),
            sampler=SamplerConfig(backend="vllm"),
            run=RunConfig(name="zero_shot_math", logger="none"),
        ),
    ),
}


def main(cfg: EvaluateConfig) -> EvalResult:
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    template = load_prompt(cfg.eval.prompt)
    dataset = load_dataset(cfg.data)
    print(f"evaluating {cfg.model.name_or_path} on {len(dataset)} problems from {dataset.source}"
          + (f" ({dataset.skipped} skipped: empty answer)" if dataset.skipped else ""))
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed)
    try:
        result = evaluate(sampler, dataset, template=template, settings=cfg.eval, seed=cfg.run.seed, progress=True)
    finally:
        sampler.close()
    write_results(run_dir, result, asdict(cfg))
    print(format_summary(result.summary))
    print(f"wrote {run_dir / 'results.jsonl'} and {run_dir / 'summary.json'}")
    return result


if __name__ == "__main__":
    main(cli(EvaluateConfig, PRESETS, description=__doc__.split("\n\n")[0]))
