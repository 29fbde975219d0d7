"""Supervised fine-tuning on reasoning traces: ``python -m shell.sft``.

Phases per step: batch → microbatch forward/backward (gradient accumulation) → clip + AdamW →
log; every ``eval_every`` steps (and before the first update): sync weights into the sampler →
evaluate → log generations → curves; every ``checkpoint_every`` steps: atomic checkpoint.
``--resume`` continues from the last checkpoint as if the run had never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shell._train import (
    OptimConfig, autocast, restore_or_refuse, batch_indices, clip_and_step, finite_or_raise, make_optimizer, policy_log_probs,
    tokenize_batch, write_curves,
)
from shell.config import ModelConfig, RunConfig, SamplerConfig, asdict, run_cli
from shell.data import DataConfig, DataError, SFTExample, load_dataset, sft_examples_for
from shell.evaluate import EvalSettings, evaluate, log_generations
from shell.prompts import PromptName, load_prompt


@dataclass(frozen=True)
class SFTDataConfig(DataConfig):
    """SFT training pairs: where they come from, how many, and whether only correct ones are kept."""

    num_examples: int | None = None
    """Use a seeded random subset of this many training pairs (128/256/512/1024; None: all)."""
    filter_correct: bool = False
    """Keep only pairs whose response earns reward 1 against their ground truth; the kept size is printed."""


@dataclass(frozen=True)
class SFTConfig:
    """SFT of a policy on {prompt, response} pairs, with periodic held-out evaluation."""

    model: ModelConfig = ModelConfig()
    data: SFTDataConfig = SFTDataConfig(split="train")
    """Training pairs: an SFT jsonl ({prompt, response}), or MATH/GSM8K/embedded problems turned into
    r1_zero traces (solution inside <think>, then <answer>)."""
    eval_data: DataConfig = DataConfig(split="validation", limit=128)
    """Held-out problems for evaluation."""
    prompt: PromptName = "r1_zero"
    """Prompt template for traces made from problems and for evaluation."""
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)
    batch_size: int = 32
    """Examples per optimizer step."""
    gradient_accumulation_steps: int = 4
    """Microbatches per optimizer step (microbatch = batch_size / gradient_accumulation_steps)."""
    num_steps: int | None = None
    """Optimizer steps (None: epochs × examples / batch_size)."""
    epochs: float = 1.0
    """Passes over the training pairs when num_steps is None."""
    eval_every: int = 10
    """Evaluate every this many steps (and before the first update, and at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the run folder's last checkpoint."""
    log_generations: int = 8
    """Samples written to generations.jsonl at each evaluation."""
    eval: EvalSettings = EvalSettings()
    sampler: SamplerConfig = SamplerConfig()
    run: RunConfig = RunConfig(name="sft")


def check_config(cfg: SFTConfig) -> None:
    if cfg.batch_size % cfg.gradient_accumulation_steps:
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be divisible by gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        )
    if cfg.eval_every < 1:
        raise ValueError("eval_every must be >= 1")


def validate_sft_examples(examples: Sequence[SFTExample], prompt: str) -> None:
    """A response must follow the template: r1_zero responses close </think> and hold <answer> … </answer>."""
    if prompt != "r1_zero":
        return
    for i, ex in enumerate(examples):
        if "</think> <answer>" not in ex.response or "</answer>" not in ex.response:
            where = ex.where or f"example {i}"
            raise DataError(f"{where}: field 'response' does not follow the r1_zero template "
                            f"(needs '</think> <answer>' and '</answer>'): {ex.response[:80]!r}")


