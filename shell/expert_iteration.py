"""Expert iteration (Algorithm 2 of the handout): ``python -m shell.expert_iteration``.

Phases per EI step k: sample D_b questions → G responses each from the current policy (T=1,
min_tokens 4, stop after ``</answer>``) → grade them (batch grader, the prompt's reward function) →
keep the correct ones (reward 1), each with its own prompt → SFT on them for ``sft_epochs`` epochs
with the SFT loop's :func:`shell.sft.sft_update` → log the EI step → sync weights and evaluate
(``eval_step`` k; ``eval_step`` 0 is taken before any EI update) → atomic checkpoint.
An optional SFT warm start (``warm_start_steps``, GRPO's :func:`shell.grpo.warm_start`) runs first
and writes ``warm_start_metrics.jsonl``. ``--resume`` continues from the last completed EI step as
if the run had never stopped: every random choice is a function of (seed, EI step, SFT step).

metrics.jsonl: SFT optimizer steps as ``train/…`` with ``train_step`` (counted across EI steps) and
``train/ei_step``; one record per EI step with ``train/ei_…`` keys (questions, responses, kept,
pass@G, rollout entropy, response lengths; ``train_step`` = SFT steps so far); evaluations as
``eval/…`` with ``eval_step`` = EI step (and ``eval/sft_steps``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from shell._train import OptimConfig, autocast, batch_indices, make_optimizer, policy_log_probs, tokenize_batch, write_curves
from shell.config import ModelConfig, RunConfig, SamplerConfig, asdict, run_cli
from shell.data import DataConfig, DataError, SFTExample, load_dataset, make_sft_examples
from shell.evaluate import EvalSettings
from shell.prompts import PromptName, load_prompt
from shell.sft import SFTSettings, _sft_step_fn, run_eval, sft_update


@dataclass(frozen=True)
class EIConfig:
    """Expert iteration: sample, keep the correct responses, SFT on them, repeat."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="train")
    """Questions for rollouts (the embedded task, or MATH train.jsonl)."""
    eval_data: DataConfig = DataConfig(split="validation", limit=128)
    """Held-out problems for validation."""
    prompt: PromptName = "r1_zero"
    """Prompt template; its reward function grades rollouts and evaluations."""
    n_ei_steps: int = 5
    """Expert iteration steps."""
    ei_batch_size: int = 512
    """D_b: questions sampled per EI step (the handout sweeps 512, 1024, 2048)."""
    group_size: int = 4
    """G: responses sampled per question."""
    sampling_temperature: float = 1.0
    sampling_top_p: float = 1.0
    sampling_min_tokens: int = 4
    """No eos/stop before this many tokens (avoids empty responses)."""
    sampling_max_tokens: int = 1024
    """Most tokens per sampled response."""
    sft_epochs: float = 1.0
    """Passes over each EI step's filtered (correct) responses."""
    sft_batch_size: int = 64
    """Examples per SFT optimizer step (smaller when fewer responses were kept)."""
    sft_gradient_accumulation_steps: int = 32
    """Microbatches per SFT optimizer step."""
    sft_max_steps: int | None = None
    """Cap on SFT optimizer steps per EI step (None: epochs × kept / batch)."""
    fresh_optimizer: bool = False
    """A new AdamW (and LR schedule) at every EI step; default: one AdamW kept across EI steps
    (its state is checkpointed), so SFT continues one optimisation with growing data."""
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)
    eval_every: int = 1
    """Validate every this many EI steps (and at step 0 and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (one is written after every EI step)."""
    resume: bool = False
    """Continue from the run folder's last checkpoint (the last completed EI step)."""
    warm_start_steps: int = 0
    """SFT steps on r1_zero traces of data before EI (0: none); logged to warm_start_metrics.jsonl."""
    warm_start_batch_size: int = 16
    warm_start_lr: float = 3e-5
    entropy_fallback_responses: int = 256
    """When the sampler gives no entropies (vLLM), compute the rollout entropy with the policy on this
    many of the sampled responses (0: skip)."""
    log_generations: int = 8
    eval: EvalSettings = EvalSettings()
    sampler: SamplerConfig = SamplerConfig()
    run: RunConfig = RunConfig(name="expert_iteration")


