"""GRPO (Algorithm 3 of the handout): ``python -m shell.grpo``.

Phases per GRPO step: sample questions → rollout G responses each from the old policy → score them
(batch grader, group-normalised advantages) → train: (off-policy: old log-probs once, under inference
mode) epochs × train batches × microbatches, clip + AdamW per train batch → log → sync the new weights
into the sampler. Every ``--eval-every`` steps (and at step 0, before the first update) the held-out set
is evaluated; ``--resume`` continues exactly from the last checkpoint. An optional SFT warm start
(``--warm-start-steps``) runs first and writes ``warm_start_metrics.jsonl``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import tyro

from core import LengthNormalization, LossType, nonconstant_group_mask
from shell.config import (
    GradingConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, SamplingConfig, WarmStartConfig,
    run_cli,
)
from shell.data import DataConfig, HeldOutConfig, held_out_config, load_dataset, make_sft_examples
from shell.evaluation import run_eval
from shell.loop import Run, write_curves
from shell.prompts import PromptName, load_prompt
from shell.rollout import Rollouts, grade, group_advantages, rollout
from shell.sampling import build_sampler
from shell.seeds import batch_indices, derive_seed
from shell.update import Learner, PolicyGradientSettings, Reference, grpo_update, response_entropies, warm_start


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO on verified math rewards."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="train")
    """Questions for rollouts (the embedded task, or MATH train.jsonl)."""
    eval_data: HeldOutConfig = HeldOutConfig()
    """Held-out problems for validation (by default the validation split that goes with --data)."""
    prompt: PromptName = "r1_zero"
    """r1_zero (r1_zero_reward_fn) or question_only (question_only_reward_fn)."""
    n_grpo_steps: int = 200
    """GRPO steps (rollout batches)."""
    optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0, beta1=0.9, beta2=0.95)
    advantage_eps: float = 1e-6
    """Added to the group std."""
    rollout_batch_size: int = 256
    """Responses per rollout batch (questions × group_size)."""
    group_size: int = 8
    """Responses per question (G)."""
    sampling: SamplingConfig = SamplingConfig(min_tokens=4)
    """How rollouts are sampled; sampling.max_tokens is also the masked_normalize constant."""
    epochs_per_rollout_batch: int = 1
    """Passes over each rollout batch (> 1 is off-policy)."""
    train_batch_size: int = 256
    """Responses per optimizer step (< rollout_batch_size is off-policy)."""
    gradient_accumulation_steps: int = 128
    """Microbatches per optimizer step."""
    loss_type: LossType = "reinforce_with_baseline"
    """no_baseline, reinforce_with_baseline, grpo_clip or grpo_no_clip."""
    use_std_normalization: bool = True
    """Divide advantages by the group std."""
    length_normalization: LengthNormalization = "masked_mean"
    """masked_mean (per-response mean over its tokens), masked_normalize (sum / sampling.max_tokens, Dr. GRPO)
    or token_mean (sum over the train batch's response tokens / their number, DAPO)."""
    cliprange: float = 0.2
    """grpo_clip's epsilon (the lower side, and the upper side unless --cliprange-high)."""
    cliprange_high: float | None = None
    """grpo_clip's upper epsilon (DAPO's clip-higher, e.g. 0.28); None: --cliprange."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to a frozen copy of the starting policy (0: off, no reference loaded)."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each token's loss by min(exp(old - sampler log-prob), cap),
    correcting the sampler/trainer mismatch (0: off; the mismatch is logged either way)."""
    dynamic_sampling: bool = False
    """Keep only groups whose rewards differ (DAPO): sample more questions until the rollout batch is full
    or --max-sampling-rounds is reached (then fill it with constant groups, which carry no signal)."""
    max_sampling_rounds: int = 3
    """Rounds of sampling per step with --dynamic-sampling."""
    mask_truncated: bool = False
    """Responses that hit --sampling.max-tokens without the stop string get no loss (DAPO's overlong filtering)."""
    warm_start: WarmStartConfig = WarmStartConfig()
    loop: Annotated[LoopConfig, tyro.conf.OmitArgPrefixes] = LoopConfig(eval_every=10)
    eval: SamplingConfig = SamplingConfig()
    """How held-out responses are sampled."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    run: RunConfig = RunConfig(name="grpo")


def check_config(cfg: GRPOConfig) -> None:
    """Clear messages for inconsistent batch sizes."""
    if cfg.rollout_batch_size % cfg.group_size:
        raise ValueError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be divisible by group_size ({cfg.group_size})")
    if cfg.train_batch_size % cfg.gradient_accumulation_steps:
        raise ValueError(f"train_batch_size ({cfg.train_batch_size}) must be divisible by "
                         f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps})")
    if cfg.train_batch_size < cfg.group_size:
        raise ValueError(f"train_batch_size ({cfg.train_batch_size}) must be >= group_size ({cfg.group_size})")
    if cfg.rollout_batch_size % cfg.train_batch_size:
        raise ValueError(f"rollout_batch_size ({cfg.rollout_batch_size}) must be divisible by train_batch_size ({cfg.train_batch_size})")
    if cfg.use_std_normalization and cfg.group_size < 2:
        raise ValueError("use_std_normalization needs group_size >= 2")
    if cfg.loop.eval_every < 1:
        raise ValueError("eval_every must be >= 1")
    if cfg.kl_coef < 0 or cfg.tis_cap < 0:
        raise ValueError(f"kl_coef ({cfg.kl_coef}) and tis_cap ({cfg.tis_cap}) must be >= 0")
    if cfg.max_sampling_rounds < 1:
        raise ValueError(f"max_sampling_rounds must be >= 1, got {cfg.max_sampling_rounds}")


def pg_settings(cfg: GRPOConfig) -> PolicyGradientSettings:
    """The policy-gradient update's settings from GRPO's flags."""
    return PolicyGradientSettings(
        loss_type=cfg.loss_type, group_size=cfg.group_size, train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, epochs_per_rollout_batch=cfg.epochs_per_rollout_batch,
        cliprange=cfg.cliprange, cliprange_high=cfg.cliprange_high, length_normalization=cfg.length_normalization,
        normalize_constant=float(cfg.sampling.max_tokens), kl_coef=cfg.kl_coef, tis_cap=cfg.tis_cap,
        mask_truncated=cfg.mask_truncated,
    )


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run folder."""
    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    train_set = load_dataset(cfg.data)
    held_cfg, held_note = held_out_config(cfg.data, cfg.eval_data)
    eval_set = load_dataset(held_cfg)
    warm_examples = make_sft_examples(train_set, template) if cfg.warm_start.steps > 0 else []
    if cfg.warm_start.steps > 0 and not cfg.loop.resume and not warm_examples:
        raise ValueError("warm start: the training data has no solutions to make SFT traces from")
    settings = pg_settings(cfg)
    n_questions = cfg.rollout_batch_size // cfg.group_size
    print(f"GRPO: {cfg.n_grpo_steps} steps × {n_questions} questions × G={cfg.group_size}, loss {cfg.loss_type}, "
          f"{'off' if settings.off_policy(cfg.rollout_batch_size) else 'on'}-policy; {held_note} ({len(eval_set)} problems)",
          flush=True)

    # Phase 1: policy, sampler, run (resume).
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed)
    learner = Learner(model, tokenizer, cfg.optim)
    micro = max(1, cfg.train_batch_size // cfg.gradient_accumulation_steps)

    def entropy(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return response_entropies(learner, prompts, responses, microbatch=micro)

    def plot(run_dir: Path) -> None:
        write_curves(run_dir, extra_panels=[("train/reward", "train_step")])

    def rollout_and_score(step: int) -> tuple[Rollouts, list[dict[str, float]], dict[str, float]]:
        """n_questions × G graded responses; with --dynamic-sampling, rounds of fresh questions until as many
        groups with differing rewards are found (or the rounds run out: constant groups fill the batch)."""
        kept, spare, scores, spare_scores = Rollouts(), Rollouts(), [], []
        info = {"rounds": 0, "groups": 0, "nonconstant": 0, "timeouts": 0.0}
        while len(kept) < cfg.rollout_batch_size and info["rounds"] < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            r = info["rounds"]
            idx = (batch_indices(len(train_set), n_questions, step - 1, seed=cfg.run.seed) if r == 0 else
                   batch_indices(len(train_set), n_questions, (step - 1) * cfg.max_sampling_rounds + r, seed=cfg.run.seed,
                                 stream="dynamic-sampling"))
            model.eval()
            batch = rollout(sampler, [train_set[i] for i in idx], template, cfg.sampling, group_size=cfg.group_size,
                            seed=derive_seed(cfg.run.seed, "rollout", step, r), keys=idx)
            batch_scores, grading = grade(batch, template, cfg.grading)
            info["rounds"] += 1
            info["groups"] += n_questions
            info["timeouts"] += float(grading.get("timeouts", 0))
            useful = nonconstant_group_mask(torch.tensor([x["reward"] for x in batch_scores]), group_size=cfg.group_size)
            info["nonconstant"] += int(useful.sum()) // cfg.group_size
            if not cfg.dynamic_sampling:
                useful = torch.ones_like(useful)
            take = [i for i in range(len(batch)) if useful[i]][: cfg.rollout_batch_size - len(kept)]
            rest = [i for i in range(len(batch)) if not useful[i]]
            kept.extend(batch.select(take))
            scores += [batch_scores[i] for i in take]
            spare.extend(batch.select(rest))
            spare_scores += [batch_scores[i] for i in rest]
        fill = cfg.rollout_batch_size - len(kept)
        kept.extend(spare.select(range(fill)))
        scores += spare_scores[:fill]
        return kept, scores, info

    with Run(cfg, learner, total_steps=cfg.n_grpo_steps, closing=[sampler.close], plot=plot) as run:
        reference: Reference | None = None

        def evaluate_now(step: int) -> None:
            run_eval(run, sampler, model, eval_set, template=template, sampling=cfg.eval, grading=cfg.grading,
                     step=step, entropy=entropy)

        if run.start == 0:
            warm_start(learner, warm_examples, cfg.warm_start, seed=cfg.run.seed, run_dir=run.dir)
            if cfg.kl_coef > 0:
                reference = Reference.of(learner)
                reference.save(run.dir / "reference")
            evaluate_now(0)
        else:
            if cfg.kl_coef > 0:
                if not (run.dir / "reference").is_dir():
                    raise ValueError(f"--kl-coef {cfg.kl_coef}: {run.dir / 'reference'} is missing (the run began without a KL reference)")
                reference = Reference.load(run.dir / "reference", learner)
            sampler.load_weights(model)
        for step in run.steps():
            # Rollout and score: n_questions × G graded responses from the current (old) policy.
            rollouts, scores, info = rollout_and_score(step)
            rollouts.fill_entropies(entropy)
            raw, advantages, stats = group_advantages(scores, group_size=cfg.group_size, advantage_eps=cfg.advantage_eps,
                                                      normalize_by_std=cfg.use_std_normalization)
            # Train: epochs × train batches of policy-gradient steps.
            updates = grpo_update(learner, rollouts, raw, advantages, settings,
                                  seed=derive_seed(cfg.run.seed, "update", step), reference=reference)
            # Log, sync, evaluate, checkpoint.
            common = {
                "train_step": step,
                "train/reward": stats["reward_mean"],
                "train/format_reward": stats["format_reward_mean"],
                "train/answer_reward": stats["answer_reward_mean"],
                "train/reward_std": stats["reward_std"],
                "train/zero_variance_group_fraction": stats["zero_variance_group_fraction"],
                "train/response_length": statistics.fmean(rollouts.num_tokens),
                "train/rollout_entropy": rollouts.mean_entropy,
                "train/grading_timeouts": info["timeouts"],
            }
            if cfg.dynamic_sampling:
                common["train/sampling_rounds"] = info["rounds"]
                common["train/kept_group_fraction"] = info["nonconstant"] / info["groups"]
            for i, u in enumerate(updates):
                run.log({**common, "train/optimizer_step": (step - 1) * len(updates) + i + 1, **u})
            run.say(f"[grpo step {step}/{cfg.n_grpo_steps}] reward {stats['reward_mean']:.3f}  format "
                    f"{stats['format_reward_mean']:.3f}  zero-var {stats['zero_variance_group_fraction']:.2f}  "
                    f"len {common['train/response_length']:.1f}  loss {updates[-1]['train/loss']:.4f}"
                    + (f"  rounds {info['rounds']}" if cfg.dynamic_sampling else ""))
            sampler.load_weights(model)
            if run.eval_due(step):
                evaluate_now(step)
            run.checkpoint_if_due(step)
        return run.finish()


def _h100(**overrides: Any) -> GRPOConfig:
    base = GRPOConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=DataConfig(path="../shared/data/math/train.jsonl"),
        eval_data=HeldOutConfig(path="../shared/data/math/validation.jsonl", limit=1024, shuffle=True),
        n_grpo_steps=200, rollout_batch_size=256, group_size=8, train_batch_size=256, gradient_accumulation_steps=128,
        loss_type="reinforce_with_baseline", use_std_normalization=True,
        sampling=SamplingConfig(min_tokens=4, max_tokens=1024),
        optim=OptimConfig(lr=1e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, compile=True),
        eval=SamplingConfig(max_tokens=1024), loop=LoopConfig(eval_every=10, checkpoint_every=50),
        sampler=SamplerConfig(backend="vllm", gpu_memory_utilization=0.3),
        run=RunConfig(name="grpo_h100"),
    )
    name = overrides.pop("name", None)
    cfg = replace(base, **overrides)
    return replace(cfg, run=replace(cfg.run, name=name)) if name else cfg


def _experiments() -> dict[str, tuple[str, GRPOConfig]]:
    """One preset per Section 8 experiment of the handout (each starts from the h100 preset)."""
    out: dict[str, tuple[str, GRPOConfig]] = {}
    for lr in ("3e-6", "1e-5", "2e-5", "3e-5", "5e-5", "1e-4"):
        cfg = _h100(name=f"grpo_lr_{lr}")
        out[f"lr-{lr}"] = (f"learning-rate sweep: lr {lr}", replace(cfg, optim=replace(cfg.optim, lr=float(lr))))
    out["baseline-none"] = ("baselines: no_baseline (raw rewards)", _h100(loss_type="no_baseline", name="grpo_no_baseline"))
    out["baseline-reinforce"] = ("baselines: reinforce_with_baseline", _h100(name="grpo_reinforce_with_baseline"))
    out["length-masked-normalize"] = ("length normalisation: masked_normalize (sum / max tokens, Dr. GRPO)",
                                      _h100(length_normalization="masked_normalize", name="grpo_masked_normalize"))
    out["std-off"] = ("std normalisation off (mean-only advantages, Dr. GRPO)",
                      _h100(use_std_normalization=False, name="grpo_no_std"))
    for epochs, tb, gas in ((1, 256, 128), (2, 256, 128), (4, 256, 128), (1, 128, 64), (2, 128, 64), (1, 64, 32)):
        out[f"off-policy-e{epochs}-tb{tb}"] = (
            f"off-policy sweep: grpo_clip, {epochs} epoch(s) per rollout batch, train batch {tb}",
            _h100(loss_type="grpo_clip", epochs_per_rollout_batch=epochs, train_batch_size=tb,
                  gradient_accumulation_steps=gas, name=f"grpo_offpolicy_e{epochs}_tb{tb}"),
        )
    out["clip-off"] = ("clip ablation: grpo_no_clip, off-policy (2 epochs, train batch 128)",
                       _h100(loss_type="grpo_no_clip", epochs_per_rollout_batch=2, train_batch_size=128,
                             gradient_accumulation_steps=64, name="grpo_no_clip"))
    out["prompt-question-only"] = ("prompt ablation: question_only prompt with question_only_reward_fn",
                                   _h100(prompt="question_only", name="grpo_question_only"))
    return out


def _modern() -> dict[str, tuple[str, GRPOConfig]]:
    """Recipes of the papers peers ship (values and sources in the README's "Modern objectives")."""
    dapo = _h100(
        loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.28, length_normalization="token_mean",
        dynamic_sampling=True, max_sampling_rounds=3, mask_truncated=True, kl_coef=0.0, group_size=16,
        rollout_batch_size=256, train_batch_size=64, gradient_accumulation_steps=32, name="grpo_dapo",
    )
    dapo = replace(dapo, optim=replace(dapo.optim, lr=1e-6, warmup_steps=10))
    dr = _h100(
        loss_type="grpo_clip", cliprange=0.2, use_std_normalization=False, length_normalization="masked_normalize",
        kl_coef=0.0, rollout_batch_size=256, train_batch_size=128, gradient_accumulation_steps=64, name="grpo_dr_grpo",
    )
    dr = replace(dr, optim=replace(dr.optim, lr=1e-6))
    return {
        "dapo": ("DAPO (Yu et al. 2025): clip-higher 0.2/0.28, token-level loss, dynamic sampling, overlong masking, "
                 "no KL, lr 1e-6, G 16, 4 updates per rollout batch", dapo),
        "dr-grpo": ("Dr. GRPO (Liu et al. 2025): no std normalisation, sum / max tokens, grpo_clip 0.2, no KL, lr 1e-6, "
                    "2 updates per rollout batch", dr),
    }


_LAPTOP = GRPOConfig(
    n_grpo_steps=15, rollout_batch_size=64, group_size=8, train_batch_size=64, gradient_accumulation_steps=8,
    loss_type="reinforce_with_baseline", use_std_normalization=True,
    optim=OptimConfig(lr=2e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, share_prompt_prefix=True),
    sampling=SamplingConfig(min_tokens=4, max_tokens=48), eval=SamplingConfig(max_tokens=48),
    loop=LoopConfig(eval_every=5), warm_start=WarmStartConfig(steps=3, batch_size=16, lr=3e-5),
    run=RunConfig(name="grpo_laptop"),
)

PRESETS: dict[str, tuple[str, GRPOConfig]] = {
    "laptop": ("CPU, ≤15 min: SmolLM2-135M-Instruct on the embedded arithmetic task; a short SFT warm start, then GRPO",
               _LAPTOP),
    "laptop-dapo": (
        "CPU, ≤15 min: the laptop run with DAPO's objective (clip-higher 0.2/0.28, token-level loss, dynamic "
        "sampling, overlong masking; 2 updates per rollout batch)",
        replace(_LAPTOP, loss_type="grpo_clip", cliprange=0.2, cliprange_high=0.28, length_normalization="token_mean",
                dynamic_sampling=True, max_sampling_rounds=2, mask_truncated=True, train_batch_size=32,
                gradient_accumulation_steps=4, run=RunConfig(name="grpo_laptop_dapo")),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on MATH, the handout's starting hyper-parameters", _h100()),
    **_experiments(),
    **_modern(),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(GRPOConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
