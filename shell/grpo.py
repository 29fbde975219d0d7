"""GRPO (Algorithm 3 of the handout): ``python -m shell.grpo``.

Phases per GRPO step: sample questions → rollout G responses each from the old policy →
score them (batch grader) → group-normalised advantages → (off-policy: old log-probs once, under
inference mode) → train: epochs × train batches × microbatches, clip + AdamW per train batch →
log → sync the new weights into the sampler. Every ``eval_every`` steps (and at step 0, before the
first update) the held-out set is evaluated; ``--resume`` continues exactly from the last checkpoint.
An optional SFT warm start (``warm_start_steps``) runs first and writes ``warm_start_metrics.jsonl``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from core import LOSS_TYPES, normalize_group_rewards, reward_statistics
from shell._steps import grpo_microbatch_train_step
from shell._train import (
    OptimConfig, autocast, restore_or_refuse, batch_indices, clip_and_step, finite_or_raise, make_optimizer, policy_log_probs,
    tokenize_batch, write_curves,
)
from shell.config import ModelConfig, RunConfig, SamplerConfig, asdict, run_cli
from shell.data import DataConfig, DataError, load_dataset, make_sft_examples
from shell.evaluate import EvalSettings
from shell.prompts import PromptName, load_prompt
from shell.sft import SFTSettings, _sft_step_fn, run_eval, sft_update


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO on verified math rewards."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="train")
    """Questions for rollouts (the embedded task, or MATH train.jsonl)."""
    eval_data: DataConfig = DataConfig(split="validation", limit=128)
    """Held-out problems for validation."""
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
    sampling_temperature: float = 1.0
    sampling_top_p: float = 1.0
    sampling_min_tokens: int = 4
    """No eos/stop before this many tokens (avoids empty responses)."""
    sampling_max_tokens: int = 1024
    """Most tokens per response; also the masked_normalize constant."""
    epochs_per_rollout_batch: int = 1
    """Passes over each rollout batch (> 1 is off-policy)."""
    train_batch_size: int = 256
    """Responses per optimizer step (< rollout_batch_size is off-policy)."""
    gradient_accumulation_steps: int = 128
    """Microbatches per optimizer step."""
    loss_type: str = "reinforce_with_baseline"
    """no_baseline, reinforce_with_baseline, grpo_clip or grpo_no_clip."""
    use_std_normalization: bool = True
    """Divide advantages by the group std."""
    length_normalization: str = "masked_mean"
    """masked_mean (per-response mean over its tokens) or masked_normalize (sum / sampling_max_tokens, Dr. GRPO)."""
    cliprange: float = 0.2
    """grpo_clip's epsilon."""
    eval_every: int = 10
    """Validate every this many GRPO steps (and at step 0 and at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every this many GRPO steps (0: only at the end)."""
    keep_checkpoints: int = 2
    resume: bool = False
    """Continue from the run folder's last checkpoint."""
    warm_start_steps: int = 0
    """SFT steps on r1_zero traces of data before GRPO (0: none); logged to warm_start_metrics.jsonl."""
    warm_start_batch_size: int = 16
    warm_start_lr: float = 3e-5
    log_generations: int = 8
    eval: EvalSettings = EvalSettings()
    sampler: SamplerConfig = SamplerConfig()
    run: RunConfig = RunConfig(name="grpo")