def check_config(cfg: EIConfig) -> None:
    """Clear messages for inconsistent sizes."""
    for name in ("n_ei_steps", "ei_batch_size", "group_size", "sft_batch_size", "sft_gradient_accumulation_steps", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.sft_batch_size % cfg.sft_gradient_accumulation_steps:
        raise ValueError(f"sft_batch_size ({cfg.sft_batch_size}) must be divisible by "
                         f"sft_gradient_accumulation_steps ({cfg.sft_gradient_accumulation_steps})")
    if cfg.sft_epochs <= 0:
        raise ValueError(f"sft_epochs must be > 0, got {cfg.sft_epochs}")
    if cfg.sft_max_steps is not None and cfg.sft_max_steps < 0:
        raise ValueError(f"sft_max_steps must be >= 0, got {cfg.sft_max_steps}")
    if not 0 <= cfg.sampling_min_tokens <= cfg.sampling_max_tokens:
        raise ValueError(f"sampling_min_tokens ({cfg.sampling_min_tokens}) must be in [0, sampling_max_tokens]")


# ------------------------------------------------------------------------------------------ pure pieces


def select_correct(prompts: Sequence[str], responses: Sequence[str], truths: Sequence[Any],
                   rewards: Sequence[float]) -> list[SFTExample]:
    """The filter of Algorithm 2: the responses with reward 1, each paired with its own prompt (in order)."""
    if not len(prompts) == len(responses) == len(truths) == len(rewards):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, "
                         f"{len(truths)} ground truths, {len(rewards)} rewards")
    return [SFTExample(prompt=p, response=r, ground_truth=t)
            for p, r, t, w in zip(prompts, responses, truths, rewards) if w == 1.0]


def pass_at_g(rewards: Sequence[float], group_size: int) -> float:
    """Fraction of questions (consecutive groups of ``group_size``) with at least one reward-1 response."""
    if len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {group_size}")
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return sum(any(r == 1.0 for r in g) for g in groups) / len(groups) if groups else 0.0


@dataclass(frozen=True)
class SFTPlan:
    """How one EI step's SFT phase runs: ``steps`` optimizer steps of ``settings.batch_size`` examples."""

    settings: SFTSettings
    steps: int


def sft_plan(n_kept: int, cfg: EIConfig, ei_step: int) -> SFTPlan:
    """Batch size, microbatches and steps for ``n_kept`` examples: the configured microbatch size, fewer
    microbatches when fewer examples were kept, ``ceil(epochs × kept / batch)`` steps (capped)."""
    micro = cfg.sft_batch_size // cfg.sft_gradient_accumulation_steps
    batch = min(cfg.sft_batch_size, n_kept)
    if batch >= micro:
        k = batch // micro
        batch = k * micro
    else:
        k = 1
    steps = 0 if n_kept == 0 else max(1, math.ceil(cfg.sft_epochs * n_kept / max(batch, 1)))
    if cfg.sft_max_steps is not None:
        steps = min(steps, cfg.sft_max_steps)
    settings = SFTSettings(batch_size=max(batch, 1), gradient_accumulation_steps=k, optim=cfg.optim,
                           seed=cfg.run.seed * 10_007 + ei_step)
    return SFTPlan(settings, steps)


# ------------------------------------------------------------------------------------------ shell pieces


