"""GRPO (Algorithm 3 of the handout): ``python -m shell.grpo``.

Phases per GRPO step: sample questions → rollout G responses each from the old policy → score them
(batch grader, group-normalised advantages) → train: (off-policy: old log-probs once, under inference
mode) epochs × train batches × microbatches, clip + AdamW per train batch → log → sync the new weights
into the sampler. Every ``--eval-every`` steps (and at step 0, before the first update) the held-out set
is evaluated; ``--resume`` continues exactly from the last checkpoint. An optional SFT warm start
(``--warm-start-steps``) runs first and writes ``warm_start_metrics.jsonl``. With ``--async-staleness K`` > 0 a
producer thread samples the batches of steps t+1 … t+K while step t trains (:func:`asynchronous_steps`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import tyro

from core import (
    AdvantageEstimator, LengthNormalization, PolicyLossType, group_normalized_advantages, nonconstant_group_mask,
    overlong_penalty,
)
from shell.async_rollouts import RolloutProducer
from shell.config import (
    GradingConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, SamplerConfig, SamplingConfig, WarmStartConfig,
    at_least, check_parts, flag, require, run_cli, variant,
)
from shell.data import (
    MATH_PASS_RATES, DataConfig, HeldOutConfig, QuestionSampler, group_pass_rates, make_curriculum, shared_data,
)
from shell.evaluation import FinalEvalConfig
from shell.lora import LoraConfig
from shell.loop import Run, write_curves
from shell.models import default_device, resolve_dtype
from shell.progress import say
from shell.prompts import PromptName
from shell.rl_session import RLSession, load_rl_data
from shell.rollout import Rollouts, grade, rollout, rollout_diagnostics
from shell.sampling.hf import generation_copy_dtype
from shell.seeds import derive_seed
from shell.update import Learner, PolicyGradientSettings, Reference, grpo_update
from shell.world import launched_world_size, require_world_multiple


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
    loss_type: PolicyLossType = "reinforce_with_baseline"
    """no_baseline, reinforce_with_baseline, grpo_clip, grpo_no_clip, gspo (sequence-level ratio, Zheng et al. 2025;
    --cliprange/--cliprange-high e.g. 3e-4/4e-4) or cispo (clipped stop-gradient IS weight, MiniMax-M1; --cliprange is
    its epsilon_low, --cliprange-high its epsilon_high)."""
    advantage_estimator: AdvantageEstimator = "grpo"
    """grpo: (r - group mean) / (group std + eps) (--use-std-normalization off: r - group mean); rloo: r minus the
    mean of the other responses to the same question (leave-one-out)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than --sampling.max-tokens minus this many tokens get a
    penalty growing linearly to --overlong-penalty at the limit, added to the reward (0: off)."""
    overlong_penalty: float = 1.0
    """The soft overlong punishment at --sampling.max-tokens (with --overlong-buffer)."""
    entropy_coef: float = 0.0
    """Entropy bonus: minus this times the masked token entropy (at the rollout temperature) is added to the loss
    (0: off)."""
    use_std_normalization: bool = True
    """Divide advantages by the group std."""
    length_normalization: LengthNormalization = "masked_mean"
    """masked_mean (per-response mean over its tokens), masked_normalize (sum / sampling.max_tokens, Dr. GRPO)
    or token_mean (sum over the train batch's response tokens / their number, DAPO)."""
    cliprange: float = 0.2
    """The clip's epsilon of grpo_clip / gspo / cispo (the lower side, and the upper side unless --cliprange-high)."""
    cliprange_high: float | None = None
    """The upper epsilon of grpo_clip / gspo / cispo (DAPO's clip-higher, e.g. 0.28); None: --cliprange."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to a frozen copy of the starting policy (0: off, no reference loaded)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's loss by min(exp(old - sampler log-prob), cap),
    correcting the sampler/trainer mismatch and, with --async-staleness, the rollouts' staleness (0: off, with a
    warning under --async-staleness; None: off at --async-staleness 0, 2 above it; the mismatch is logged either
    way)."""
    async_staleness: int = 0
    """Asynchronous rollouts: a producer thread samples the rollout batches of steps t+1 … t+K while the policy
    trains on step t, and no batch is trained on more than K policy versions after the weights that drew it
    (README "Asynchronous rollouts"). 0: the synchronous loop (sample, then train)."""
    dynamic_sampling: bool = False
    """Keep only groups whose rewards differ (DAPO): sample more questions until the rollout batch is full
    or --max-sampling-rounds is reached (then fill it with constant groups, which carry no signal)."""
    max_sampling_rounds: int = 3
    """Rounds of sampling per step with --dynamic-sampling."""
    mask_truncated: bool = False
    """Responses that hit --sampling.max-tokens without the stop string get no loss (DAPO's overlong filtering)."""
    warm_start: WarmStartConfig = WarmStartConfig()
    final_eval: FinalEvalConfig = FinalEvalConfig()
    """After the last step (or the --budget-hours stop): the final model on a whole held-out set."""
    loop: Annotated[LoopConfig, tyro.conf.OmitArgPrefixes] = LoopConfig(eval_every=10)
    eval: SamplingConfig = SamplingConfig()
    """How held-out responses are sampled."""
    grading: GradingConfig = GradingConfig()
    sampler: SamplerConfig = SamplerConfig()
    lora: LoraConfig = LoraConfig()
    """LoRA adapters (peft) instead of training every weight (--lora.rank 0: off)."""
    run: RunConfig = RunConfig(name="grpo")


def check_config(cfg: GRPOConfig) -> None:
    """Every flag's range and the sizes that must divide, before anything loads; each message names the flag."""
    for name in ("n_grpo_steps", "rollout_batch_size", "group_size", "train_batch_size", "gradient_accumulation_steps",
                 "epochs_per_rollout_batch", "max_sampling_rounds"):
        at_least(getattr(cfg, name), 1, flag("", name))
    require(cfg.rollout_batch_size % cfg.group_size == 0,
            f"--rollout-batch-size ({cfg.rollout_batch_size}) must be divisible by --group-size ({cfg.group_size})")
    require(cfg.train_batch_size % cfg.gradient_accumulation_steps == 0,
            f"--train-batch-size ({cfg.train_batch_size}) must be divisible by --gradient-accumulation-steps "
            f"({cfg.gradient_accumulation_steps})")
    require(cfg.train_batch_size >= cfg.group_size,
            f"--train-batch-size ({cfg.train_batch_size}) must be >= --group-size ({cfg.group_size})")
    require(cfg.rollout_batch_size % cfg.train_batch_size == 0,
            f"--rollout-batch-size ({cfg.rollout_batch_size}) must be divisible by --train-batch-size ({cfg.train_batch_size})")
    require(not cfg.use_std_normalization or cfg.group_size >= 2, "--use-std-normalization needs --group-size >= 2")
    require(cfg.cliprange > 0, f"--cliprange must be > 0, got {cfg.cliprange}")
    require(cfg.cliprange_high is None or cfg.cliprange_high > 0, f"--cliprange-high must be > 0, got {cfg.cliprange_high}")
    at_least(cfg.advantage_eps, 0, "--advantage-eps")
    at_least(cfg.kl_coef, 0, "--kl-coef")
    at_least(cfg.tis_cap, 0, "--tis-cap", optional=True)
    at_least(cfg.async_staleness, 0, "--async-staleness")
    if cfg.async_staleness > 0:
        require(launched_world_size() == 1,
                f"--async-staleness {cfg.async_staleness} runs in one training process; under torchrun (world size "
                f"{launched_world_size()}) use --async-staleness 0")
        require(not samples_with_the_policy(cfg),
                f"--async-staleness {cfg.async_staleness} samples while the policy trains, so the HF sampler needs a "
                f"generation copy of its own: --sampler.generation-dtype {cfg.sampler.generation_dtype} with "
                f"--model.dtype {cfg.model.dtype} samples with the policy itself; pass --sampler.generation-dtype "
                f"bfloat16 (or float32), or --async-staleness 0")
    at_least(cfg.entropy_coef, 0, "--entropy-coef")
    at_least(cfg.overlong_penalty, 0, "--overlong-penalty")
    at_least(cfg.overlong_buffer, 0, "--overlong-buffer")
    require(cfg.overlong_buffer <= cfg.sampling.max_tokens,
            f"--overlong-buffer ({cfg.overlong_buffer}) must be at most --sampling.max-tokens ({cfg.sampling.max_tokens})")
    require(cfg.advantage_estimator != "rloo" or cfg.group_size >= 2, "--advantage-estimator rloo needs --group-size >= 2")
    check_parts(cfg, trains=("sampling",))
    require_world_multiple(cfg.gradient_accumulation_steps, "--gradient-accumulation-steps")


ASYNC_TIS_CAP = 2.0
"""The TIS cap with --async-staleness > 0 when --tis-cap is not given (ms-swift's default
``rollout_importance_sampling_threshold``, 2.0)."""


def samples_with_the_policy(cfg: GRPOConfig) -> bool:
    """Does the HF sampler sample with the policy itself? :func:`shell.sampling.hf.generation_copy_dtype`'s rule on
    the training policy's dtype, known from the flags before anything loads."""
    device = cfg.model.device or default_device()
    policy_dtype = resolve_dtype(cfg.model.dtype, device, training=True)
    return cfg.sampler.backend == "hf" and generation_copy_dtype(cfg.sampler.generation_dtype, policy_dtype, device) is None


def tis_cap(cfg: GRPOConfig) -> float:
    """The TIS cap the objective uses: ``--tis-cap``, or when it is None, :data:`ASYNC_TIS_CAP` with
    ``--async-staleness`` > 0 (the off-policy correction) and 0 (off) without."""
    if cfg.tis_cap is not None:
        return cfg.tis_cap
    return ASYNC_TIS_CAP if cfg.async_staleness > 0 else 0.0


def pg_settings(cfg: GRPOConfig) -> PolicyGradientSettings:
    """The policy-gradient update's settings from GRPO's flags."""
    return PolicyGradientSettings(
        loss_type=cfg.loss_type, group_size=cfg.group_size, train_batch_size=cfg.train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, epochs_per_rollout_batch=cfg.epochs_per_rollout_batch,
        cliprange=cfg.cliprange, cliprange_high=cfg.cliprange_high, length_normalization=cfg.length_normalization,
        normalize_constant=float(cfg.sampling.max_tokens), kl_coef=cfg.kl_coef, tis_cap=tis_cap(cfg),
        mask_truncated=cfg.mask_truncated, entropy_coef=cfg.entropy_coef, temperature=cfg.sampling.temperature,
    )


def sample_batch(sampler: Any, train_set: Any, template: Any, cfg: GRPOConfig, step: int,
                 curriculum: QuestionSampler | None = None) -> tuple[Rollouts, list[dict[str, float]], dict[str, float]]:
    """A rollout batch for GRPO step ``step``: n_questions × G graded responses from the sampler's (old)
    policy, the questions chosen by ``curriculum`` (``--data.curriculum``; None: uniform), which then observes
    each question's pass rate. With --dynamic-sampling, rounds of fresh questions until that many groups with
    differing rewards are found, or the rounds run out (then constant groups, which carry no signal, fill the batch).

    Returns the rollouts, their scores and ``rounds``, ``groups`` (sampled), ``nonconstant`` (groups) and
    ``timeouts`` (grading)."""
    n_questions = cfg.rollout_batch_size // cfg.group_size
    kept, spare, scores, spare_scores = Rollouts(), Rollouts(), [], []
    info = {"rounds": 0, "groups": 0, "nonconstant": 0, "timeouts": 0.0}
    rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    if curriculum is None:
        curriculum = make_curriculum(DataConfig(), train_set, seed=cfg.run.seed, total_steps=cfg.n_grpo_steps,
                                     rounds_per_step=cfg.max_sampling_rounds)
    while len(kept) < cfg.rollout_batch_size and info["rounds"] < rounds:
        r = info["rounds"]
        idx = curriculum.indices(step, n_questions, round=r)
        batch = rollout(sampler, [train_set[i] for i in idx], template, cfg.sampling, group_size=cfg.group_size,
                        seed=derive_seed(cfg.run.seed, "rollout", step, r), keys=idx)
        batch_scores, grading = grade(batch, template, cfg.grading)
        curriculum.observe(idx, group_pass_rates(batch_scores, group_size=cfg.group_size), step=step)
        useful = nonconstant_group_mask(torch.tensor([x["reward"] for x in batch_scores]), group_size=cfg.group_size)
        info["rounds"] += 1
        info["groups"] += n_questions
        info["nonconstant"] += int(useful.sum()) // cfg.group_size
        info["timeouts"] += float(grading.get("timeouts", 0))
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
    return kept, scores + spare_scores[:fill], info


def kl_reference(cfg: GRPOConfig, run: Run, learner: Learner, *, fresh: bool) -> Reference | None:
    """The frozen policy of ``--kl-coef`` (None when it is 0): the policy as it starts (after the warm start),
    saved in ``<run>/reference/``; on resume the saved one, or, when the resumed run had none (``--kl-coef``
    added with ``--allow-config-change``), the policy at the resumed step. A LoRA policy's reference is its frozen
    base (the adapter switched off: no copy), from before the warm start too."""
    if cfg.kl_coef <= 0:
        return None
    if cfg.lora.enabled:  # the frozen base: the policy with its adapter off, no copy
        return Reference.base(learner)
    if not fresh and (run.dir / "reference").is_dir():
        return Reference.load(run.dir / "reference", learner)
    reference = Reference.of(learner)
    reference.save(run.dir / "reference")
    if not fresh:
        run.say(f"--kl-coef: the run had no reference; the policy at step {run.start} is the reference from here on")
    return reference


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run folder."""
    # Phase 0: configuration and data, before anything is written or loaded.
    check_config(cfg)
    data = load_rl_data(cfg, total_steps=cfg.n_grpo_steps)
    settings = pg_settings(cfg)
    say(f"GRPO: {cfg.n_grpo_steps} steps × {cfg.rollout_batch_size // cfg.group_size} questions × G={cfg.group_size}, "
          f"loss {cfg.loss_type}, {'off' if settings.off_policy(cfg.rollout_batch_size) else 'on'}-policy; {data.held_note} "
          f"({len(data.held_out)} problems)")
    if cfg.async_staleness > 0:
        say(f"--async-staleness {cfg.async_staleness}: rollouts up to {cfg.async_staleness} policy version(s) old; "
            + (f"TIS with the sampler's log-probs, cap {settings.tis_cap:g}" if settings.tis_cap > 0 else
               "--tis-cap 0: trained on WITHOUT an off-policy correction"))

    # Phase 1: the run folder (lock, guard, config checks), then the policy, the sampler, resume.
    with Run(cfg, total_steps=cfg.n_grpo_steps, plot=lambda d: write_curves(d, extra_panels=[("train/reward", "train_step")]),
             fingerprints=data.fingerprints()) as run:
        session = RLSession(run, cfg, data, microbatch=cfg.train_batch_size // cfg.gradient_accumulation_steps,
                            total_steps=cfg.n_grpo_steps, rounds_per_step=cfg.max_sampling_rounds)
        learner, sampler, template, train_set = session.learner, session.sampler, session.template, session.train_set

        # Phase 2: a fresh run warm-starts, fixes its KL reference and evaluates; a resumed one reloads them.
        reference = session.open(prepare=lambda fresh: kl_reference(cfg, run, learner, fresh=fresh))

        # Phase 3: GRPO steps (--async-staleness K > 0: their rollouts from a producer thread).
        if cfg.async_staleness > 0:
            asynchronous_steps(cfg, run, session, settings, reference)
            return session.finish()
        for step in run.steps():
            # Rollout and score: n_questions × G graded responses from the current (old) policy.
            session.model.eval()
            rollouts, scores, info = sample_batch(sampler, train_set, template, cfg, step, session.curriculum)
            session.record_curriculum()  # saved with this step's checkpoint
            rollouts.fill_entropies(session.entropy)
            sampler.sleep()  # a colocated vLLM frees its KV cache while the policy trains
            rows, line = learn(cfg, learner, rollouts, scores, info, settings, reference, step,
                               {"train/staleness": 0, "train/policy_version": step - 1})
            for row in rows:
                run.log(row)
            run.say(line)
            session.after_step(step)
        # Phase 4: the finish, then the final model on the whole final set.
        return session.finish()


def learn(cfg: GRPOConfig, learner: Learner, rollouts: Rollouts, scores: list[dict[str, float]], info: dict[str, float],
          settings: PolicyGradientSettings, reference: Reference | None, step: int, extra: dict[str, Any]
          ) -> tuple[list[dict[str, Any]], str]:
    """Step ``step``'s advantages and policy-gradient updates on its scored rollouts: the metrics rows to log (one per
    optimizer step, with ``extra``) and the step's progress line."""
    length_penalty = (overlong_penalty(torch.tensor(rollouts.num_tokens), max_tokens=cfg.sampling.max_tokens,
                                       buffer=cfg.overlong_buffer, penalty=cfg.overlong_penalty)
                      if cfg.overlong_buffer > 0 else None)
    advantages, raw, stats = group_normalized_advantages(scores, group_size=cfg.group_size,
                                                         advantage_eps=cfg.advantage_eps,
                                                         normalize_by_std=cfg.use_std_normalization,
                                                         estimator=cfg.advantage_estimator,
                                                         reward_shaping=length_penalty)
    # Train: epochs × train batches of policy-gradient steps.
    updates = grpo_update(learner, rollouts, raw, advantages, settings,
                          seed=derive_seed(cfg.run.seed, "update", step), reference=reference)
    common = {
        "train_step": step,
        "train/reward": stats["reward_mean"],
        "train/format_reward": stats["format_reward_mean"],
        "train/answer_reward": stats["answer_reward_mean"],
        "train/reward_std": stats["reward_std"],
        "train/zero_variance_group_fraction": stats["zero_variance_group_fraction"],
        "train/frac_reward_zero_std": stats["zero_variance_group_fraction"],  # TRL's name of the same
        "train/response_length": statistics.fmean(rollouts.num_tokens),
        **rollout_diagnostics(rollouts),
        "train/rollout_entropy": rollouts.mean_entropy,
        "train/grading_timeouts": info["timeouts"],
    }
    if length_penalty is not None:
        common["train/overlong_penalty"] = float(length_penalty.mean())
    if cfg.dynamic_sampling:
        common["train/sampling_rounds"] = info["rounds"]
        common["train/kept_group_fraction"] = info["nonconstant"] / info["groups"]
    common.update(extra)
    rows = [{**common, "train/optimizer_step": (step - 1) * len(updates) + i + 1, **u} for i, u in enumerate(updates)]
    line = (f"[grpo step {step}/{cfg.n_grpo_steps}] reward {stats['reward_mean']:.3f}  format "
            f"{stats['format_reward_mean']:.3f}  zero-var {stats['zero_variance_group_fraction']:.2f}  "
            f"len {common['train/response_length']:.1f}  loss {updates[-1]['train/loss']:.4f}"
            + (f"  rounds {info['rounds']}" if cfg.dynamic_sampling else ""))
    return rows, line


