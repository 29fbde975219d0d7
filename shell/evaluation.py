"""Evaluation: sample k responses per problem (default 1), grade them, summarise with pass@j, avg@k, maj@k and a
95% bootstrap interval over problems on every figure (the zero-shot entry point and every training loop's held-out
evaluation share :func:`evaluate`; the loops call it through :func:`run_eval`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import core
from shell.config import GradingConfig, SamplingConfig, at_least, check_parts, flag
from shell.data import Dataset, HeldOutConfig
from shell.files import append_text, atomic_write_jsonl, atomic_write_text
from shell.grading import answer_extractor_by_name, grade_batch
from shell.progress import say
from shell.prompts import PromptTemplate
from shell.sampling import Sampler, SamplingParams
from shell.seeds import derive_seed

if TYPE_CHECKING:
    from shell.loop import Run

__all__ = ["CATEGORIES", "CI_LEVEL", "CI_RESAMPLES", "CI_SEED", "EvalResult", "FinalEvalConfig", "bracket", "evaluate",
           "final_evaluation", "format_summary", "generation_stats", "interval_metrics", "log_generations", "mean_or_none",
           "pass_at_ks", "per_problem_values", "run_eval", "sampled_figures", "summarize", "write_results"]

CI_RESAMPLES = 2000
"""Bootstrap resamples (over problems) behind every ``ci95`` interval."""
CI_LEVEL = 0.95
CI_SEED = 0
"""The resampling seed: the same records always get the same intervals."""
CATEGORIES = ("format1_answer1", "format1_answer0", "format0")

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
    """Also evaluate greedily (T=0), written to final_eval/greedy/. With --budget-hours, skipped (said, and logged as
    final_greedy/skipped) when it would end past the budget, judged from the sampled pass's time."""
    samples_per_problem: int = 1
    """Responses sampled per problem (k): the summary adds pass@j (j = 1, 2, 4, ... <= k), avg@k and maj@k (the
    greedy pass always samples one)."""

    def check(self, prefix: str = "final-eval") -> None:
        at_least(self.samples_per_problem, 1, flag(prefix, "samples_per_problem"))
        check_parts(self, prefix=prefix)