def check_config(cfg: GRPOConfig) -> None:
    """Clear messages for inconsistent batch sizes and unknown choices."""
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {cfg.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if cfg.length_normalization not in ("masked_mean", "masked_normalize"):
        raise ValueError(f"length_normalization {cfg.length_normalization!r} is not masked_mean or masked_normalize")
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


def is_off_policy(cfg: GRPOConfig) -> bool:
    return cfg.epochs_per_rollout_batch > 1 or cfg.train_batch_size < cfg.rollout_batch_size


@dataclass
class Rollouts:
    prompts: list[str]
    responses: list[str]
    truths: list[Any]
    num_tokens: list[int]
    entropies: list[float | None]


def rollout(sampler: Any, questions: Sequence[Any], template: Any, cfg: GRPOConfig, *, seed: int) -> Rollouts:
    """G responses per question from the sampler's (old) policy, grouped consecutively."""
    from shell.sampling import SamplingParams

    prompts = [template.format(q.question) for q in questions]
    params = SamplingParams(n=cfg.group_size, temperature=cfg.sampling_temperature, top_p=cfg.sampling_top_p,
                            max_tokens=cfg.sampling_max_tokens, min_tokens=cfg.sampling_min_tokens,
                            stop=("</answer>",), seed=seed, logprobs=True)
    groups = sampler.generate(prompts, params)
    out = Rollouts([], [], [], [], [])
    for q, prompt, comps in zip(questions, prompts, groups):
        for c in comps:
            out.prompts.append(prompt)
            out.responses.append(c.text)
            out.truths.append(q.answer)
            out.num_tokens.append(len(c.token_ids))
            out.entropies.append(statistics.fmean(c.entropies) if c.entropies else None)
    return out


def score(rollouts: Rollouts, template: Any, cfg: GRPOConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Rewards through the batch grader, then group-normalised advantages and reward statistics."""
    from shell.grading import grade_batch

    scores, grading = grade_batch(rollouts.responses, rollouts.truths, reward_fn=template.reward_fn_name,
                                  timeout_s=cfg.eval.grading_timeout_s, num_workers=cfg.eval.grading_workers)
    raw = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    advantages = normalize_group_rewards(raw, group_size=cfg.group_size, advantage_eps=cfg.advantage_eps,
                                         normalize_by_std=cfg.use_std_normalization)
    stats = reward_statistics(raw, group_size=cfg.group_size)
    stats["format_reward_mean"] = statistics.fmean(s["format_reward"] for s in scores)
    stats["answer_reward_mean"] = statistics.fmean(s["answer_reward"] for s in scores)
    stats["grading_timeouts"] = float(grading.get("timeouts", 0))
    return raw, advantages, stats


def _microbatches(n: int, cfg: GRPOConfig, *, seed: int) -> list[list[list[int]]]:
    """Train batches (each a list of microbatch index lists) for one epoch. On-policy keeps rollout
    order (a microbatch of group_size rows is one group sharing its prompt); off-policy shuffles groups."""
    groups = list(range(n // cfg.group_size))
    if is_off_policy(cfg):
        groups = [groups[i] for i in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()]
    order = [g * cfg.group_size + j for g in groups for j in range(cfg.group_size)]
    micro = cfg.train_batch_size // cfg.gradient_accumulation_steps
    batches = []
    for b in range(0, n, cfg.train_batch_size):
        rows = order[b : b + cfg.train_batch_size]
        batches.append([rows[m : m + micro] for m in range(0, len(rows), micro)])
    return batches


def old_log_probs_for(model: torch.nn.Module, tokenized: list[dict[str, Any]], cfg: GRPOConfig) -> list[torch.Tensor]:
    """Log-probs of each microbatch under the current (old) policy: inference mode, never differentiated."""
    out = []
    model.eval()
    with torch.inference_mode(), autocast(model, cfg.optim.autocast_bf16):
        for tb in tokenized:
            lp, _, _ = policy_log_probs(model, tb, share_prompt_prefix=cfg.optim.share_prompt_prefix)
            out.append(lp["log_probs"].float().clone())
    return out


def train_on_rollouts(
    model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
    rollouts: Rollouts, raw: torch.Tensor, advantages: torch.Tensor, cfg: GRPOConfig, *, seed: int,
) -> list[dict[str, float]]:
    """Epochs × train batches of policy-gradient updates on one rollout batch; metrics per optimizer step."""
    device = next(model.parameters()).device
    n = len(rollouts.responses)
    plan = [_microbatches(n, cfg, seed=seed * 7919 + e) for e in range(cfg.epochs_per_rollout_batch)]
    flat = [mb for epoch in plan for batch in epoch for mb in batch]
    tokenized = {tuple(mb): tokenize_batch([rollouts.prompts[i] for i in mb], [rollouts.responses[i] for i in mb],
                                           tokenizer, device) for mb in flat}
    needs_old = cfg.loss_type in ("grpo_clip", "grpo_no_clip")
    old: dict[tuple[int, ...], torch.Tensor] = {}
    if needs_old and is_off_policy(cfg):
        keys = list(tokenized)
        old = dict(zip(keys, old_log_probs_for(model, [tokenized[k] for k in keys], cfg)))
    metrics = []
    model.train()
    for epoch in plan:
        for batch in epoch:
            loss_sum, ent_sum, clip_sum, tokens = 0.0, 0.0, 0.0, 0
            for mb in batch:
                tb = tokenized[tuple(mb)]
                with autocast(model, cfg.optim.autocast_bf16):
                    out, mask, _ = policy_log_probs(model, tb, share_prompt_prefix=cfg.optim.share_prompt_prefix,
                                                        return_token_entropy=True, checkpoint_above_tokens=cfg.optim.checkpoint_above_tokens)
                    lp = out["log_probs"]
                    old_lp = None
                    if needs_old:
                        old_lp = old[tuple(mb)] if old else lp.detach()  # both cover positions start:
                    idx = torch.tensor(mb)
                    loss, meta = grpo_microbatch_train_step(
                        lp, mask, cfg.gradient_accumulation_steps, cfg.loss_type,
                        raw_rewards=raw[idx].unsqueeze(-1).to(device), advantages=advantages[idx].unsqueeze(-1).to(device),
                        old_log_probs=old_lp, cliprange=cfg.cliprange, length_normalization=cfg.length_normalization,
                        normalize_constant=float(cfg.sampling_max_tokens),
                    )
                k = int(mask.sum())
                loss_sum += float(loss)
                tokens += k
                ent_sum += float((out["token_entropy"] * mask).sum())
                if "clip_fraction" in meta:
                    clip_sum += float(meta["clip_fraction"]) * k
            norm = clip_and_step(model, optimizer, scheduler, cfg.optim.max_grad_norm)
            metrics.append({
                "train/loss": finite_or_raise(loss_sum, "train loss"),
                "train/grad_norm": norm,
                "train/token_entropy": ent_sum / max(tokens, 1),
                "train/clip_fraction": clip_sum / max(tokens, 1),
                "train/lr": scheduler.get_last_lr()[0],
            })
    return metrics


def warm_start(model, tokenizer, questions, cfg: GRPOConfig, run_dir: Path, template: Any) -> None:
    """SFT on r1_zero traces of the training questions, logged to warm_start_metrics.jsonl."""
    from shell.runlog import RunLogger

    examples = make_sft_examples(questions, template)
    if not examples:
        raise DataError("warm start: the training data has no solutions to make SFT traces from")
    optim = replace(cfg.optim, lr=cfg.warm_start_lr, warmup_steps=0)
    optimizer, scheduler = make_optimizer(model, optim)
    settings = SFTSettings(cfg.warm_start_batch_size, max(1, cfg.warm_start_batch_size // 8), optim, cfg.run.seed + 1)
    logger = RunLogger(run_dir, logger="none", metrics_name="warm_start_metrics.jsonl")
    step_fn = _sft_step_fn(False)
    for step in range(1, cfg.warm_start_steps + 1):
        idx = batch_indices(len(examples), settings.batch_size, step - 1, seed=settings.seed)
        m = sft_update(model, tokenizer, optimizer, scheduler, step_fn, [examples[i] for i in idx], settings)
        logger.log({"train_step": step, **m})
        print(f"[warm start {step}/{cfg.warm_start_steps}] loss {m['train/loss']:.4f}", flush=True)
    logger.close()


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run folder."""
    from shell.checkpoint import save_checkpoint, save_pretrained_atomic
    from shell.evaluate import build_sampler
    from shell.runlog import RunLogger

    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    train_set = load_dataset(cfg.data)
    eval_set = load_dataset(cfg.eval_data)
    n_questions = cfg.rollout_batch_size // cfg.group_size
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    print(f"GRPO: {cfg.n_grpo_steps} steps × {n_questions} questions × G={cfg.group_size}, loss {cfg.loss_type}, "
          f"{'off' if is_off_policy(cfg) else 'on'}-policy; eval on {len(eval_set)} held-out problems -> {run_dir}")

    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed)
    optimizer, scheduler = make_optimizer(model, cfg.optim)
    start, elapsed = restore_or_refuse(run_dir, resume=cfg.resume, model=model, optimizer=optimizer, scheduler=scheduler)
    if start == 0 and cfg.warm_start_steps > 0:
        warm_start(model, tokenizer, list(train_set), cfg, run_dir, template)
    logger = RunLogger(run_dir, logger=cfg.run.logger, config=asdict(cfg), resume_step=start if cfg.resume else None,
                       elapsed_offset=elapsed)

    def eval_now(step: int) -> None:
        run_eval(sampler=sampler, model=model, eval_set=eval_set, template=template, settings=cfg.eval,
                 seed=cfg.run.seed + 100_003 + step, step=step, logger=logger, run_dir=run_dir, n_log=cfg.log_generations)
        write_curves(run_dir, extra_panels=[("train/reward", "train_step")])

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        extra={"scheduler": scheduler.state_dict(), "elapsed": logger.elapsed}, keep_last=cfg.keep_checkpoints)

    try:
        if start == 0:
            eval_now(0)
        else:
            sampler.load_weights(model)
        for step in range(start + 1, cfg.n_grpo_steps + 1):
            idx = batch_indices(len(train_set), n_questions, step - 1, seed=cfg.run.seed)
            questions = [train_set[i] for i in idx]
            model.eval()
            rollouts = rollout(sampler, questions, template, cfg, seed=cfg.run.seed * 1_000_003 + step)
            raw, advantages, stats = score(rollouts, template, cfg)
            updates = train_on_rollouts(model, tokenizer, optimizer, scheduler, rollouts, raw, advantages, cfg, seed=step)
            ents = [e for e in rollouts.entropies if e is not None]
            common = {
                "train_step": step,
                "train/reward": stats["reward_mean"],
                "train/format_reward": stats["format_reward_mean"],
                "train/answer_reward": stats["answer_reward_mean"],
                "train/reward_std": stats["reward_std"],
                "train/zero_variance_group_fraction": stats["zero_variance_group_fraction"],
                "train/response_length": statistics.fmean(rollouts.num_tokens),
                "train/rollout_entropy": statistics.fmean(ents) if ents else None,
                "train/grading_timeouts": stats["grading_timeouts"],
            }
            for i, u in enumerate(updates):
                logger.log({**common, "train/optimizer_step": (step - 1) * len(updates) + i + 1, **u})
            print(f"[grpo step {step}/{cfg.n_grpo_steps}] reward {stats['reward_mean']:.3f}  format "
                  f"{stats['format_reward_mean']:.3f}  zero-var {stats['zero_variance_group_fraction']:.2f}  "
                  f"len {common['train/response_length']:.1f}  loss {updates[-1]['train/loss']:.4f}", flush=True)
            sampler.load_weights(model)
            if step % cfg.eval_every == 0 or step == cfg.n_grpo_steps:
                eval_now(step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != cfg.n_grpo_steps:
                checkpoint(step)
        checkpoint(cfg.n_grpo_steps)
        save_pretrained_atomic(model, tokenizer, run_dir / "final")
        write_curves(run_dir, extra_panels=[("train/reward", "train_step")])
    finally:
        logger.close()
        sampler.close()
    print(f"done: {run_dir / 'metrics.jsonl'}, {run_dir / 'curves.png'}, {run_dir / 'final'}")
    return run_dir


def _h100(**overrides: Any) -> GRPOConfig:
    base = GRPOConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=DataConfig(path="../shared/data/math/train.jsonl"),
        eval_data=DataConfig(path="../shared/data/math/validation.jsonl", limit=1024, shuffle=True),
        n_grpo_steps=200, rollout_batch_size=256, group_size=8, train_batch_size=256, gradient_accumulation_steps=128,
        loss_type="reinforce_with_baseline", use_std_normalization=True, sampling_max_tokens=1024,
        optim=OptimConfig(lr=1e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, compile=True),
        eval=EvalSettings(max_tokens=1024), eval_every=10, checkpoint_every=50,
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


PRESETS: dict[str, tuple[str, GRPOConfig]] = {
    "laptop": (
        "CPU, ≤15 min: SmolLM2-135M-Instruct on the embedded arithmetic task; a short SFT warm start, then GRPO",
        GRPOConfig(
            n_grpo_steps=15, rollout_batch_size=64, group_size=8, train_batch_size=64, gradient_accumulation_steps=8,
            loss_type="reinforce_with_baseline", use_std_normalization=True,
            optim=OptimConfig(lr=2e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, share_prompt_prefix=True),
            sampling_max_tokens=48, eval=EvalSettings(max_tokens=48), eval_every=5,
            warm_start_steps=3, warm_start_batch_size=16, warm_start_lr=3e-5,
            run=RunConfig(name="grpo_laptop"),
        ),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on MATH, the handout's starting hyper-parameters", _h100()),
    **_experiments(),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(GRPOConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
