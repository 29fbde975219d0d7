"""Expert iteration (Algorithm 2 of the handout): ``python -m shell.expert_iteration``.

Phases per EI step k: sample D_b questions → G responses each from the current policy (T=1,
min_tokens 4, stop after ``</answer>``) → grade them (batch grader, the prompt's reward function) →
keep the correct ones (reward 1), each with its own prompt → SFT on them for ``--sft-epochs`` epochs
(the shared :func:`shell.update.sft_update`, compiled with ``--optim.compile``) → log the EI step →
sync weights and evaluate (``eval_step`` k; ``eval_step`` 0 is taken before any EI update) → atomic
checkpoint. An optional SFT warm start (``--warm-start.steps``) runs first and writes
``warm_start_metrics.jsonl``. ``--resume`` continues from the last completed EI step as if the run had
never stopped: every random choice is a function of (seed, EI step, SFT step).

metrics.jsonl: SFT optimizer steps as ``train/…`` with ``train_step`` (counted across EI steps) and
``train/ei_step``; one record per EI step with ``train/ei_…`` keys (questions, responses, kept,
pass@G, rollout entropy, response lengths; ``train_step`` = SFT steps so far); evaluations as
``eval/…`` with ``eval_step`` = EI step (and ``eval/sft_steps``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import tyro

from shell.config import (
    GradingConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, SamplingConfig, WarmStartConfig,
    at_least, check_parts, flag, require, run_cli, variant,
)
from shell.data import DataConfig, HeldOutConfig, SFTExample, group_pass_rates, shared_data
from shell.evaluation import mean_or_none
from shell.lora import LoraConfig
from shell.loop import Run, write_curves
from shell.progress import say
from shell.prompts import PromptName
from shell.rl_session import RLSession, load_rl_data
from shell.rollout import Rollouts, grade, rollout
from shell.runlog import plot_curves
from shell.seeds import batch_indices, derive_seed
from shell.update import sft_update
from shell.world import launched_world_size, require_world_multiple


@dataclass(frozen=True)
class EIConfig:
    """Expert iteration: sample, keep the correct responses, SFT on them, repeat."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(split="train")
    """Questions for rollouts (the embedded task, or MATH train.jsonl)."""
    eval_data: HeldOutConfig = HeldOutConfig()
    """Held-out problems for validation (by default the validation split that goes with --data)."""
    prompt: PromptName = "r1_zero"
    """Prompt template; its reward function grades rollouts and evaluations."""
    n_ei_steps: int = 5
    """Expert iteration steps."""
    ei_batch_size: int = 512
    """D_b: questions sampled per EI step (the handout sweeps 512, 1024, 2048)."""
    group_size: int = 4
    """G: responses sampled per question."""
    sampling: SamplingConfig = SamplingConfig(min_tokens=4)
    """How rollouts are sampled."""
    sft_epochs: float = 1.0
    """Passes over each EI step's filtered (correct) responses."""
    sft_batch_size: int = 64
    """Examples per SFT optimizer step (smaller when fewer responses were kept)."""
    sft_gradient_accumulation_steps: int = 32
    """Microbatches per SFT optimizer step."""
    sft_max_steps: int | None = None
    """Cap on SFT optimizer steps per EI step (None: epochs × kept / batch)."""
    fresh_optimizer: bool = False
    """A new AdamW (and LR schedule) at every EI step. Default: one AdamW kept across EI steps (its state
    is checkpointed); either way, each EI step's SFT trains only on that step's kept responses."""
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)
    warm_start: WarmStartConfig = WarmStartConfig()
    entropy_fallback_responses: int = 256
    """When the sampler gives no entropies (vLLM), compute the rollout entropy with the policy on this
    many of the sampled responses (0: skip)."""
    loop: Annotated[LoopConfig, tyro.conf.OmitArgPrefixes] = LoopConfig(eval_every=1, checkpoint_every=1)
    eval: SamplingConfig = SamplingConfig()
    """How held-out responses are sampled."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    lora: LoraConfig = LoraConfig()
    """LoRA adapters (peft) instead of training every weight (--lora.rank 0: off)."""
    run: RunConfig = RunConfig(name="expert_iteration")


def check_config(cfg: EIConfig) -> None:
    """Every flag's range and the sizes that must divide, before anything loads; each message names the flag."""
    for name in ("n_ei_steps", "ei_batch_size", "group_size", "sft_batch_size", "sft_gradient_accumulation_steps"):
        at_least(getattr(cfg, name), 1, flag("", name))
    require(cfg.sft_batch_size % cfg.sft_gradient_accumulation_steps == 0,
            f"--sft-batch-size ({cfg.sft_batch_size}) must be divisible by --sft-gradient-accumulation-steps "
            f"({cfg.sft_gradient_accumulation_steps})")
    require(cfg.sft_epochs > 0, f"--sft-epochs must be > 0, got {cfg.sft_epochs}")
    at_least(cfg.sft_max_steps, 0, "--sft-max-steps", optional=True)
    at_least(cfg.entropy_fallback_responses, 0, "--entropy-fallback-responses")
    check_parts(cfg, trains=("sampling",))
    require_world_multiple(cfg.sft_gradient_accumulation_steps, "--sft-gradient-accumulation-steps")


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
    """How one EI step's SFT phase runs: ``steps`` optimizer steps of ``batch_size`` examples in
    ``gradient_accumulation_steps`` microbatches, batches drawn with ``seed``."""

    batch_size: int
    gradient_accumulation_steps: int
    steps: int
    seed: int