@dataclass
class EvalResult:
    """Per-example records and the summary of one evaluation."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]


def mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def pass_at_ks(k: int) -> list[int]:
    """The j of the pass@j figures of an evaluation with ``k`` samples per problem: 1, 2, 4, … ≤ k."""
    return [2 ** e for e in range(max(k, 1).bit_length()) if 2 ** e <= k]


def _problems(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by their ``index`` (in order of first appearance; a record without one is its own problem)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for position, r in enumerate(records):
        groups.setdefault(r.get("index", ("row", position)), []).append(r)
    return list(groups.values())


def per_problem_values(records: Sequence[dict[str, Any]]) -> tuple[dict[str, tuple[float, float]], list[dict[str, tuple[float, float]]]]:
    """Every figure of :func:`summarize` as a ratio of per-problem sums: ``figure = Σ_i num_i / Σ_i den_i``.

    Returns ``(totals, rows)``: ``rows[i][figure] = (num_i, den_i)`` for problem ``i`` (problems in the order of
    their first record) and ``totals[figure] = (Σ num, Σ den)``. Rewards, ``accuracy``, ``avg@k``, the three
    categories and the mean length / entropy are means over samples (``den_i``: the problem's samples that
    count, e.g. its correct ones for ``mean_length_correct``); ``pass@j`` and ``maj@k`` are means over problems
    (``den_i = 1``).
    """
    problems = _problems(records)
    k = min((len(p) for p in problems), default=1)
    rows = []
    for samples in problems:
        n = float(len(samples))
        answers = [r["answer_reward"] for r in samples]
        correct = [r for r in samples if r["reward"] == 1.0]
        incorrect = [r for r in samples if r["reward"] != 1.0]
        entropies = [r["mean_token_entropy"] for r in samples if r.get("mean_token_entropy") is not None]
        num_correct = sum(1 for a in answers if a == 1.0)
        winner = core.majority_vote([r.get("extracted_answer") for r in samples])
        row = {
            "accuracy": (sum(answers), n),
            "format_reward": (sum(r["format_reward"] for r in samples), n),
            "answer_reward": (sum(answers), n),
            "reward": (sum(r["reward"] for r in samples), n),
            f"avg@{k}": (sum(answers), n),
            **{f"pass@{j}": (core.pass_at_k(len(samples), num_correct, j), 1.0) for j in pass_at_ks(k)},
            f"maj@{k}": (0.0 if winner is None else float(samples[winner]["answer_reward"]), 1.0),
            "format1_answer1": (sum(1.0 for r in samples if r["format_reward"] == 1 and r["answer_reward"] == 1), n),
            "format1_answer0": (sum(1.0 for r in samples if r["format_reward"] == 1 and r["answer_reward"] != 1), n),
            "format0": (sum(1.0 for r in samples if r["format_reward"] != 1), n),
            "mean_length": (sum(r["num_tokens"] for r in samples), n),
            "mean_length_correct": (sum(r["num_tokens"] for r in correct), float(len(correct))),
            "mean_length_incorrect": (sum(r["num_tokens"] for r in incorrect), float(len(incorrect))),
            "mean_token_entropy": (sum(entropies), float(len(entropies))),
        }
        rows.append(row)
    totals = {key: (sum(r[key][0] for r in rows), sum(r[key][1] for r in rows)) for key in (rows[0] if rows else {})}
    return totals, rows


def summarize(records: Sequence[dict[str, Any]], *, resamples: int = CI_RESAMPLES, seed: int = CI_SEED) -> dict[str, Any]:
    """The handout's three categories, rewards, accuracy and response lengths (tokens) of ``records``, and with
    ``k`` samples per problem (records sharing an ``index``) ``avg@k`` (mean answer reward of all samples),
    ``pass@j`` for j = 1, 2, 4, … ≤ k (the unbiased estimator, averaged over problems), ``maj@k`` (the answer
    reward of the sample that wins the vote on the normalised extracted answers), and ``ci95``: each figure's
    95% percentile-bootstrap interval over problems (``resamples`` draws, seeded; the categories in counts, as
    ``counts``; ``null`` where a figure is undefined). ``accuracy`` is the mean answer reward of all samples."""
    totals, rows = per_problem_values(records)
    n = len(records)
    problems = len(rows)
    k = min((len(p) for p in _problems(records)), default=1)
    figures: dict[str, float | None] = {}
    ci: dict[str, list[float] | None] = {}
    if rows:
        keys = list(rows[0])
        num = torch.tensor([[r[key][0] for key in keys] for r in rows], dtype=torch.float64)
        den = torch.tensor([[r[key][1] for key in keys] for r in rows], dtype=torch.float64)
        est, low, high = core.bootstrap_ci(num, den, resamples=resamples, level=CI_LEVEL, seed=seed)
        for key, e, lo, hi in zip(keys, est.tolist(), low.tolist(), high.tolist()):
            scale = float(n) if key in CATEGORIES else 1.0  # the categories are counts of samples
            if e != e:  # NaN: no sample counts (e.g. no correct response)
                figures[key], ci[key] = None, None
                continue
            point = totals[key][0] if key in CATEGORIES else e
            figures[key] = point
            ci[key] = [min(lo * scale, point), max(hi * scale, point)]
    counts = {key: int(round(figures.get(key) or 0)) for key in CATEGORIES}
    summary = {
        "num_examples": problems,
        "num_samples": n,
        "samples_per_problem": k,
        "counts": counts,
        "accuracy": figures.get("accuracy") or 0.0,
        "format_reward": figures.get("format_reward") or 0.0,
        "answer_reward": figures.get("answer_reward") or 0.0,
        "reward": figures.get("reward") or 0.0,
        f"avg@{k}": figures.get(f"avg@{k}") or 0.0,
        **{f"pass@{j}": figures.get(f"pass@{j}") or 0.0 for j in pass_at_ks(k)},
        f"maj@{k}": figures.get(f"maj@{k}") or 0.0,
        "mean_length": figures.get("mean_length"),
        "mean_length_correct": figures.get("mean_length_correct"),
        "mean_length_incorrect": figures.get("mean_length_incorrect"),
        "mean_token_entropy": figures.get("mean_token_entropy"),
        "finish_reasons": {k_: sum(1 for r in records if r.get("finish_reason") == k_) for k_ in ("stop", "eos", "length")},
        "ci95": ci,
        "ci_resamples": resamples,
    }
    return summary


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
    samples_per_problem: int = 1,
) -> EvalResult:
    """Sample ``samples_per_problem`` responses per problem with ``sampler``, grade them, and summarise.

    Args:
        sampler: a :class:`shell.sampling.Sampler` holding the policy's current weights.
        dataset: examples with ``question`` and ``answer``.
        template: the prompt; its reward function grades (and says which answer maj@k votes on).
        sampling: temperature, top-p, min/max tokens (stop after ``</answer>``, kept).
        grading: grader timeout and workers.
        seed: sampling seed (None: fresh randomness); sample ``j`` of problem ``i`` draws its noise as a
            function of ``(seed, i, j)`` (k = 1 draws what it always drew).
        entropy: where the sampler reports no per-token entropies (vLLM), this scores the responses.
        progress: progress bars for sampling and grading (on a terminal).
        samples_per_problem: k >= 1.

    Returns:
        records, problem-major (``index``: the problem's position in ``dataset``, ``sample``: 0 … k−1, prompt,
        response, ground truth, the three rewards, token count, mean token entropy, finish reason and the
        normalised extracted answer), and the summary of :func:`summarize` plus ``grading_timeouts`` and
        ``seconds``.
    """
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem must be >= 1, got {samples_per_problem}")
    t0 = time.perf_counter()
    examples = list(dataset)
    prompts = [template.format(ex.question) for ex in examples]
    params = SamplingParams(
        n=samples_per_problem, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens, stop=("</answer>",), seed=seed, logprobs=True,
    )
    per_problem = sampler.generate(prompts, params, progress=progress)
    slots = [(i, j) for i, group in enumerate(per_problem) for j in range(len(group))]
    completions = [c for group in per_problem for c in group]
    entropies = [statistics.fmean(c.entropies) if c.entropies else None for c in completions]
    missing = [m for m, e in enumerate(entropies) if e is None and completions[m].token_ids]
    if missing and entropy is not None:
        scored = entropy([prompts[slots[m][0]] for m in missing], [completions[m].text for m in missing])
        for m, e in zip(missing, scored):
            entropies[m] = e
    scores, grading_meta = grade_batch(
        [c.text for c in completions], [examples[i].answer for i, _ in slots], reward_fn=template.reward_fn_name,
        timeout_s=grading.timeout_s, num_workers=grading.workers, progress=progress,
    )
    extract = answer_extractor_by_name(template.reward_fn_name)
    records = []
    for (i, j), comp, score, ent in zip(slots, completions, scores, entropies):
        answer = extract(comp.text)
        records.append({
            "index": i,
            "sample": j,
            "prompt": prompts[i],
            "response": comp.text,
            "ground_truth": examples[i].answer,
            "format_reward": float(score["format_reward"]),
            "answer_reward": float(score["answer_reward"]),
            "reward": float(score["reward"]),
            "num_tokens": len(comp.token_ids),
            "mean_token_entropy": ent,
            "finish_reason": comp.finish_reason,
            "extracted_answer": None if answer is None else core.normalize_answer(answer),
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
    """A training loop's held-out evaluation of the policy whose weights ``sampler`` holds (the loop syncs it):
    evaluate (noise seeded by the run's seed and ``step``), append the generations to ``generations.jsonl``, log
    ``{prefix}/…`` metrics with ``eval_step`` = ``step`` (plus the ``extra`` keys; the answer and format rewards
    with their 95% bootstrap interval over problems, ``…_ci_low`` / ``…_ci_high``) and redraw the figures.
    Under torchrun the problems are shared among the ranks (sampling, grading) and rank 0 writes."""
    model.eval()
    result = evaluate(sampler, eval_set, template=template, sampling=sampling, grading=grading,
                      seed=derive_seed(run.run_cfg.seed, "eval", step), entropy=entropy, progress=True)
    s = result.summary
    stats = (log_generations(result.records, run.dir / "generations.jsonl", step=step, max_samples=run.loop.log_generations)
             if run.world.main else generation_stats(result.records))
    metrics = {
        "eval_step": step,
        f"{prefix}/answer_reward": s["answer_reward"],
        **interval_metrics(s, "answer_reward", prefix),
        f"{prefix}/format_reward": s["format_reward"],
        **interval_metrics(s, "format_reward", prefix),
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
    say(f"[eval step {step}] answer {s['answer_reward']:.3f} {bracket(s['ci95'].get('answer_reward'))}  "
        f"format {s['format_reward']:.3f}  "
        f"len {stats['mean_length'] or 0:.1f}  ({s['seconds']:.0f}s)")
    return metrics


def final_evaluation(
    run: Run, sampler: Sampler, model: torch.nn.Module, eval_set: Any, *, template: PromptTemplate,
    cfg: FinalEvalConfig, grading: GradingConfig, entropy: EntropyFn | None = None,
) -> dict[str, EvalResult]:
    """Evaluate the final policy on ``eval_set`` as ``cfg`` says (and greedily when asked), write
    ``<run>/final_eval/{summary.json, results.jsonl}`` (the summary of ``shell.evaluate``, with ``cfg``'s
    samples per problem; ``greedy/`` for the greedy pass, one sample), log ``final/…`` metrics (the rewards with
    their intervals, and ``final/pass@j`` …) and print the tables."""
    model.eval()
    sampler.load_weights(model)
    passes = {"": cfg.sampling}
    if cfg.greedy:
        passes["greedy"] = SamplingConfig(temperature=0.0, top_p=1.0, min_tokens=cfg.sampling.min_tokens,
                                          max_tokens=cfg.sampling.max_tokens)
    out = {}
    for name, sampling in passes.items():
        if name and run.schedule.over_share(1.0, out["sampled"].summary["seconds"]):  # the greedy pass, ~as long
            say(f"--budget-hours {run.loop.budget_hours:g}: {run.elapsed / 60:.1f} min used; the greedy pass (~"
                f"{out['sampled'].summary['seconds'] / 60:.1f} min, as long as the sampled one) would end past the "
                f"budget: skipped (shell.evaluate --model.name-or-path {run.dir / 'final'} --eval.temperature 0 "
                f"runs it on the same problems)")
            run.log({"eval_step": run.completed, "final_greedy/skipped": 1})
            continue
        result = evaluate(sampler, eval_set, template=template, sampling=sampling, grading=grading,
                          seed=derive_seed(run.run_cfg.seed, "final-eval"), entropy=entropy, progress=True,
                          samples_per_problem=1 if name else cfg.samples_per_problem)
        folder = run.dir / "final_eval" / name if name else run.dir / "final_eval"
        if run.world.main:
            write_results(folder, result, {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                           "max_tokens": sampling.max_tokens, "step": run.completed})
        key = "final_greedy" if name else "final"
        s = result.summary
        run.log({"eval_step": run.completed, f"{key}/answer_reward": s["answer_reward"],
                 **interval_metrics(s, "answer_reward", key),
                 f"{key}/format_reward": s["format_reward"], **interval_metrics(s, "format_reward", key),
                 **{f"{key}/{figure}": s[figure] for figure in sampled_figures(s)},
                 f"{key}/num_examples": len(eval_set), f"{key}/seconds": s["seconds"]})
        say(f"final evaluation{' (greedy)' if name else f' (T={sampling.temperature:g})'} on {len(eval_set)} problems "
            f"-> {folder / 'summary.json'}\n{format_summary(result.summary)}")
        out[name or "sampled"] = result
    return out


def write_results(run_dir: Path, result: EvalResult, config: dict[str, Any]) -> None:
    """``results.jsonl`` (one record a line), ``summary.json`` and ``config.json``, each atomically."""
    atomic_write_jsonl(run_dir / "results.jsonl", result.records)
    atomic_write_text(run_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")


def sampled_figures(summary: dict[str, Any]) -> list[str]:
    """The k-sample figures of a summary, in order: ``avg@k``, ``pass@1``, ``pass@2``, … and ``maj@k``."""
    k = summary.get("samples_per_problem", 1)
    return [f"avg@{k}", *(f"pass@{j}" for j in pass_at_ks(k)), f"maj@{k}"]


def interval_metrics(summary: dict[str, Any], figure: str, prefix: str) -> dict[str, float | None]:
    """``{prefix}/{figure}_ci_low`` and ``…_ci_high`` from a summary's ``ci95`` (None where it has none)."""
    lo, hi = summary.get("ci95", {}).get(figure) or (None, None)
    return {f"{prefix}/{figure}_ci_low": lo, f"{prefix}/{figure}_ci_high": hi}


def bracket(interval: Sequence[float] | None, scale: float = 1.0, digits: int = 3) -> str:
    """``[lo, hi]`` of an interval (``[-]`` for none)."""
    if not interval:
        return "[-]"
    return f"[{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"


def format_summary(summary: dict[str, Any]) -> str:
    """A short text table of a summary (each figure with its 95% interval over problems)."""
    c = summary["counts"]
    n = summary.get("num_samples", summary["num_examples"])
    ci = summary.get("ci95", {})

    def pct(key: str) -> str:
        k = c[key]
        if not n:
            return f"{k:5d}"
        return f"{k:5d}  ({100 * k / n:5.1f}%)  " + bracket(ci.get(key), 100 / n, 1).replace("]", "%]")

    def rate(key: str) -> str:
        return f"{100 * summary[key]:5.1f}%  " + bracket(ci.get(key), 100, 1).replace("]", "%]")

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    k = summary.get("samples_per_problem", 1)
    lines = [
        f"examples                    {summary['num_examples']:5d}" + (f"  x {k} samples = {n}" if k > 1 else ""),
        f"format 1, answer 1          {pct('format1_answer1')}",
        f"format 1, answer 0          {pct('format1_answer0')}",
        f"format 0                    {pct('format0')}",
        f"accuracy (answer reward)    {rate('answer_reward')}",
        f"format reward               {rate('format_reward')}",
    ]
    if k > 1:
        lines += [f"{figure:28s}{rate(figure)}" for figure in sampled_figures(summary) if figure in summary]
    lines.append(f"mean length (tokens)        {num(summary['mean_length'])}  correct {num(summary['mean_length_correct'])}  "
                 f"incorrect {num(summary['mean_length_incorrect'])}")
    if summary.get("mean_token_entropy") is not None:
        lines.append(f"mean token entropy          {summary['mean_token_entropy']:.3f}")
    lines.append(f"seconds                     {summary.get('seconds', 0):.1f}")
    if ci:
        lines.append(f"[lo, hi]: 95% bootstrap interval over the {summary['num_examples']} problems "
                     f"({summary.get('ci_resamples', CI_RESAMPLES)} resamples)")
    return "\n".join(lines)
