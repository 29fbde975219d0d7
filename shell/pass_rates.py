"""Pass-rate estimation: ``python -m shell.pass_rates``.

Samples ``--samples-per-problem k`` responses per problem of a data set (``--data.*`` as in the loops) with a
model (``--model.*``, the HF or vLLM sampler; each sample's noise a function of ``(--seed, problem, sample)``),
grades them with the prompt's reward function and writes ``--output FILE.jsonl``: every input record (an
embedded-task problem as ``example_record``) with ``pass_rate`` (= ``num_correct / num_samples``),
``num_samples`` and ``num_correct`` added, in the data set's order. ``--keep-min p --keep-max q`` writes only the
records whose pass rate lies in ``[p, q]`` (all of them then go to ``FILE.all.jsonl``). The output loads back
with ``--data.path FILE.jsonl`` (``--data.curriculum pass-rate`` reads its ``pass_rate``).

As it goes, each chunk of ``--chunk-problems`` graded problems is appended to ``FILE.jsonl.partial``;
``--resume`` continues from there after an interruption. At the end the histogram of the pass rates is drawn to
``FILE.png``. Under torchrun every rank samples and grades its share of each chunk; rank 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shell.config import (
    GradingConfig, ModelConfig, SamplerConfig, SamplingConfig, at_least, check_parts, require, run_cli,
)
from shell.data import (
    MATH_PASS_RATES, DataConfig, DataError, Dataset, example_record, load_dataset, questions_within_context, read_jsonl, resolve_data_path,
)
from shell.world import barrier, close_world, from_main, init_world, is_main
from shell.files import atomic_write_jsonl, fsync_dir
from shell.models import prompt_token_limit
from shell.progress import say
from shell.prompts import PromptName, load_prompt
from shell.rollout import grade, rollout
from shell.sampling import build_sampler
from shell.seeds import derive_seed

__all__ = ["PassRatesConfig", "in_band", "main", "main_with", "partial_path", "read_partial", "with_pass_rate"]


@dataclass(frozen=True)
class PassRatesConfig:
    """Estimate each problem's pass rate under a model and write the records with it."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="train")
    """The problems: the embedded task (path None), a MATH/GSM8K jsonl, or a file this tool wrote."""
    prompt: PromptName = "r1_zero"
    """Prompt template; its reward function grades the samples (a sample passes at reward 1)."""
    output: str = "pass_rates.jsonl"
    """The records with pass_rate, num_samples and num_correct added; the histogram goes beside it (.png)."""
    samples_per_problem: int = 8
    """k: responses sampled per problem."""
    keep_min: float = 0.0
    """Write only records whose pass rate is >= this (with --keep-max: e.g. 0.2 and 0.8, the problems the model
    solves sometimes)."""
    keep_max: float = 1.0
    """Write only records whose pass rate is <= this."""
    resume: bool = False
    """Continue an interrupted job from OUTPUT.partial (the chunks already graded)."""
    chunk_problems: int = 64
    """Problems sampled, graded and appended at a time."""
    sampling: SamplingConfig = SamplingConfig(min_tokens=4, max_tokens=64)
    """How each response is drawn (as the RL loop's rollouts: T 1, top-p 1)."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    """Seeds every sample's noise."""