def sft_plan(n_kept: int, cfg: EIConfig, ei_step: int, *, shards: int = 1) -> SFTPlan:
    """Batch size, microbatches and steps for ``n_kept`` examples: the configured microbatch size, fewer
    microbatches when fewer examples were kept, ``ceil(epochs × kept / batch)`` steps (capped).

    ``shards`` (the number of ranks under torchrun): the microbatches are a multiple of it, so that every rank
    runs as many; with fewer kept examples than ``shards`` microbatches hold, ``shards`` smaller ones (of a
    batch cut down to a multiple of ``shards``; no step when fewer than ``shards`` examples were kept)."""
    micro = cfg.sft_batch_size // cfg.sft_gradient_accumulation_steps
    batch = min(cfg.sft_batch_size, n_kept)
    if batch >= micro * shards:
        k = batch // micro // shards * shards
        batch = k * micro
    else:
        k = shards
        batch = batch // shards * shards
    steps = 0 if batch == 0 else max(1, math.ceil(cfg.sft_epochs * n_kept / batch))
    if cfg.sft_max_steps is not None:
        steps = min(steps, cfg.sft_max_steps)
    return SFTPlan(batch_size=max(batch, 1), gradient_accumulation_steps=k, steps=steps,
                   seed=derive_seed(cfg.run.seed, "ei-sft", ei_step))


def ei_step_metrics(rollouts: Rollouts, scores: Sequence[dict[str, float]], kept: Sequence[SFTExample],
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
        "train/ei_reward": mean_or_none(rewards) or 0.0,
        "train/ei_format_reward": mean_or_none([s["format_reward"] for s in scores]) or 0.0,
        "train/ei_answer_reward": mean_or_none([s["answer_reward"] for s in scores]) or 0.0,
        "train/ei_rollout_entropy": entropy,
        "train/ei_response_length": mean_or_none(lengths),
        "train/ei_response_length_correct": mean_or_none([n for n, r in zip(lengths, rewards) if r == 1.0]),
        "train/ei_response_length_incorrect": mean_or_none([n for n, r in zip(lengths, rewards) if r != 1.0]),
    }