def load_sft_data(cfg: SFTConfig) -> list[SFTExample]:
    """The training pairs, subset and filtered as configured (raises DataError on bad input)."""
    examples = sft_examples_for(cfg.data, cfg.prompt)
    validate_sft_examples(examples, cfg.prompt)
    if cfg.data.num_examples is not None:
        g = torch.Generator().manual_seed(cfg.run.seed)
        perm = torch.randperm(len(examples), generator=g).tolist()
        examples = [examples[i] for i in perm[: cfg.data.num_examples]]
    if cfg.data.filter_correct:
        from shell.grading import grade_batch

        if any(ex.ground_truth is None for ex in examples):
            raise DataError("--data.filter-correct needs a ground truth (ground_truth or answer field) for every pair")
        scores, _ = grade_batch([ex.response for ex in examples], [ex.ground_truth for ex in examples],
                                reward_fn=load_prompt(cfg.prompt).reward_fn_name,
                                timeout_s=cfg.eval.grading_timeout_s, num_workers=cfg.eval.grading_workers)
        before = len(examples)
        examples = [ex for ex, s in zip(examples, scores) if s["reward"] == 1.0]
        print(f"filter-correct: kept {len(examples)} of {before} pairs")
        if not examples:
            raise DataError("no training pair survived --data.filter-correct")
    return examples


@dataclass
class SFTSettings:
    """What one SFT phase needs (also used by expert iteration)."""

    batch_size: int
    gradient_accumulation_steps: int
    optim: OptimConfig
    seed: int


def sft_update(
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step_fn: Callable[..., Any],
    batch: Sequence[SFTExample],
    settings: SFTSettings,
) -> dict[str, float]:
    """One optimizer step of SFT on ``batch`` (microbatched); returns train metrics."""
    device = next(model.parameters()).device
    k = settings.gradient_accumulation_steps
    micro = len(batch) // k
    # Microbatches of similar length pad less. The step's gradient does not depend on how the batch is
    # split: every microbatch has the same size and its loss is a mean over its examples divided by k.
    batch = sorted(batch, key=lambda e: len(e.prompt) + len(e.response))
    loss_sum, tokens, entropy_sum = 0.0, 0, 0.0
    model.train()
    for i in range(k):
        part = batch[i * micro : (i + 1) * micro]
        tb = tokenize_batch([e.prompt for e in part], [e.response for e in part], tokenizer, device)
        with autocast(model, settings.optim.autocast_bf16):
            out, mask, _ = policy_log_probs(model, tb, share_prompt_prefix=settings.optim.share_prompt_prefix,
                                            return_token_entropy=True, checkpoint_above_tokens=settings.optim.checkpoint_above_tokens)
            loss, _ = step_fn(out["log_probs"], mask, k)
        loss_sum += float(loss)
        n = int(mask.sum())
        tokens += n
        entropy_sum += float((out["token_entropy"] * mask).sum())
    norm = clip_and_step(model, optimizer, scheduler, settings.optim.max_grad_norm)
    return {
        "train/loss": finite_or_raise(loss_sum, "train loss"),
        "train/grad_norm": norm,
        "train/token_entropy": entropy_sum / max(tokens, 1),
        "train/response_tokens": tokens,
        "train/lr": scheduler.get_last_lr()[0],
    }


def _sft_step_fn(compile: bool) -> Callable[..., Any]:
    from shell import sft_microbatch_train_step

    if not compile:
        return lambda lp, mask, k: sft_microbatch_train_step(lp, mask, k)
    from core import sft_microbatch_loss

    loss_fn = torch.compile(lambda lp, mask, k: sft_microbatch_loss(lp, mask, gradient_accumulation_steps=k), dynamic=True)

    def step(lp, mask, k):
        loss = loss_fn(lp, mask, k)
        loss.backward()
        return loss.detach(), {}

    return step


def run_eval(
    *, sampler: Any, model: torch.nn.Module, eval_set: Any, template: Any, settings: EvalSettings, seed: int,
    step: int, logger: Any, run_dir: Path, n_log: int, prefix: str = "eval",
) -> dict[str, Any]:
    """Sync weights into the sampler, evaluate, log ``eval/…`` metrics and generations."""
    model.eval()
    sampler.load_weights(model)
    result = evaluate(sampler, eval_set, template=template, settings=settings, seed=seed)
    s = result.summary
    stats = log_generations(result.records, run_dir / "generations.jsonl", step=step, max_samples=n_log)
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
    }
    logger.log(metrics)
    print(f"[eval step {step}] answer {s['answer_reward']:.3f}  format {s['format_reward']:.3f}  "
          f"len {stats['mean_length'] or 0:.1f}  ({s['seconds']:.0f}s)", flush=True)
    return metrics


