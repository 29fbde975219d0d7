"""Zero-shot (or any-checkpoint) evaluation: ``python -m shell.evaluate``.

Phases: the folder (``<runs_dir>/<run name>/``, named from the model and the data unless ``--run.name``; an
earlier evaluation there is refused unless ``--overwrite``, a training run's always; its lock taken) → load data
→ build prompts → sample (``--samples-per-problem`` k) → grade → write ``results.jsonl`` and ``summary.json``
(pass@j, avg@k, maj@k and a 95% bootstrap interval on every figure) → print the summary table.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shell.config import (
    GradingConfig, ModelConfig, RunConfig, SamplerConfig, SamplingConfig, asdict, at_least, check_parts, run_cli,
)
from shell.data import DataConfig, load_dataset, questions_within_context, shared_data
from shell.evaluation import EvalResult, evaluate, format_summary, write_results
from shell.files import FolderLock, missing_folders, remove_unused_folders
from shell.models import prompt_token_limit
from shell.prompts import PromptName, load_prompt
from shell.sampling import build_sampler
from shell.steps import mean_token_entropies


AUTO_NAME = "auto"
"""The default --run.name: a folder named from the model and the data (:func:`run_name`)."""


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
    samples_per_problem: int = 1
    """Responses sampled per problem (k): results.jsonl gets one row per sample (index, sample) and summary.json
    pass@j (j = 1, 2, 4, ... <= k), avg@k and maj@k beside accuracy, each with a 95% interval (ci95)."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    entropy_microbatch: int = 8
    """Where the sampler reports no token entropies (vLLM), the policy scores each response's entropy, this many
    rows at a time (inference mode; 0: leave them out)."""
    overwrite: bool = False
    """Replace an earlier evaluation in the same run folder (without it, such a folder is refused)."""
    run: RunConfig = RunConfig(name=AUTO_NAME, logger="none")
    """--run.name auto (the default): the folder is named from the model and the data, e.g.
    eval_smollm2_embedded-d1-validation_n128, so evaluations of other models or sets never collide."""


def check_config(cfg: EvaluateConfig) -> None:
    """Every flag's range, before anything loads; each message names the flag."""
    at_least(cfg.entropy_microbatch, 0, "--entropy-microbatch")
    at_least(cfg.samples_per_problem, 1, "--samples-per-problem")
    check_parts(cfg, trains=())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "x"


def model_label(name_or_path: str) -> str:
    """A short name for a model: ``smollm2``; a folder's name, with its run's name for a run's ``final/`` or
    ``checkpoints/step_N`` (``grpo_laptop-final``)."""
    path = Path(name_or_path.rstrip("/"))
    if path.name == "final" or path.name.startswith("step_"):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return _slug(f"{run.name}-{path.name}")
    return _slug(path.name)


def data_label(data: DataConfig) -> str:
    """A short name for an evaluation set: ``embedded-d1-validation``, ``math-validation``, with the subset."""
    if data.path is None or data.path == "embedded":
        name = f"embedded-d{data.difficulty}" + ("" if data.phrasing == "plain" else f"-{data.phrasing}") + f"-{data.split}"
        if data.seed:
            name += f"-seed{data.seed}"
    else:
        path = Path(data.path.rstrip("/"))
        name = f"{path.name}-{data.split}" if path.is_dir() else f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem
    if data.shuffle:
        name += f"-shuffled{data.seed}"
    return _slug(name) + (f"_n{data.limit}" if data.limit is not None else "_all")


def run_name(cfg: EvaluateConfig) -> str:
    """``--run.name``, or for ``auto`` ``eval_<model>_<data>_n<limit>``, then what differs from the default
    evaluation: the prompt, the vLLM backend, the temperature and top-p (``…_question_only_vllm_t0``)."""
    if cfg.run.name != AUTO_NAME:
        return cfg.run.name
    parts = [f"eval_{model_label(cfg.model.name_or_path)}_{data_label(cfg.data)}"]
    if cfg.prompt != "r1_zero":
        parts.append(cfg.prompt)
    if cfg.sampler.backend != "hf":
        parts.append(cfg.sampler.backend)
    if cfg.eval.temperature != 1.0:
        parts.append(f"t{cfg.eval.temperature:g}")
    if cfg.eval.top_p != 1.0:
        parts.append(f"p{cfg.eval.top_p:g}")
    return "_".join(parts)


def check_folder(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse a training run's folder always, and an earlier evaluation's unless ``overwrite``."""
    trained = [name for name in ("metrics.jsonl", "checkpoints", "final") if (run_dir / name).exists()]
    if trained:
        raise ValueError(f"{run_dir} is a training run's folder ({', '.join(trained)}): evaluate into another "
                         f"--run.name (its final/ model: --model.name-or-path {run_dir / 'final'})")
    done = [name for name in ("summary.json", "results.jsonl") if (run_dir / name).exists()]
    if done and not overwrite:
        raise ValueError(f"{run_dir} already holds an evaluation ({', '.join(done)}): pass --overwrite to replace it, "
                         f"or --run.name to write elsewhere")


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
    run_dir = Path(cfg.run.runs_dir) / run_name(cfg)
    check_folder(run_dir, overwrite=cfg.overwrite)
    made = missing_folders(run_dir)
    lock = FolderLock(run_dir)
    lock.acquire()  # one writer: another evaluation, or a training run, of this folder is refused
    written = False
    try:
        check_folder(run_dir, overwrite=cfg.overwrite)  # again, now that no one else can write it
        result = _evaluate_into(cfg, run_dir)
        written = True
        return result
    finally:
        lock.release()
        if not written:  # a start that failed (or was interrupted) leaves no empty folder
            remove_unused_folders(made)


def _evaluate_into(cfg: EvaluateConfig, run_dir: Path) -> EvalResult:
    template = load_prompt(cfg.prompt)
    dataset = load_dataset(cfg.data)
    check_writable(run_dir)
    print(f"evaluating {cfg.model.name_or_path} on {len(dataset)} problems from {dataset.source}"
          + (f" ({dataset.skipped} skipped: empty answer)" if dataset.skipped else "")
          + (f", {cfg.samples_per_problem} samples each" if cfg.samples_per_problem > 1 else "")
          + f"; results in {run_dir}", flush=True)
    # Phase 1: sample and grade.
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed, training=False)
    dataset = questions_within_context(dataset, template, tokenizer, what="evaluation set", limit=prompt_token_limit(
        model, reserve=cfg.eval.max_tokens, max_prompt_tokens=cfg.data.max_prompt_tokens))

    def entropy(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return mean_token_entropies(model, tokenizer, prompts, responses, microbatch=cfg.entropy_microbatch,
                                    temperature=cfg.eval.temperature if cfg.eval.temperature > 0 else 1.0)

    try:
        result = evaluate(sampler, dataset, template=template, sampling=cfg.eval, grading=cfg.grading,
                          seed=cfg.run.seed, entropy=entropy if cfg.entropy_microbatch else None, progress=True,
                          samples_per_problem=cfg.samples_per_problem)
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
            data=DataConfig(path=shared_data("math/validation.jsonl"), limit=None),
            sampler=SamplerConfig(backend="vllm", placement="colocate", gpu_memory_utilization=0.85, sleep=False),
        ),
    ),
}


def main(argv: Sequence[str] | None = None) -> EvalResult:
    try:
        return run_cli(EvaluateConfig, PRESETS, main_with, description=__doc__.split("\n\n")[0], args=argv)
    except KeyboardInterrupt:  # Ctrl-C: nothing was written (results are written at the end), no traceback
        print("\ninterrupted: no results written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