def write_plots(run_dir: Path) -> None:
    """curves.png (loss, validation rewards, pass@G, kept responses) and entropy.png: the rollout entropy
    per EI step (the sampler's per-token entropies, before that step's SFT) and the policy's token
    entropy on the kept responses at each SFT step, and the evaluation samples' mean token entropy."""
    write_curves(run_dir, extra_panels=[("train/ei_pass_at_g", "train/ei_step"), ("train/ei_kept", "train/ei_step")])
    plot_curves([run_dir], run_dir / "entropy.png",
                panels=[("train/ei_rollout_entropy", "train/ei_step"), ("train/token_entropy", "train_step"),
                        ("eval/mean_token_entropy", "eval_step")])


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: EIConfig) -> Path:
    """Run expert iteration as configured; returns the run folder."""
    # Phase 0: configuration and data, before anything is written.
    check_config(cfg)
    data = load_rl_data(cfg, total_steps=cfg.n_ei_steps)
    say(f"expert iteration: {cfg.n_ei_steps} steps × {cfg.ei_batch_size} questions × G={cfg.group_size}, "
          f"SFT {cfg.sft_epochs:g} epoch(s) on the correct ones; {data.held_note} ({len(data.held_out)} problems)")

    # Phase 1: the run folder (lock, guard, config checks), then the policy, the sampler, resume.
    with Run(cfg, total_steps=cfg.n_ei_steps, unit="EI step", step_keys=("train/ei_step", "eval_step"),
             plot=write_plots, fingerprints=data.fingerprints()) as run:
        session = RLSession(run, cfg, data, microbatch=cfg.sft_batch_size // cfg.sft_gradient_accumulation_steps,
                            total_steps=cfg.n_ei_steps, eval_extra=lambda: {"eval/sft_steps": run.state["train_step"]})
        learner, sampler, template, train_set = session.learner, session.sampler, session.template, session.train_set
        run.state.setdefault("train_step", 0)  # SFT steps across EI steps: saved with every checkpoint

        # Phase 2: a fresh run warm-starts and evaluates (EI step 0); a resumed one syncs the sampler.
        session.open()

        # Phase 3: EI steps.
        for k in run.steps():
            # Rollout: D_b questions × G responses from the current policy.
            t0 = time.perf_counter()
            idx = session.curriculum.indices(k, cfg.ei_batch_size)
            session.model.eval()
            rollouts = rollout(sampler, [train_set[i] for i in idx], template, cfg.sampling, group_size=cfg.group_size,
                               seed=derive_seed(cfg.run.seed, "rollout", k), keys=idx)
            t_rollout = time.perf_counter() - t0
            sampler.sleep()  # a colocated vLLM frees its KV cache while the policy trains
            # Score: grade, keep the correct responses.
            scores, grading = grade(rollouts, template, cfg.grading)
            session.curriculum.observe(idx, group_pass_rates(scores, group_size=cfg.group_size), step=k)
            session.record_curriculum()  # saved with this step's checkpoint
            rewards = [s["reward"] for s in scores]
            kept = select_correct(rollouts.prompts, rollouts.responses, rollouts.truths, rewards)
            if rollouts.mean_entropy is None and cfg.entropy_fallback_responses > 0:
                stride = max(1, math.ceil(len(rollouts) / cfg.entropy_fallback_responses))
                rollout_entropy = mean_or_none(session.entropy(rollouts.prompts[::stride], rollouts.responses[::stride]))
            else:
                rollout_entropy = rollouts.mean_entropy
            summary = ei_step_metrics(rollouts, scores, kept, cfg.group_size, rollout_entropy)
            # Train: SFT on the kept responses, with the shared SFT update.
            t1 = time.perf_counter()
            if cfg.fresh_optimizer:
                learner.reset_optimizer()
            plan = sft_plan(len(kept), cfg, k, shards=launched_world_size())
            losses = []
            for j in range(plan.steps):
                bidx = batch_indices(len(kept), plan.batch_size, j, seed=plan.seed)
                m = sft_update(learner, [kept[i] for i in bidx], gradient_accumulation_steps=plan.gradient_accumulation_steps)
                run.state["train_step"] += 1
                losses.append(m["train/loss"])
                run.log({"train_step": run.state["train_step"], "train/ei_step": k, **m})
            t_sft = time.perf_counter() - t1
            # Log; then sync, evaluate, checkpoint.
            run.log({
                "train_step": run.state["train_step"], "train/ei_step": k, **summary,
                "train/ei_sft_steps": plan.steps, "train/ei_sft_batch_size": plan.batch_size if plan.steps else 0,
                "train/ei_sft_loss": mean_or_none(losses), "train/ei_grading_timeouts": float(grading.get("timeouts", 0)),
                "train/ei_rollout_seconds": t_rollout, "train/ei_sft_seconds": t_sft,
            })
            ent_text = "-" if rollout_entropy is None else f"{rollout_entropy:.3f}"
            run.say(f"[ei step {k}/{cfg.n_ei_steps}] pass@{cfg.group_size} {summary['train/ei_pass_at_g']:.3f}  "
                    f"kept {len(kept)}/{len(rewards)}  reward {summary['train/ei_reward']:.3f}  format "
                    f"{summary['train/ei_format_reward']:.3f}  entropy {ent_text}  len {summary['train/ei_response_length']:.1f}  "
                    f"sft {plan.steps} steps ({t_rollout:.0f}s sampling, {t_sft:.0f}s SFT)")
            session.after_step(k)
        return session.finish()


