"""Supervised fine-tuning on reasoning traces: ``python -m shell.sft``.

Phases per step: batch → microbatch forward/backward (gradient accumulation; the compiled step with
``--optim.compile``) → clip + AdamW → log; every ``--eval-every`` steps (and before the first update):
sync weights into the sampler → evaluate → log generations → curves; every ``--checkpoint-every`` steps:
atomic checkpoint. ``--resume`` continues from the last checkpoint as if the run had never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import tyro

from shell.config import (
    GradingConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, SamplingConfig, at_least, check_parts,
    require, run_cli,
)
from shell.data import (
    DataConfig, DataError, DataFileNotFoundError, HeldOutConfig, SFTExample, held_out_config, keep_within_context,
    load_dataset, questions_within_context, sft_examples_for, shared_data,
)
from shell.world import require_world_multiple
from shell.models import prompt_token_limit
from shell.evaluation import run_eval
from shell.grading import grade_batch
from shell.lora import LoraConfig, apply_lora, parameter_counts
from shell.loop import Run, write_curves
from shell.progress import say
from shell.fingerprint import records_fingerprint
from shell.prompts import PromptName, load_prompt
from shell.sampling import build_sampler
from shell.seeds import batch_indices, derive_seed, seeded_permutation
from shell.update import Learner, response_entropies, sft_update


@dataclass(frozen=True)
class SFTDataConfig(DataConfig):
    """SFT training pairs: where they come from, how many, and whether only correct ones are kept."""

    num_examples: int | None = None
    """Use a random subset of this many training pairs, seeded by --data.seed (128/256/512/1024; None: all)."""
    filter_correct: bool = False
    """Keep only pairs whose response earns reward 1 against their ground truth; the kept size is printed."""

    def check(self, prefix: str = "data") -> None:
        """:meth:`DataConfig.check`; a missing file is named with the command that makes SFT traces."""
        try:
            super().check(prefix)
        except DataFileNotFoundError as e:
            raise DataFileNotFoundError(
                f"{e}; make r1_zero traces from MATH with: python -m shell.make_sft_data --input "
                f"{shared_data('math/train.jsonl')} --output {self.path}") from None


@dataclass(frozen=True)
class SFTConfig:
    """SFT of a policy on {prompt, response} pairs, with periodic held-out evaluation."""

    model: ModelConfig = ModelConfig()
    data: SFTDataConfig = SFTDataConfig(split="train")
    """Training pairs: an SFT jsonl ({prompt, response}), or MATH/GSM8K/embedded problems turned into
    r1_zero traces (solution inside <think>, then <answer>)."""
    eval_data: HeldOutConfig = HeldOutConfig()
    """Held-out problems for evaluation (by default the validation split that goes with --data)."""
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
    loop: Annotated[LoopConfig, tyro.conf.OmitArgPrefixes] = LoopConfig(eval_every=10)
    eval: SamplingConfig = SamplingConfig()
    """How held-out responses are sampled."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    lora: LoraConfig = LoraConfig()
    """LoRA adapters (peft) instead of training every weight (--lora.rank 0: off)."""
    run: RunConfig = RunConfig(name="sft")


