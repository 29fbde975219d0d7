"""SFT traces: a {prompt, response} pair per example, the response continuing the template's prompt with
the example's solution and answer (r1_zero: `` {solution} </think> <answer> {answer} </answer>``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from core import extract_boxed
from shell.data.jsonl import detect_format, load_sft_examples, read_jsonl
from shell.data.loading import DataConfig, load_dataset, resolve_data_path
from shell.data.records import DataError, Example, SFTExample

if TYPE_CHECKING:
    from shell.prompts import PromptTemplate

__all__ = ["make_sft_examples", "sft_examples_for", "sft_response"]


def sft_response(example: Example, template: str) -> str:
    """The response that continues ``template``'s prompt for ``example`` (its solution, then its answer)."""
    if example.solution is None:
        raise ValueError("example has no solution to build a reasoning trace from")
    solution = example.solution.strip()
    if template == "r1_zero":
        # The prompt ends with "Assistant: <think>"; the trace continues it.
        return f" {solution} </think> <answer> {example.answer} </answer>"
    if template == "question_only":
        if extract_boxed(solution) is None:  # no answer question_only_reward_fn would read: add one
            solution = f"{solution} The answer is $\\boxed{{{example.answer}}}$."
        return f"\n{solution}"
    raise ValueError(f"no SFT response format for template {template!r}")


def make_sft_examples(
    examples: Iterable[Example], template: PromptTemplate | str = "r1_zero"
) -> list[SFTExample]:
    """SFT pairs in ``template``'s format; examples without a ``solution`` are left out."""
    from shell.prompts import load_prompt

    tpl = load_prompt(template) if isinstance(template, str) else template
    return [
        SFTExample(prompt=tpl.format(ex.question), response=sft_response(ex, tpl.name), ground_truth=ex.answer,
                   where=_where(ex))
        for ex in examples
        if ex.solution is not None
    ]


def _where(example: Example) -> str | None:
    source, line = example.meta.get("source"), example.meta.get("line")
    return f"{source}:{line}" if source is not None and line is not None else None


def sft_examples_for(cfg: DataConfig, template: PromptTemplate | str = "r1_zero") -> list[SFTExample]:
    """SFT pairs for any config: an SFT file as is, otherwise traces made from the examples' solutions (those
    without one are left out and counted; ``DataError`` naming the file when none has one)."""
    if cfg.path is not None:
        path = resolve_data_path(cfg.path, cfg.split)
        fmt = cfg.format
        if fmt == "auto":
            first = next(read_jsonl(path), None)
            if first is None:
                raise DataError(f"{path}: no usable examples")
            try:
                fmt = detect_format(first[1])  # type: ignore[assignment]
            except DataError as e:
                raise DataError(f"{path}:{first[0]}: {e}") from None
        if fmt == "sft":
            return load_sft_examples(path, limit=cfg.limit, shuffle=cfg.shuffle, seed=cfg.seed)
    dataset = load_dataset(cfg)
    pairs = make_sft_examples(dataset, template)
    if not pairs:
        raise DataError(f"{dataset.source}: none of its {len(dataset)} problems has a solution, so no SFT trace can be "
                        "made from it (SFT needs records with a 'solution' (MATH) or a rationale (GSM8K), the embedded "
                        "task, or an SFT file of {prompt, response} records)")
    if len(pairs) < len(dataset):
        print(f"SFT traces: left out {len(dataset) - len(pairs)} of {len(dataset)} problems without a solution", flush=True)
    return pairs