def _h100(**overrides: Any) -> EIConfig:
    """The h100 preset with ``overrides`` (fields, and ``name``: the run's name)."""
    return variant(EIConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=DataConfig(path=shared_data("math/train.jsonl")),
        eval_data=HeldOutConfig(path=shared_data("math/validation.jsonl"), limit=1024, shuffle=True),
        n_ei_steps=5, ei_batch_size=512, group_size=4, sampling=SamplingConfig(min_tokens=4, max_tokens=1024),
        sft_epochs=1.0, sft_batch_size=64, sft_gradient_accumulation_steps=32,
        optim=OptimConfig(lr=2e-5, warmup_steps=10, compile=True),
        eval=SamplingConfig(max_tokens=1024), loop=LoopConfig(eval_every=1, checkpoint_every=1, keep_checkpoints=1),
        sampler=SamplerConfig(backend="vllm", placement="colocate"),
        run=RunConfig(name="ei_h100"),
    ), **overrides)


PRESETS: dict[str, tuple[str, EIConfig]] = {
    "laptop": (
        "CPU, ≤15 min: SmolLM2-135M-Instruct on the embedded arithmetic task; a short SFT warm start, "
        "then 3 EI steps of 32 questions × G=8",
        EIConfig(
            n_ei_steps=3, ei_batch_size=32, group_size=8, sampling=SamplingConfig(min_tokens=4, max_tokens=48),
            sft_epochs=1.0, sft_batch_size=16, sft_gradient_accumulation_steps=2, sft_max_steps=4,
            optim=OptimConfig(lr=5e-5, share_prompt_prefix=True),
            eval=SamplingConfig(max_tokens=48),
            warm_start=WarmStartConfig(steps=3, batch_size=16, lr=5e-5),
            loop=LoopConfig(eval_every=1, checkpoint_every=1, keep_checkpoints=1),
            run=RunConfig(name="ei_laptop"),
        ),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on MATH, 5 EI steps, D_b 512, G 4, 1 SFT epoch; one GPU (vLLM colocated at "
             "0.3, asleep during SFT)", _h100()),
    "h100x2": ("2 GPUs: the h100 run with vLLM on a GPU of its own (cuda:1, 0.85), the course's set-up",
               _h100(sampler=SamplerConfig(backend="vllm", placement="dedicated"), name="ei_h100x2")),
    "h100-db1024": ("the D_b sweep: D_b 1024 (else as h100)", _h100(ei_batch_size=1024, name="ei_h100_db1024")),
    "h100-db2048": ("the D_b sweep: D_b 2048 (else as h100)", _h100(ei_batch_size=2048, name="ei_h100_db2048")),
    "h100-g8": ("the rollouts sweep: G 8 responses per question (else as h100: G 4)",
                _h100(group_size=8, name="ei_h100_g8")),
    "h100-sft-epochs2": ("the SFT epochs sweep: 2 epochs on each EI step's correct responses (else as h100: 1)",
                         _h100(sft_epochs=2.0, name="ei_h100_sft_epochs2")),
    "h100-g8-sft-epochs2": ("both: G 8 and 2 SFT epochs (else as h100)",
                            _h100(group_size=8, sft_epochs=2.0, name="ei_h100_g8_sft_epochs2")),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(EIConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