def score_rollouts(rollouts: Any, template: Any, cfg: EIConfig) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Rewards of every sampled response through the batch grader (the prompt's reward function)."""
    from shell.grading import grade_batch

    return grade_batch(rollouts.responses, rollouts.truths, reward_fn=template.reward_fn_name,
                       timeout_s=cfg.eval.grading_timeout_s, num_workers=cfg.eval.grading_workers)


def policy_entropy(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                   cfg: EIConfig) -> float | None:
    """Mean (over responses) of the per-response mean token entropy under the policy, on at most
    ``cfg.entropy_fallback_responses`` evenly spaced responses (for samplers without entropies)."""
    n = len(responses)
    if n == 0 or cfg.entropy_fallback_responses <= 0:
        return None
    stride = max(1, math.ceil(n / cfg.entropy_fallback_responses))
    idx = list(range(0, n, stride))
    micro = max(1, cfg.sft_batch_size // cfg.sft_gradient_accumulation_steps)
    device = next(model.parameters()).device
    per_response: list[float] = []
    model.eval()
    with torch.inference_mode(), autocast(model, cfg.optim.autocast_bf16):
        for i in range(0, len(idx), micro):
            part = idx[i : i + micro]
            tb = tokenize_batch([prompts[j] for j in part], [responses[j] for j in part], tokenizer, device)
            out, mask, _ = policy_log_probs(model, tb, share_prompt_prefix=cfg.optim.share_prompt_prefix,
                                            return_token_entropy=True)
            ent = (out["token_entropy"].float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            per_response.extend(float(e) for e in ent)
    return statistics.fmean(per_response)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def ei_step_metrics(rollouts: Any, scores: Sequence[dict[str, float]], kept: Sequence[SFTExample],
                    group_size: int, entropy: float | None) -> dict[str, Any]:
    """The ``train/ei_…`` record of one EI step's rollouts."""
    rewards = [s["reward"] for s in scores]
    lengths = rollouts.num_tokens
    return {
        "train/ei_questions": len(rewards) // group_size,
        "train/ei_responses": len(rewards),
        "train/ei_kept": len(kept),
        "train/ei_kept_fraction": len(kept) / len(rewards) if rewards else 0.0,
        "train/ei_pass_at_g": pass_at_g(rewards, group_size),
        "train/ei_reward": _mean(rewards) or 0.0,
        "train/ei_format_reward": _mean([s["format_reward"] for s in scores]) or 0.0,
        "train/ei_answer_reward": _mean([s["answer_reward"] for s in scores]) or 0.0,
        "train/ei_rollout_entropy": entropy,
        "train/ei_response_length": _mean(lengths),
        "train/ei_response_length_correct": _mean([n for n, r in zip(lengths, rewards) if r == 1.0]),
        "train/ei_response_length_incorrect": _mean([n for n, r in zip(lengths, rewards) if r != 1.0]),
    }


def _truncate_logs(run_dir: Path, ei_step: int) -> None:
    """Drop what the lost part of an interrupted run logged after EI step ``ei_step`` (metrics and
    generations), so the files read as if the run had never stopped."""
    from shell.runlog import atomic_write_text, read_metrics

    def keep(r: dict[str, Any]) -> bool:
        if "eval_step" in r:
            return r["eval_step"] <= ei_step
        return r.get("train/ei_step", -1) <= ei_step

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if keep(r)]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    gens = run_dir / "generations.jsonl"
    if gens.exists():
        lines = [x for x in gens.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= ei_step]
        atomic_write_text(gens, "".join(x + "\n" for x in lines))


class _AddKeys:
    """A logger that adds ``extra`` keys to every record (the SFT loop's ``run_eval`` logs through it)."""

    def __init__(self, logger: Any, extra: dict[str, Any]):
        self.logger, self.extra = logger, extra

    def log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return self.logger.log({**metrics, **self.extra})


def write_plots(run_dir: Path) -> None:
    """curves.png (loss, validation rewards, pass@G, kept responses) and entropy.png: the rollout entropy
    per EI step (the sampler's per-token entropies, before that step's SFT) and the policy's token
    entropy on the kept responses at each SFT step, and the evaluation samples' mean token entropy."""
    from shell.runlog import plot_curves

    write_curves(run_dir, extra_panels=[("train/ei_pass_at_g", "train/ei_step"), ("train/ei_kept", "train/ei_step")])
    plot_curves([run_dir], run_dir / "entropy.png",
                panels=[("train/ei_rollout_entropy", "train/ei_step"), ("train/token_entropy", "train_step"),
                        ("eval/mean_token_entropy", "eval_step")])


def train(cfg: EIConfig) -> Path:
    """Run expert iteration as configured; returns the run folder."""
    from shell.checkpoint import load_latest_checkpoint, save_checkpoint, save_pretrained_atomic
    from shell.evaluate import build_sampler
    # GRPO's rollout and warm start, reused as is: they read only fields EIConfig shares by name (group_size,
    # sampling_*, optim, warm_start_*, run.seed).
    from shell.grpo import rollout, warm_start
    from shell.runlog import RunLogger

    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    torch.manual_seed(cfg.run.seed)
    template = load_prompt(cfg.prompt)
    train_set = load_dataset(cfg.data)
    eval_set = load_dataset(cfg.eval_data)
    if cfg.warm_start_steps > 0 and not cfg.resume and not make_sft_examples(list(train_set), template):
        raise DataError("warm start: the training data has no solutions to make SFT traces from")
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    print(f"expert iteration: {cfg.n_ei_steps} steps × {cfg.ei_batch_size} questions × G={cfg.group_size}, "
          f"SFT {cfg.sft_epochs:g} epoch(s) on the correct ones; eval on {len(eval_set)} held-out problems -> {run_dir}")

    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=cfg.run.seed)
    optimizer, scheduler = make_optimizer(model, cfg.optim)
    # shell._train.restore_or_refuse, plus the global SFT step count kept in the checkpoint's extras.
    start, train_step, elapsed = 0, 0, 0.0
    if cfg.resume:
        ckpt = load_latest_checkpoint(run_dir, model=model, optimizer=optimizer)
        if ckpt is None:
            print(f"--resume: no checkpoint in {run_dir}; starting from scratch")
        else:
            start = ckpt.step
            extra = ckpt.state["extra"]
            scheduler.load_state_dict(extra["scheduler"])
            train_step = int(extra["train_step"])
            elapsed = extra.get("elapsed", 0.0)
            print(f"resumed from {ckpt.path} (EI step {start}, SFT step {train_step})")
    elif run_dir.exists() and any((run_dir / "checkpoints").glob("step_*")):
        raise SystemExit(f"{run_dir} already holds checkpoints: pass --resume to continue it or choose another --run.name")
    if start > 0:
        _truncate_logs(run_dir, start)
    else:
        (run_dir / "generations.jsonl").unlink(missing_ok=True)
    logger = RunLogger(run_dir, logger=cfg.run.logger, config=asdict(cfg),
                       resume_step=max(start, train_step) if start > 0 else None, elapsed_offset=elapsed)
    step_fn = _sft_step_fn(cfg.optim.compile)

    def eval_now(k: int) -> None:
        run_eval(sampler=sampler, model=model, eval_set=eval_set, template=template, settings=cfg.eval,
                 seed=cfg.run.seed + 100_003 + k, step=k, logger=_AddKeys(logger, {"eval/sft_steps": train_step}),
                 run_dir=run_dir, n_log=cfg.log_generations)
        write_plots(run_dir)

    def checkpoint(k: int) -> None:
        save_checkpoint(run_dir, k, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        extra={"scheduler": scheduler.state_dict(), "elapsed": logger.elapsed, "train_step": train_step},
                        keep_last=cfg.keep_checkpoints)

    try:
        if start == 0:
            if cfg.warm_start_steps > 0:
                warm_start(model, tokenizer, list(train_set), cfg, run_dir, template)  # type: ignore[arg-type]
            eval_now(0)
        else:
            sampler.load_weights(model)
        for k in range(start + 1, cfg.n_ei_steps + 1):
            t0 = time.perf_counter()
            # Rollouts: D_b questions × G responses from the current policy.
            idx = batch_indices(len(train_set), cfg.ei_batch_size, k - 1, seed=cfg.run.seed)
            questions = [train_set[i] for i in idx]
            model.eval()
            rollouts = rollout(sampler, questions, template, cfg, seed=cfg.run.seed * 1_000_003 + k)  # type: ignore[arg-type]
            t_rollout = time.perf_counter() - t0
            # Grade and filter.
            scores, grading = score_rollouts(rollouts, template, cfg)
            rewards = [s["reward"] for s in scores]
            kept = select_correct(rollouts.prompts, rollouts.responses, rollouts.truths, rewards)
            ents = [e for e in rollouts.entropies if e is not None]
            entropy = statistics.fmean(ents) if ents else policy_entropy(model, tokenizer, rollouts.prompts, rollouts.responses, cfg)
            summary = ei_step_metrics(rollouts, scores, kept, cfg.group_size, entropy)
            # SFT on the kept responses, with the SFT loop's optimizer step.
            t1 = time.perf_counter()
            if cfg.fresh_optimizer:
                optimizer, scheduler = make_optimizer(model, cfg.optim)
            plan = sft_plan(len(kept), cfg, k)
            losses = []
            for j in range(plan.steps):
                bidx = batch_indices(len(kept), plan.settings.batch_size, j, seed=plan.settings.seed)
                m = sft_update(model, tokenizer, optimizer, scheduler, step_fn, [kept[i] for i in bidx], plan.settings)
                train_step += 1
                losses.append(m["train/loss"])
                logger.log({"train_step": train_step, "train/ei_step": k, **m})
            t_sft = time.perf_counter() - t1
            logger.log({
                "train_step": train_step, "train/ei_step": k, **summary,
                "train/ei_sft_steps": plan.steps, "train/ei_sft_batch_size": plan.settings.batch_size if plan.steps else 0,
                "train/ei_sft_loss": _mean(losses), "train/ei_grading_timeouts": float(grading.get("timeouts", 0)),
                "train/ei_rollout_seconds": t_rollout, "train/ei_sft_seconds": t_sft,
            })
            ent_text = "-" if entropy is None else f"{entropy:.3f}"
            print(f"[ei step {k}/{cfg.n_ei_steps}] pass@{cfg.group_size} {summary['train/ei_pass_at_g']:.3f}  "
                  f"kept {len(kept)}/{len(rewards)}  reward {summary['train/ei_reward']:.3f}  format "
                  f"{summary['train/ei_format_reward']:.3f}  entropy {ent_text}  len {summary['train/ei_response_length']:.1f}  "
                  f"sft {plan.steps} steps ({t_rollout:.0f}s sampling, {t_sft:.0f}s SFT)", flush=True)
            if k % cfg.eval_every == 0 or k == cfg.n_ei_steps:
                eval_now(k)  # syncs the new weights into the sampler
            else:
                sampler.load_weights(model)
            checkpoint(k)
        save_pretrained_atomic(model, tokenizer, run_dir / "final")
        write_plots(run_dir)
    finally:
        logger.close()
        sampler.close()
    print(f"done: {run_dir / 'metrics.jsonl'}, {run_dir / 'curves.png'}, {run_dir / 'entropy.png'}, {run_dir / 'final'}")
    return run_dir


def _h100(**overrides: Any) -> EIConfig:
    base = EIConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=DataConfig(path="../shared/data/math/train.jsonl"),
        eval_data=DataConfig(path="../shared/data/math/validation.jsonl", limit=1024, shuffle=True),
        n_ei_steps=5, ei_batch_size=512, group_size=4, sampling_max_tokens=1024,
        sft_epochs=1.0, sft_batch_size=64, sft_gradient_accumulation_steps=32,
        optim=OptimConfig(lr=2e-5, warmup_steps=10, compile=True),
        eval=EvalSettings(max_tokens=1024), keep_checkpoints=1,
        sampler=SamplerConfig(backend="vllm", gpu_memory_utilization=0.3),
        run=RunConfig(name="ei_h100"),
    )
    name = overrides.pop("name", None)
    cfg = replace(base, **overrides)
    return replace(cfg, run=replace(cfg.run, name=name)) if name else cfg


PRESETS: dict[str, tuple[str, EIConfig]] = {
    "laptop": (
        "CPU, ≤15 min: SmolLM2-135M-Instruct on the embedded arithmetic task; a short SFT warm start, "
        "then 3 EI steps of 32 questions × G=8",
        EIConfig(
            n_ei_steps=3, ei_batch_size=32, group_size=8, sampling_max_tokens=48,
            sft_epochs=1.0, sft_batch_size=16, sft_gradient_accumulation_steps=2, sft_max_steps=4,
            optim=OptimConfig(lr=5e-5, share_prompt_prefix=True),
            eval=EvalSettings(max_tokens=48),
            warm_start_steps=3, warm_start_batch_size=16, warm_start_lr=5e-5,
            run=RunConfig(name="ei_laptop"),
        ),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on MATH, 5 EI steps, D_b 512, G 4, 1 SFT epoch, vLLM sampling", _h100()),
    "h100-db1024": ("the D_b sweep: D_b 1024 (else as h100)", _h100(ei_batch_size=1024, name="ei_h100_db1024")),
    "h100-db2048": ("the D_b sweep: D_b 2048 (else as h100)", _h100(ei_batch_size=2048, name="ei_h100_db2048")),
}


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(EIConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