def check_config(cfg: PassRatesConfig) -> None:
    """Every flag's range, before anything loads; each message names the flag."""
    at_least(cfg.samples_per_problem, 1, "--samples-per-problem")
    at_least(cfg.chunk_problems, 1, "--chunk-problems")
    for name in ("keep_min", "keep_max"):
        value = getattr(cfg, name)
        require(0.0 <= value <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
    require(cfg.keep_min <= cfg.keep_max, f"--keep-min ({cfg.keep_min}) must be <= --keep-max ({cfg.keep_max})")
    require(cfg.output.endswith(".jsonl"), f"--output must name a .jsonl file, got {cfg.output!r}")
    check_parts(cfg, trains=())


def partial_path(output: Path) -> Path:
    """Where the graded records accumulate until the job ends: ``OUTPUT.partial``."""
    return output.with_name(output.name + ".partial")


def in_band(record: dict[str, Any], *, low: float, high: float) -> bool:
    """Does the record's ``pass_rate`` lie in ``[low, high]`` (both ends included)?"""
    return low <= record["pass_rate"] <= high


def with_pass_rate(record: dict[str, Any], rewards: Sequence[float]) -> dict[str, Any]:
    """``record`` with ``num_samples`` (``len(rewards)``), ``num_correct`` (rewards of 1) and ``pass_rate`` (their
    ratio) added (replacing any it had)."""
    correct = sum(1 for r in rewards if r == 1.0)
    return {**record, "pass_rate": correct / len(rewards), "num_samples": len(rewards), "num_correct": correct}


def input_records(cfg: DataConfig, dataset: Dataset) -> list[dict[str, Any]]:
    """The record each problem of ``dataset`` came from: its jsonl line as read, or an embedded problem's
    ``example_record``."""
    if cfg.path is None or cfg.path == "embedded":
        return [example_record(ex) for ex in dataset]
    lines = dict(read_jsonl(resolve_data_path(cfg.path, cfg.split)))
    return [lines[ex.meta["line"]] for ex in dataset]


def read_partial(path: Path, records: Sequence[dict[str, Any]], *, samples: int) -> list[dict[str, Any]]:
    """The graded records an interrupted job left in ``path``, checked against the job's own: the i-th must be the
    i-th input record graded with ``samples`` samples (``DataError`` naming the line otherwise); a torn last line
    (the job killed mid-write) is dropped (the job rewrites the file without it before appending)."""
    if path.read_bytes()[-1:] not in (b"", b"\n"):
        print(f"{path}: dropping a torn last line", flush=True)
    done: list[dict[str, Any]] = []
    for lineno, rec in read_jsonl(path, complete_lines_only=True):
        j = len(done)
        if j >= len(records):
            raise DataError(f"{path}:{lineno}: more graded records than the data set has ({len(records)})")
        expected = {k: v for k, v in records[j].items() if k not in ("pass_rate", "num_samples", "num_correct")}
        if {k: rec.get(k) for k in expected} != expected:
            raise DataError(f"{path}:{lineno}: not problem {j + 1} of this data set (other --data flags?); "
                            "remove the file to start over")
        if rec.get("num_samples") != samples:
            raise DataError(f"{path}:{lineno}: graded with num_samples {rec.get('num_samples')}, not "
                            f"--samples-per-problem {samples}")
        done.append(rec)
    return done


def draw_histogram(records: Sequence[dict[str, Any]], out: Path, *, low: float, high: float, samples: int) -> Path:
    """The pass rates' histogram (one bar per attainable value j / k), the kept band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shell.runlog import save_figure

    counts = [0] * (samples + 1)
    for r in records:
        counts[r["num_correct"]] += 1
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [j / samples for j in range(samples + 1)]
    ax.bar(xs, counts, width=0.8 / samples, color="tab:blue")
    if (low, high) != (0.0, 1.0):
        ax.axvspan(low - 0.4 / samples, high + 0.4 / samples, color="tab:green", alpha=0.15, label=f"kept [{low:g}, {high:g}]")
        ax.legend()
    ax.set_xlabel(f"pass rate ({samples} samples per problem)")
    ax.set_ylabel("problems")
    ax.set_title(f"{len(records)} problems, mean pass rate "
                 f"{sum(r['pass_rate'] for r in records) / max(1, len(records)):.3f}")
    return save_figure(fig, out, dpi=120)


def main_with(cfg: PassRatesConfig) -> Path:
    """Estimate, append, then write the (filtered) output and its histogram; returns the output path."""
    # Phase 0: flags, prompt, data and the output's folder, before the model loads.
    check_config(cfg)
    output = Path(cfg.output).expanduser()
    partial = partial_path(output)
    template = load_prompt(cfg.prompt)
    dataset = load_dataset(cfg.data)
    records = input_records(cfg.data, dataset)
    if partial.exists() and not cfg.resume:
        raise ValueError(f"{partial} exists (an interrupted job): --resume continues it, or remove it to start over")
    done = read_partial(partial, records, samples=cfg.samples_per_problem) if cfg.resume and partial.exists() else []
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--output: cannot write to {output.parent}: {e.strerror or e}") from None
    init_world()
    try:
        return _estimate(cfg, output, partial, template, dataset, records, done)
    finally:
        close_world()


def _estimate(cfg: PassRatesConfig, output: Path, partial: Path, template: Any, dataset: Dataset,
              records: list[dict[str, Any]], done: list[dict[str, Any]]) -> Path:
    k = cfg.samples_per_problem
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.seed, training=False)
    try:
        limit = prompt_token_limit(model, reserve=cfg.sampling.max_tokens, max_prompt_tokens=cfg.data.max_prompt_tokens)
        fits = questions_within_context(dataset, template, tokenizer, what="problems", limit=limit)
        if len(fits) < len(dataset):  # the records of the problems that fit, in order
            kept = {id(ex) for ex in fits}
            records = [r for r, ex in zip(records, dataset) if id(ex) in kept]
            if done:  # check the graded ones against the problems that fit
                done = read_partial(partial, records, samples=k)
        if done:
            say(f"--resume: {len(done)} of {len(records)} problems already graded in {partial}")
        say(f"pass rates: {len(records)} problems × {k} samples with {cfg.model.name_or_path} from {fits.source}")
        if is_main():  # exactly the checked records: a torn last line must not stay in front of the appended ones
            atomic_write_jsonl(partial, done)
        for start in range(len(done), len(records), cfg.chunk_problems):
            idx = list(range(start, min(len(records), start + cfg.chunk_problems)))
            batch = rollout(sampler, [fits[i] for i in idx], template, cfg.sampling, group_size=k,
                            seed=derive_seed(cfg.seed, "pass-rate"), keys=idx)
            scores, _ = grade(batch, template, cfg.grading)
            graded = [with_pass_rate(records[i], [s["reward"] for s in scores[j * k : (j + 1) * k]])
                      for j, i in enumerate(idx)]
            if is_main():
                with open(partial, "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in graded)
                    f.flush()
                    os.fsync(f.fileno())
            done += graded
            mean = sum(r["pass_rate"] for r in done) / len(done)
            say(f"[pass rates] {len(done)}/{len(records)} problems, mean pass rate {mean:.3f}")
    finally:
        sampler.close()
    # The output (filtered), the histogram; the partial file goes.
    if is_main():
        kept = [r for r in done if in_band(r, low=cfg.keep_min, high=cfg.keep_max)]
        atomic_write_jsonl(output, kept)
        banded = (cfg.keep_min, cfg.keep_max) != (0.0, 1.0)
        if banded:
            atomic_write_jsonl(output.with_name(output.name[: -len(".jsonl")] + ".all.jsonl"), done)
        png = draw_histogram(done, output.with_suffix(".png"), low=cfg.keep_min, high=cfg.keep_max, samples=k)
        partial.unlink()
        fsync_dir(output.parent)
        band = f" with pass rate in [{cfg.keep_min:g}, {cfg.keep_max:g}]" if banded else ""
        say(f"kept {len(kept)} of {len(done)} problems{band}; wrote {output} and {png}"
            + (f" (all {len(done)}: {output.name[: -len('.jsonl')]}.all.jsonl)" if banded else ""))
    barrier()
    return from_main(output)


PRESETS: dict[str, tuple[str, PassRatesConfig]] = {
    "laptop": ("CPU: SmolLM2-135M-Instruct (or --model.name-or-path) on the embedded task, 8 samples of <= 64 tokens",
               PassRatesConfig()),
    "h100": (
        "GPU: Qwen2.5-Math-1.5B on MATH train through vLLM (colocated at 0.85), 8 samples of <= 1024 tokens",
        PassRatesConfig(
            model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
            data=DataConfig(path="../shared/data/math/train.jsonl"),
            output=MATH_PASS_RATES, chunk_problems=1024,
            sampling=SamplingConfig(min_tokens=4, max_tokens=1024),
            sampler=SamplerConfig(backend="vllm", placement="colocate", gpu_memory_utilization=0.85, sleep=False),
        ),
    ),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(PassRatesConfig, PRESETS, main_with, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