def asynchronous_steps(cfg: GRPOConfig, run: Run, session: RLSession, settings: PolicyGradientSettings,
                       reference: Reference | None) -> None:
    """The GRPO steps with ``--async-staleness K`` > 0 (README "Asynchronous rollouts"): a
    :class:`shell.async_rollouts.RolloutProducer` makes the batches of steps t+1 … t+K (questions, curriculum and
    seeds in step order, each batch's curriculum state kept with it for the checkpoint of its step) while step t
    trains; after each step the weights go to the sampler between the producer's batches, then the evaluation (with
    the sampler held) and the checkpoint when due. A stop (signal, budget, error) drops the batches made ahead."""
    sampler, k = session.sampler, cfg.async_staleness
    if getattr(sampler, "owns_copy", True) is False:  # check_config refuses the flags that lead here
        raise RuntimeError("--async-staleness: the HF sampler samples with the policy itself")

    def produce(step: int) -> tuple[Rollouts, list[dict[str, float]], dict[str, float], dict[str, Any]]:
        rollouts, scores, info = sample_batch(sampler, session.train_set, session.template, cfg, step, session.curriculum)
        return rollouts, scores, info, session.curriculum.state_dict()

    threads = torch.get_num_threads()
    split = session.learner.device.type == "cpu"  # the two sides share the cores: split the torch threads
    producer_threads, trainer_threads = max(1, threads // 2), max(1, threads - threads // 2)
    if split:
        run.say(f"--async-staleness on a CPU: {producer_threads} torch thread(s) sample, {trainer_threads} train")
        torch.set_num_threads(trainer_threads)  # this thread's (OpenMP's count is per thread)
    try:
        with RolloutProducer(produce, staleness=k, first_step=run.start + 1, last_step=cfg.n_grpo_steps,
                             version=run.start,
                             on_start=(lambda: torch.set_num_threads(producer_threads)) if split else None) as producer:
            _asynchronous_loop(cfg, run, session, settings, reference, producer, threads=threads)
    finally:
        torch.set_num_threads(threads)


def _asynchronous_loop(cfg: GRPOConfig, run: Run, session: RLSession, settings: PolicyGradientSettings,
                       reference: Reference | None, producer: RolloutProducer, *, threads: int) -> None:
    """The trainer's side of :func:`asynchronous_steps`; it evaluates with all ``threads`` (the producer waits)."""
    sampler = session.sampler
    for step in run.steps():
        batch, waited = producer.take(step)
        rollouts, scores, info, curriculum = batch.value
        session.record_curriculum(curriculum)  # the state after this step's questions: its checkpoint's
        session.model.eval()
        rollouts.fill_entropies(session.entropy)  # vLLM: under the current policy (the trainer's version)
        rows, line = learn(cfg, session.learner, rollouts, scores, info, settings, reference, step,
                           {"train/staleness": step - 1 - batch.version, "train/policy_version": batch.version,
                            "time/wait_for_rollouts": waited, "time/wait_for_weights": batch.wait_for_weights,
                            "time/rollout_s": batch.seconds})

        def log_and_evaluate(sync: float) -> None:  # the new weights in the sampler, still held
            for row in rows:
                run.log({**row, "time/weight_sync": sync})
            run.say(f"{line}  staleness {step - 1 - batch.version}  waited {waited:.1f}s")
            if run.eval_due(step):
                trainer_threads = torch.get_num_threads()
                torch.set_num_threads(threads)  # the producer waits for the sampler meanwhile
                try:
                    session.evaluate(step)
                finally:
                    torch.set_num_threads(trainer_threads)

        producer.publish(step, lambda: sampler.load_weights(session.model), then=log_and_evaluate)
        run.checkpoint_if_due(step)


def _h100(**overrides: Any) -> GRPOConfig:
    """The h100 preset with ``overrides`` (fields, and ``name``: the run's name)."""
    return variant(GRPOConfig(
        model=ModelConfig(name_or_path="models/Qwen2.5-Math-1.5B"),
        data=DataConfig(path=shared_data("math/train.jsonl")),
        eval_data=HeldOutConfig(path=shared_data("math/validation.jsonl"), limit=1024, shuffle=True),
        n_grpo_steps=200, rollout_batch_size=256, group_size=8, train_batch_size=256, gradient_accumulation_steps=128,
        loss_type="reinforce_with_baseline", use_std_normalization=True,
        sampling=SamplingConfig(min_tokens=4, max_tokens=1024),
        optim=OptimConfig(lr=1e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, compile=True),
        eval=SamplingConfig(max_tokens=1024), loop=LoopConfig(eval_every=10, checkpoint_every=50),
        sampler=SamplerConfig(backend="vllm", placement="colocate"),
        run=RunConfig(name="grpo_h100"),
    ), **overrides)


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
    sizes = {256: 128, 128: 64, 64: 32}  # train batch -> microbatches: 2 rows each, the same memory at every size
    for tb, gas in sizes.items():
        for epochs in (1, 2, 4):
            what = ("on-policy reference (1 optimizer step per rollout batch)" if (epochs, tb) == (1, 256) else
                    f"{epochs * 256 // tb} optimizer steps per rollout batch")
            out[f"off-policy-broad-e{epochs}-tb{tb}"] = (
                f"off-policy broad sweep, 40 steps: grpo_clip, {epochs} epoch(s), train batch {tb}: {what}",
                _h100(loss_type="grpo_clip", epochs_per_rollout_batch=epochs, train_batch_size=tb,
                      gradient_accumulation_steps=gas, n_grpo_steps=40, name=f"grpo_broad_e{epochs}_tb{tb}"),
            )
    for epochs, tb, gas in ((1, 256, 128), (2, 256, 128), (4, 256, 128), (1, 128, 64), (2, 128, 64), (1, 64, 32)):
        what = ("the on-policy reference point (train batch = rollout batch, one epoch: 1 optimizer step per rollout "
                "batch, ratio 1)" if (epochs, tb) == (1, 256) else f"{epochs * 256 // tb} optimizer steps per rollout batch")
        out[f"off-policy-e{epochs}-tb{tb}"] = (
            f"off-policy focused sweep, 200 steps: grpo_clip, {epochs} epoch(s), train batch {tb}: {what}",
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
    gspo = _h100(loss_type="gspo", cliprange=3e-4, cliprange_high=4e-4, rollout_batch_size=256, train_batch_size=64,
                 gradient_accumulation_steps=32, kl_coef=0.0, name="grpo_gspo")
    cispo = _h100(loss_type="cispo", cliprange=1.0, cliprange_high=0.28, length_normalization="token_mean",
                  rollout_batch_size=256, train_batch_size=64, gradient_accumulation_steps=32, kl_coef=0.0, name="grpo_cispo")
    rloo = _h100(advantage_estimator="rloo", loss_type="reinforce_with_baseline", name="grpo_rloo")
    overlong = _h100(overlong_buffer=256, overlong_penalty=1.0, name="grpo_overlong")
    return {
        "gspo": ("GSPO (Zheng et al. 2025): sequence-level ratio clipped to [1 - 3e-4, 1 + 4e-4], no KL, 4 updates per "
                 "rollout batch", gspo),
        "cispo": ("CISPO (MiniMax-M1, 2025): clipped stop-gradient IS weight, no lower bound (epsilon_low 1), "
                  "epsilon_high 0.28, token-level loss, no KL, 4 updates per rollout batch", cispo),
        "rloo": ("RLOO (Ahmadian et al. 2024): leave-one-out baselines, reinforce_with_baseline, on-policy", rloo),
        "overlong": ("DAPO's soft overlong punishment (Yu et al. 2025): the last 256 of 1024 tokens (DAPO: 4096 of "
                     "20480) cost up to 1 reward", overlong),
        "dapo": ("DAPO (Yu et al. 2025): clip-higher 0.2/0.28, token-level loss, dynamic sampling, overlong masking, "
                 "no KL, lr 1e-6, G 16, 4 updates per rollout batch", dapo),
        "dr-grpo": ("Dr. GRPO (Liu et al. 2025): no std normalisation, sum / max tokens, grpo_clip 0.2, no KL, lr 1e-6, "
                    "2 updates per rollout batch", dr),
    }


def _leaderboard() -> GRPOConfig:
    """The leaderboard run (2 H100s, 4 hours; values and sources in the README's "Leaderboard")."""
    validation = shared_data("math/validation.jsonl")
    cfg = _h100(
        # Only problems the starting model solves sometimes (1..7 of 8 samples, from shell.pass_rates --preset h100):
        # groups that are all right or all wrong give no gradient (README "Data strategies").
        data=DataConfig(path=MATH_PASS_RATES, curriculum="pass-rate", curriculum_band_min=0.1, curriculum_band_max=0.9,
                        curriculum_start=1.0),
        n_grpo_steps=1000,  # --budget-hours ends it
        loss_type="grpo_clip", cliprange=0.2, use_std_normalization=False, length_normalization="masked_normalize",
        rollout_batch_size=256, group_size=8, train_batch_size=128, gradient_accumulation_steps=32,
        eval_data=HeldOutConfig(path=validation, limit=1024, shuffle=True, seed=0),
        final_eval=FinalEvalConfig(enabled=True, data=HeldOutConfig(path=validation, limit=None),
                                   sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=1024)),
        loop=LoopConfig(eval_every=10, checkpoint_every=20, keep_checkpoints=1, budget_hours=4.0),
        sampler=SamplerConfig(backend="vllm", placement="dedicated"),
        name="grpo_leaderboard",
    )
    return replace(cfg, optim=replace(cfg.optim, lr=1e-5, checkpoint_above_tokens=8192))


def _h100_lora() -> GRPOConfig:
    """The h100 run with LoRA (values and sources in the README's "LoRA")."""
    cfg = _h100(lora=LoraConfig(rank=32, alpha=32.0, dropout=0.0), name="grpo_h100_lora")
    # The frozen base in bf16 (float32 masters buy nothing for weights that never change); peft keeps the adapter
    # in float32, so AdamW's state is float32; the HF sampler then samples with the policy itself, vLLM gets merges.
    return replace(cfg, model=replace(cfg.model, dtype="bfloat16"), optim=replace(cfg.optim, lr=1e-4))


_LAPTOP = GRPOConfig(
    n_grpo_steps=15, rollout_batch_size=64, group_size=8, train_batch_size=64, gradient_accumulation_steps=8,
    loss_type="reinforce_with_baseline", use_std_normalization=True,
    optim=OptimConfig(lr=2e-5, weight_decay=0.0, beta1=0.9, beta2=0.95, share_prompt_prefix=True),
    sampling=SamplingConfig(min_tokens=4, max_tokens=48), eval=SamplingConfig(max_tokens=48),
    loop=LoopConfig(eval_every=5, keep_checkpoints=1), warm_start=WarmStartConfig(steps=3, batch_size=16, lr=3e-5),
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
    "laptop-leaderboard": (
        "CPU, 15 minutes in all (--budget-hours 0.25): SFT warm start on varied, stepwise traces, then GRPO until the "
        "budget, then the final model on all 500 embedded validation problems (T=1, and greedy)",
        replace(
            _LAPTOP,
            data=DataConfig(split="train", phrasing="varied", solution_style="stepwise"),
            eval_data=HeldOutConfig(limit=64, phrasing="plain"),
            n_grpo_steps=60,
            warm_start=WarmStartConfig(steps=110, batch_size=16, lr=1e-4),
            optim=OptimConfig(lr=2e-5, warmup_steps=5, weight_decay=0.0, beta1=0.9, beta2=0.95, share_prompt_prefix=True),
            sampling=SamplingConfig(min_tokens=4, max_tokens=64), eval=SamplingConfig(max_tokens=64),
            loop=LoopConfig(eval_every=5, keep_checkpoints=1, budget_hours=0.25),
            final_eval=FinalEvalConfig(enabled=True, data=HeldOutConfig(limit=None, phrasing="plain"),
                                       sampling=SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=96), greedy=True),
            run=RunConfig(name="grpo_laptop_leaderboard"),
        ),
    ),
    "laptop-lora": (
        "CPU, ≤15 min: the laptop run with LoRA (rank 16, alpha 32 on the attention and MLP projections; lr 2e-4, 10x "
        "the full fine-tuning one as in \"LoRA without regret\"; warm-start lr 1e-3, measured: at 10x its 3 steps "
        "leave no correct answer and GRPO gets no signal)",
        replace(_LAPTOP, optim=replace(_LAPTOP.optim, lr=2e-4), warm_start=replace(_LAPTOP.warm_start, lr=1e-3),
                lora=LoraConfig(rank=16, alpha=32.0), run=RunConfig(name="grpo_laptop_lora")),
    ),
    "h100": ("GPU: Qwen2.5-Math-1.5B on MATH, the handout's starting hyper-parameters; one GPU (vLLM colocated at "
             "0.3, asleep while the policy trains)", _h100()),
    "h100x2": ("2 GPUs: the h100 run with vLLM on a GPU of its own (cuda:1, 0.85), the course's set-up",
               _h100(sampler=SamplerConfig(backend="vllm", placement="dedicated"), name="grpo_h100x2")),
    "h100-lora": ("GPU: the h100 run with LoRA rank 32 on the attention and MLP projections (Tina), alpha 32 and lr "
                  "1e-4 (10x the full fine-tuning lr, \"LoRA without regret\"); the frozen base in bf16, the adapter "
                  "and its AdamW state in float32", _h100_lora()),
    "leaderboard": ("2 H100s, 4 hours (--budget-hours 4): best MATH validation accuracy; trains on the MATH train "
                    "problems the base model solves 1-7 times in 8 (first: python -m shell.pass_rates --preset h100); "
                    "grpo_clip, 2 optimizer steps per rollout batch, Dr. GRPO normalisation, lr 1e-5; validation every "
                    "10 steps on a fixed 1,024, then all 5,000 (r1_zero, T 1, top-p 1, 1024 tokens)", _leaderboard()),
    **_experiments(),
    **_modern(),
}


def main(argv: Sequence[str] | None = None) -> Path:
    return run_cli(GRPOConfig, PRESETS, train, description=__doc__.split("\n\n")[0], args=argv)


if __name__ == "__main__":
    main()