def check_config(cfg: SFTConfig) -> None:
    """Every flag's range and the sizes that must divide, before anything loads; each message names the flag."""
    at_least(cfg.batch_size, 1, "--batch-size")
    at_least(cfg.gradient_accumulation_steps, 1, "--gradient-accumulation-steps")
    at_least(cfg.num_steps, 1, "--num-steps", optional=True)
    require(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    require(cfg.batch_size % cfg.gradient_accumulation_steps == 0,
            f"--batch-size ({cfg.batch_size}) must be divisible by --gradient-accumulation-steps ({cfg.gradient_accumulation_steps})")
    require_world_multiple(cfg.gradient_accumulation_steps, "--gradient-accumulation-steps")
    at_least(cfg.data.num_examples, 1, "--data.num-examples", optional=True)
    check_parts(cfg, trains=())


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
        perm = seeded_permutation(len(examples), derive_seed(cfg.data.seed, "num-examples"))
        examples = [examples[i] for i in perm[: cfg.data.num_examples]]
    if cfg.data.filter_correct:
        if any(ex.ground_truth is None for ex in examples):
            raise DataError("--data.filter-correct needs a ground truth (ground_truth or answer field) for every pair")
        scores, _ = grade_batch([ex.response for ex in examples], [ex.ground_truth for ex in examples],
                                reward_fn=load_prompt(cfg.prompt).reward_fn_name,
                                timeout_s=cfg.grading.timeout_s, num_workers=cfg.grading.workers)
        before = len(examples)
        examples = [ex for ex, s in zip(examples, scores) if s["reward"] == 1.0]
        say(f"filter-correct: kept {len(examples)} of {before} pairs")
        if not examples:
            raise DataError("no training pair survived --data.filter-correct")
    return examples


def train(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the run folder."""
    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    examples = load_sft_data(cfg)
    require(cfg.batch_size <= len(examples),
            f"--batch-size ({cfg.batch_size}) is larger than the training data ({len(examples)} pairs): every step would "
            f"repeat pairs within its batch; use at most {len(examples)} (or more data)")
    held_cfg, held_note = held_out_config(cfg.data, cfg.eval_data)
    eval_set = load_dataset(held_cfg)
    num_steps = cfg.num_steps if cfg.num_steps is not None else max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    say(f"SFT: {len(examples)} pairs, {num_steps} steps of {cfg.batch_size}; {held_note} ({len(eval_set)} problems)")

    # Phase 1: the run folder (lock, guard, config checks), then the policy, the sampler, resume.
    fingerprints = {"train": records_fingerprint(examples), "held_out": records_fingerprint(eval_set)}
    with Run(cfg, total_steps=num_steps, plot=write_curves, fingerprints=fingerprints) as run:
        model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed, training=True)
        examples = keep_within_context(examples, [e.prompt + e.response for e in examples], tokenizer, what="training pairs",
                                       limit=prompt_token_limit(model, reserve=0, max_prompt_tokens=None))
        eval_set = questions_within_context(eval_set, template, tokenizer, what="held-out set", limit=prompt_token_limit(
            model, reserve=cfg.eval.max_tokens, max_prompt_tokens=cfg.data.max_prompt_tokens))
        model = apply_lora(model, cfg.lora)  # after the sampler's generation copy: that copy stays a plain model
        learner = Learner(model, tokenizer, cfg.optim)
        run.begin(learner, closing=[sampler.close])
        if not run.resumed:
            run.log(parameter_counts(model))  # the first record: what trains (no step: kept by every resume)
        micro = max(1, cfg.batch_size // cfg.gradient_accumulation_steps)

        def entropy(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:  # at the evaluation temperature
            return response_entropies(learner, prompts, responses, microbatch=micro,
                                      temperature=cfg.eval.temperature if cfg.eval.temperature > 0 else 1.0)

        def evaluate_now(step: int) -> None:
            sampler.load_weights(model)
            run_eval(run, sampler, model, eval_set, template=template, sampling=cfg.eval, grading=cfg.grading,
                     step=step, entropy=entropy)
            sampler.sleep()  # a colocated vLLM frees its KV cache while the policy trains

        if run.start == 0:
            evaluate_now(0)
        for step in run.steps():
            # Train: one optimizer step on the next batch of pairs.
            idx = batch_indices(len(examples), cfg.batch_size, step - 1, seed=cfg.run.seed)
            metrics = sft_update(learner, [examples[i] for i in idx], gradient_accumulation_steps=cfg.gradient_accumulation_steps)
            # Log, evaluate, checkpoint.
            run.log({"train_step": step, **metrics})
            run.say(f"[train step {step}/{num_steps}] loss {metrics['train/loss']:.4f}  grad-norm {metrics['train/grad_norm']:.2f}")
            if run.eval_due(step):
                evaluate_now(step)
            run.checkpoint_if_due(step)
        return run.finish()


def _h100(*, num_examples: int | None = None, filter_correct: bool = False, name: str = "sft_math",
          sampler: SamplerConfig = SamplerConfig(backend="vllm", placement="colocate")) -> SFTConfig:
    """The GPU SFT run (Qwen2.5-Math-1.5B on MATH traces), and its sweeps by the number of traces and filtering."""
    return SFTConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=SFTDataConfig(path="data/sft_math.jsonl", num_examples=num_examples, filter_correct=filter_correct),
        eval_data=HeldOutConfig(path=shared_data("math/validation.jsonl"), limit=None),
        batch_size=64, gradient_accumulation_steps=32, epochs=2.0,
        loop=LoopConfig(eval_every=25, checkpoint_every=100),
        optim=OptimConfig(lr=2e-5, warmup_steps=10, compile=True),
        sampler=sampler,
        run=RunConfig(name=name),
    )


PRESETS: dict[str, tuple[str, SFTConfig]] = {
    "laptop": (
        "CPU, minutes: SmolLM2-135M-Instruct on r1_zero traces of the embedded arithmetic task",
        SFTConfig(
            num_steps=24, batch_size=16, gradient_accumulation_steps=2, loop=LoopConfig(eval_every=8, keep_checkpoints=1),
            optim=OptimConfig(lr=3e-5, share_prompt_prefix=True),
            eval=SamplingConfig(max_tokens=64),
            run=RunConfig(name="sft_laptop"),
        ),
    ),
    "laptop-lora": (
        "CPU, minutes: the laptop run with LoRA (rank 16, alpha 32 on the attention and MLP projections; lr 3e-4, "
        "10x the full fine-tuning lr as in \"LoRA without regret\")",
        SFTConfig(
            num_steps=24, batch_size=16, gradient_accumulation_steps=2, loop=LoopConfig(eval_every=8, keep_checkpoints=1),
            optim=OptimConfig(lr=3e-4, share_prompt_prefix=True),
            eval=SamplingConfig(max_tokens=64), lora=LoraConfig(rank=16, alpha=32.0),
            run=RunConfig(name="sft_laptop_lora"),
        ),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on every MATH SFT trace (lr 2e-5, batch 64 in microbatches of 2, float32 "
             "master weights + bf16 autocast, 2 epochs); vLLM eval on 5K validation, colocated at 0.3", _h100()),
    "h100x2": ("2 GPUs: the h100 run with vLLM on a GPU of its own (cuda:1, 0.85), the course's set-up",
               _h100(sampler=SamplerConfig(backend="vllm", placement="dedicated"), name="sft_math_h100x2")),
    **{f"size-{n}": (f"the dataset-size sweep: {n} unique traces (seeded subset), else as h100 (2 epochs: "
                     f"{max(1, math.ceil(2 * n / 64))} steps)", _h100(num_examples=n, name=f"sft_math_n{n}"))
       for n in (128, 256, 512, 1024)},
    "size-full": ("the dataset-size sweep: every trace (as h100)", _h100(name="sft_math_full")),
    "filtered": ("filtered SFT: only the traces whose answer is correct (the kept size is printed), else as h100",
                 _h100(filter_correct=True, name="sft_math_filtered")),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(SFTConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
