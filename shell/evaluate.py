"""Zero-shot (or any-checkpoint) evaluation: ``python -m shell.evaluate``.

Phases: load data → build prompts → sample → grade → write ``results.jsonl`` and ``summary.json``
under ``<runs_dir>/<run name>/`` → print the summary table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shell.config import (
    GradingConfig, ModelConfig, RunConfig, SamplerConfig, SamplingConfig, asdict, at_least, check_parts, run_cli,
)
from shell.data import DataConfig, load_dataset, questions_within_context
from shell.evaluation import EvalResult, evaluate, format_summary, write_results
from shell.models import prompt_token_limit
from shell.prompts import PromptName, load_prompt
from shell.sampling import build_sampler
from shell.steps import mean_token_entropies


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a policy on a data set and write per-example results and a summary."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="validation", limit=128)
    """Held-out problems: the embedded task (path None) or a MATH/GSM8K jsonl."""
    prompt: PromptName = "r1_zero"
    """Prompt template; each has its own reward function (r1_zero → r1_zero_reward_fn)."""
    eval: SamplingConfig = SamplingConfig()
    """How each response is sampled (stop after </answer>, kept)."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    entropy_microbatch: int = 8
    """Where the sampler reports no token entropies (vLLM), the policy scores each response's entropy, this many
    rows at a time (inference mode; 0: leave them out)."""
    run: RunConfig = RunConfig(name="zero_shot", logger="none")


def check_config(cfg: EvaluateConfig) -> None:
    """Every flag's range, before anything loads; each message names the flag."""
    at_least(cfg.entropy_microbatch, 0, "--entropy-microbatch")
    check_parts(cfg, trains=())


def check_writable(run_dir: Path) -> None:
    """Refuse, before any sampling, an output folder that cannot be written (the results would be lost)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write the results to {run_dir}: {e.strerror or e} "
                         "(choose another --run.runs-dir or --run.name)") from None


def main_with(cfg: EvaluateConfig) -> EvalResult:
    """Evaluate as configured; writes and prints the results."""
    # Phase 0: flags, prompt, data and the output folder, before the model loads.
    check_config(cfg)
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    template = load_prompt(cfg.prompt)
    dataset = load_dataset(cfg.data)
    check_writable(run_dir)
    print(f"evaluating {cfg.model.name_or_path} on {len(dataset)} problems from {dataset.source}"
          + (f" ({dataset.skipped} skipped: empty answer)" if dataset.skipped else ""), flush=True)
    # Phase 1: sample and grade.
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed, training=False)
    dataset = questions_within_context(dataset, template, tokenizer, what="evaluation set", limit=prompt_token_limit(
        model, reserve=cfg.eval.max_tokens, max_prompt_tokens=cfg.data.max_prompt_tokens))

    def entropy(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return mean_token_entropies(model, tokenizer, prompts, responses, microbatch=cfg.entropy_microbatch,
                                    temperature=cfg.eval.temperature if cfg.eval.temperature > 0 else 1.0)

    try:
        result = evaluate(sampler, dataset, template=template, sampling=cfg.eval, grading=cfg.grading,
                          seed=cfg.run.seed, entropy=entropy if cfg.entropy_microbatch else None, progress=True)
    finally:
        sampler.close()
    # Phase 2: write and report.
    write_results(run_dir, result, asdict(cfg))
    print(format_summary(result.summary))
    print(f"wrote {run_dir / 'results.jsonl'} and {run_dir / 'summary.json'}")
    return result


PRESETS: dict[str, tuple[str, EvaluateConfig]] = {
    "laptop": (
        "CPU: SmolLM2-135M-Instruct on 128 held-out embedded arithmetic problems, 128 new tokens at most",
        EvaluateConfig(eval=SamplingConfig(max_tokens=128)),
    ),
    "h100": (
        "GPU: Qwen2.5-Math-1.5B (bf16) on the 5K MATH validation set through vLLM on the same GPU at 0.85 (T=1, "
        "top-p 1, 1024 tokens); the policy scores each response's entropy",
        EvaluateConfig(
            model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
            data=DataConfig(path="../shared/data/math/validation.jsonl", limit=None),
            sampler=SamplerConfig(backend="vllm", placement="colocate", gpu_memory_utilization=0.85, sleep=False),
            run=RunConfig(name="zero_shot_math", logger="none"),
        ),
    ),
}


def main(argv: Sequence[str] | None = None) -> EvalResult:
    return run_cli(EvaluateConfig, PRESETS, main_with, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