def train(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the run folder."""
    from shell.checkpoint import save_checkpoint, save_pretrained_atomic
    from shell.evaluate import build_sampler
    from shell.runlog import RunLogger

    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    examples = load_sft_data(cfg)
    eval_set = load_dataset(cfg.eval_data)
    num_steps = cfg.num_steps if cfg.num_steps is not None else max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    print(f"SFT: {len(examples)} pairs, {num_steps} steps of {cfg.batch_size}; eval on {len(eval_set)} held-out problems -> {run_dir}")

    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed)
    optimizer, scheduler = make_optimizer(model, cfg.optim)
    start, elapsed = restore_or_refuse(run_dir, resume=cfg.resume, model=model, optimizer=optimizer, scheduler=scheduler)
    logger = RunLogger(run_dir, logger=cfg.run.logger, config=asdict(cfg), resume_step=start if cfg.resume else None,
                       elapsed_offset=elapsed)
    settings = SFTSettings(cfg.batch_size, cfg.gradient_accumulation_steps, cfg.optim, cfg.run.seed)
    step_fn = _sft_step_fn(cfg.optim.compile)

    def eval_now(step: int) -> None:
        run_eval(sampler=sampler, model=model, eval_set=eval_set, template=template, settings=cfg.eval,
                 seed=cfg.run.seed + step, step=step, logger=logger, run_dir=run_dir, n_log=cfg.log_generations)
        write_curves(run_dir)

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        extra={"scheduler": scheduler.state_dict(), "elapsed": logger.elapsed},
                        keep_last=cfg.keep_checkpoints)

    try:
        if start == 0:
            eval_now(0)
        for step in range(start + 1, num_steps + 1):
            idx = batch_indices(len(examples), cfg.batch_size, step - 1, seed=cfg.run.seed)
            metrics = sft_update(model, tokenizer, optimizer, scheduler, step_fn, [examples[i] for i in idx], settings)
            logger.log({"train_step": step, **metrics})
            print(f"[train step {step}/{num_steps}] loss {metrics['train/loss']:.4f}  grad-norm {metrics['train/grad_norm']:.2f}", flush=True)
            if step % cfg.eval_every == 0 or step == num_steps:
                eval_now(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != num_steps:
                checkpoint(step)
        checkpoint(num_steps)
        save_pretrained_atomic(model, tokenizer, run_dir / "final")
        write_curves(run_dir)
    finally:
        logger.close()
        sampler.close()
    print(f"done: {run_dir / 'metrics.jsonl'}, {run_dir / 'curves.png'}, {run_dir / 'final'}")
    return run_dir


PRESETS: dict[str, tuple[str, SFTConfig]] = {
    "laptop": (
        "CPU, minutes: SmolLM2-135M-Instruct on r1_zero traces of the embedded arithmetic task",
        SFTConfig(
            num_steps=24, batch_size=16, gradient_accumulation_steps=2, eval_every=8,
            optim=OptimConfig(lr=3e-5, share_prompt_prefix=True),
            eval=EvalSettings(max_tokens=64),
            run=RunConfig(name="sft_laptop"),
        ),
    ),
    "h100": (
        "GPU: Qwen2.5-Math-1.5B on MATH SFT traces (lr 2e-5, batch 64 in microbatches of 2, bf16), vLLM eval on 5K validation",
        SFTConfig(
            model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
            data=SFTDataConfig(path="data/sft_math.jsonl"),
            eval_data=DataConfig(path="../shared/data/math/validation.jsonl"),
            batch_size=64, gradient_accumulation_steps=32, epochs=2.0, eval_every=25, checkpoint_every=100,
            optim=OptimConfig(lr=2e-5, warmup_steps=10, compile=True),
            sampler=SamplerConfig(backend="vllm", gpu_memory_utilization=0.3),
            run=RunConfig(name="sft_math"),
        ),
    ),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(SFTConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
