"""Policy updates shared by the loops: a :class:`Learner` (policy, optimizer, compiled steps), one
accumulate-and-step, and the SFT and policy-gradient updates built on it.

Every training microbatch of every loop runs through :func:`shell.steps.make_train_step` with
``compile=optim.compile``; old log-probs and the policy's entropy on sampled responses run through
:func:`shell.steps.make_log_probs_fn` (compiled too), under inference mode.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core import LengthNormalization, ObjectiveSettings, PolicyLossType
from shell.config import OptimConfig, WarmStartConfig
from shell.data import SFTExample
from shell.fsdp import gathered, is_sharded, max_abs_weight, shard_model, unsharded_copy, zero_gradient_pass
from shell.packing import pack_by_tokens
from shell.progress import say
from shell.rollout import Rollouts
from shell.seeds import batch_indices, derive_seed, seeded_permutation
from shell.steps import PolicyGradientTensors, make_log_probs_fn, make_train_step, mean_token_entropies, tokenize_batch
from shell.world import active, gather, is_main, share, share_evenly, sum_over_ranks, unshare, world

__all__ = [
    "DivergenceGuard",
    "Learner",
    "Optimizer",
    "PolicyGradientSettings",
    "Reference",
    "accumulate_and_step",
    "finite_or_raise",
    "grpo_update",
    "padded_lengths",
    "plan_microbatches",
    "response_entropies",
    "sft_update",
    "token_budget_split",
    "warm_start",
    "warm_start_microbatches",
]


def finite_or_raise(value: float, what: str) -> float:
    """``value``, or ``FloatingPointError`` when it is NaN or infinite (training diverged)."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}: training diverged (lower the learning rate)")
    return value


class Optimizer:
    """AdamW with a linear warm-up to a constant learning rate, and global-norm gradient clipping."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, *, lr: float | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = cfg.max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr if lr is None else lr,
                                           weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
        warm = max(0, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> float:
        """Clip the global gradient norm, step AdamW and the schedule, zero the gradients; returns the pre-clip norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def apply(self, cfg: OptimConfig) -> None:
        """Take ``cfg``'s learning rate, betas, weight decay and clipping from now on (after a resume restored
        the old ones); the schedule continues from its step with the new base learning rate."""
        self.max_grad_norm = cfg.max_grad_norm
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DivergenceGuard:
    """Stops a run that is blowing up before it can save a destroyed model: after each optimizer step the
    loss and gradient norm must be finite, the gradient norm within ``grad_factor`` × the median of the recent
    steps', a positive loss within ``loss_factor`` × its recent median, and every weight within
    ``weight_factor`` × the largest initial weight. Raises ``FloatingPointError`` naming what happened."""

    def __init__(self, params: Sequence[Tensor], *, window: int = 20, grad_factor: float = 100.0,
                 loss_factor: float = 10.0, weight_factor: float = 100.0) -> None:
        self.params = list(params)
        self.weight_limit = weight_factor * max(1.0, self.max_weight())
        self.grad_factor, self.loss_factor, self.weight_factor = grad_factor, loss_factor, weight_factor
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.losses: deque[float] = deque(maxlen=window)

    def max_weight(self) -> float:
        """The largest |weight| (over every rank's shards under torchrun)."""
        return max_abs_weight(self.params)

    def check(self, loss: float, grad_norm: float) -> None:
        finite_or_raise(loss, "train loss")
        finite_or_raise(grad_norm, "gradient norm")
        if len(self.grad_norms) >= 3:
            typical = statistics.median(self.grad_norms)
            if grad_norm > self.grad_factor * max(typical, 0.1):
                raise FloatingPointError(f"training diverged: gradient norm {grad_norm:.3g} is over {self.grad_factor:g}× "
                                         f"its recent median {typical:.3g} (lower the learning rate)")
        if len(self.losses) >= 3 and loss > 0 and all(x > 0 for x in self.losses):
            typical = statistics.median(self.losses)
            if loss > self.loss_factor * typical:
                raise FloatingPointError(f"training diverged: train loss {loss:.4g} is over {self.loss_factor:g}× "
                                         f"its recent median {typical:.4g} (lower the learning rate)")
        largest = self.max_weight()
        if not largest <= self.weight_limit:
            raise FloatingPointError(f"training diverged: a weight reached {largest:.3g}, beyond {self.weight_limit:.3g} "
                                     f"({self.weight_factor:g}× the largest initial weight; lower the learning rate)")
        if grad_norm > 0:  # a step with no signal (all advantages 0) says nothing about the scale
            self.grad_norms.append(grad_norm)
        self.losses.append(loss)


class Learner:
    """The policy being trained, its optimizer, its microbatch steps (compiled when ``optim.compile``) and
    its divergence guard. Under torchrun the policy is sharded with FSDP2 here (:func:`shell.fsdp.shard_model`),
    in place: build the sampler's copy of it first. Its master weights keep the dtype they were loaded in
    (``--model.dtype``); on a GPU with ``--optim.autocast-bf16`` FSDP computes in bf16."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, optim: OptimConfig) -> None:
        if active():
            on_gpu = next(model.parameters()).device.type == "cuda"
            model = shard_model(model, compute_dtype=torch.bfloat16 if on_gpu and optim.autocast_bf16 else None)
        self.model, self.tokenizer, self.optim = model, tokenizer, optim
        self.optimizer = Optimizer(model, optim)
        self.guard = DivergenceGuard(self.optimizer.params)
        kw = dict(compile=optim.compile, share_prompt_prefix=optim.share_prompt_prefix,
                  checkpoint_above_tokens=optim.checkpoint_above_tokens)
        self.sft_step = make_train_step(model, "sft", **kw)
        self.grpo_step = make_train_step(model, "grpo", **kw)
        self.log_probs = make_log_probs_fn(model, compile=optim.compile, share_prompt_prefix=optim.share_prompt_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the policy's device when ``optim.autocast_bf16``."""
        if not self.optim.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def reset_optimizer(self) -> None:
        """A fresh AdamW and schedule (expert iteration's ``--fresh-optimizer``)."""
        self.optimizer = Optimizer(self.model, self.optim)

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Any]:
        return tokenize_batch(prompts, responses, self.tokenizer, self.device)


Microbatch = tuple[dict[str, Any], dict[str, Any]]
"""A tokenized microbatch and the objective's keyword arguments for it."""


# ------------------------------------------------------------------------------------------------ token-budget microbatches

Split = Callable[[Sequence[int]], list[list[int]]]
"""An optimizer step's rows (indices) → its microbatches (lists of those indices)."""


def padded_lengths(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str]) -> list[int]:
    """Each row's width in :func:`shell.steps.tokenize_batch`: its prompt and response tokens, less the shift's one."""
    p = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [max(0, len(a) + len(b) - 1) for a, b in zip(p, r)]


def token_budget_split(learner: Learner, prompts: Sequence[str], responses: Sequence[str]) -> Split | None:
    """With ``--optim.max-tokens-per-microbatch N``: the split that packs a step's rows (indices into ``prompts``
    and ``responses``) into microbatches of at most N padded tokens, as many as a multiple of the ranks
    (:func:`shell.packing.pack_by_tokens`; an empty one only where no microbatch can be split further). None
    without it: the fixed split of ``--gradient-accumulation-steps``."""
    budget = learner.optim.max_tokens_per_microbatch
    if budget is None:
        return None
    lengths = padded_lengths(learner.tokenizer, prompts, responses)
    ranks = world().size

    def split(rows: Sequence[int]) -> list[list[int]]:
        rows = list(rows)
        return [[rows[j] for j in mb] for mb in pack_by_tokens([lengths[i] for i in rows], budget, multiple_of=ranks)]

    return split


def _divisor(step_rows: int, microbatch_rows: int, fixed: int | None) -> int | float:
    """The objective's ``k`` for one microbatch: the fixed count of equal microbatches, or under a token budget
    the step's rows over the microbatch's, so that the microbatch losses (means over their rows, over k) sum to
    the mean over the step's rows whatever the split: the same normalisation as equal microbatches."""
    return fixed if fixed is not None else step_rows / microbatch_rows


def _empty_microbatch(learner: Learner) -> dict[str, Any]:
    """A microbatch with nothing to learn (one masked token): a rank's share of a step with fewer rows than
    microbatches to share (it only takes part in the gradient reduction)."""
    ids = torch.zeros((1, 1), dtype=torch.long, device=learner.device)
    return {"input_ids": ids, "labels": ids, "response_mask": torch.zeros((1, 1), dtype=torch.bool, device=learner.device),
            "prefix_len": 0}


def accumulate_and_step(
    learner: Learner, step_fn: Callable[..., tuple[Tensor, dict[str, Any]]], microbatches: Sequence[Microbatch],
    *, optimizer: Optimizer | None = None,
) -> dict[str, float]:
    """One optimizer step: the microbatch step (forward, loss, backward) on each microbatch, then clip +
    AdamW. Returns ``train/`` metrics: the summed loss, the pre-clip gradient norm, the token entropy and
    every scalar the objective reports (e.g. ``clip_fraction``), averaged over response tokens (the sampler
    mismatch ones over the tokens whose sampler log-prob is known; a ``…_max`` / ``…/max`` one is the maximum).

    Under torchrun ``microbatches`` are this rank's share of the step's; the metrics are summed over ranks."""
    optimizer = optimizer or learner.optimizer
    learner.model.train()
    loss_sum, tokens, entropy_sum, known, reported = 0.0, 0, 0.0, 0.0, False
    weighted: dict[str, float] = defaultdict(float)
    maxima: dict[str, float] = {}
    for tb, kwargs in microbatches:
        if not bool(tb["response_mask"].any()):
            if is_sharded(learner.model):  # FSDP: every rank takes part in every microbatch's gradient reduction
                zero_gradient_pass(learner.model, tb["input_ids"])
            continue  # nothing to learn from (every response masked out): no forward, no gradient
        with learner.autocast():
            loss, meta = step_fn(tb["input_ids"], tb["labels"], tb["response_mask"], prefix_len=tb["prefix_len"],
                                 return_token_entropy=True, **kwargs)
        mask = tb["response_mask"]
        n = int(mask.sum())
        loss_sum += float(loss)
        tokens += n
        entropy_sum += float((meta["token_entropy"] * mask).sum())
        n_known = float(meta.get("sampler_known_count", 0.0))
        known += n_known
        reported |= "sampler_known_count" in meta
        for key, value in meta.items():
            if not (isinstance(value, Tensor) and value.ndim == 0 and value.is_floating_point()) or key == "sampler_known_count":
                continue
            if key.endswith("_max") or key.endswith("/max"):
                maxima[key] = max(maxima.get(key, float("-inf")), float(value))
            else:
                weighted[key] += float(value) * (n_known if key in _PER_KNOWN_TOKEN else n)
    loss_sum, tokens, entropy_sum, known, reported, weighted = sum_over_ranks(
        (loss_sum, tokens, entropy_sum, known, int(reported), dict(weighted)))
    every_max = gather(maxima)
    maxima = {k: max(m[k] for m in every_max if k in m) for k in dict.fromkeys(k for m in every_max for k in m)}
    norm = optimizer.step()
    learner.guard.check(loss_sum, norm)
    metrics = {
        "train/loss": loss_sum,
        "train/grad_norm": norm,
        "train/token_entropy": entropy_sum / max(tokens, 1),
        "train/response_tokens": tokens,
        "train/lr": optimizer.lr,
    }
    metrics.update({f"train/{k}": v / max(known if k in _PER_KNOWN_TOKEN else tokens, 1) for k, v in weighted.items()})
    metrics.update({f"train/{k}": v for k, v in maxima.items()})
    if reported:
        metrics["train/sampler_known_fraction"] = known / max(tokens, 1)
    return metrics


_PER_KNOWN_TOKEN = ("logprob_mismatch", "rollout_corr/k3_kl", "sampling/importance_sampling_ratio/mean", "tis_capped_fraction")
"""Mismatch metrics (:func:`core.sampler_mismatch`): means over the tokens whose sampler log-prob is known."""


# ------------------------------------------------------------------------------------------------ SFT


def sft_update(
    learner: Learner, batch: Sequence[SFTExample], *, gradient_accumulation_steps: int,
    optimizer: Optimizer | None = None,
) -> dict[str, float]:
    """One optimizer step of SFT on ``batch``, cut into ``gradient_accumulation_steps`` equal microbatches, or
    with ``--optim.max-tokens-per-microbatch`` packed into microbatches within that token budget.

    Microbatches of similar length pad less, so the batch is sorted by length first; the step's gradient
    does not depend on the split (each microbatch's loss is a sum over its examples divided by the batch's
    size). Under torchrun each rank runs its share of these microbatches (k must be a multiple of the number
    of ranks; a token budget packs a multiple of them).
    """
    k = gradient_accumulation_steps
    split = token_budget_split(learner, [e.prompt for e in batch], [e.response for e in batch])
    if split is None:
        if len(batch) % k:
            raise ValueError(f"a batch of {len(batch)} cannot be cut into {k} equal microbatches")
        micro = len(batch) // k
        order = sorted(range(len(batch)), key=lambda i: len(batch[i].prompt) + len(batch[i].response))
        parts = [order[i * micro : (i + 1) * micro] for i in range(k)]
    else:
        parts = split(range(len(batch)))
    microbatches = [
        (learner.tokenize([batch[i].prompt for i in p], [batch[i].response for i in p]),
         {"gradient_accumulation_steps": _divisor(len(batch), len(p), k if split is None else None)})
        if p else (_empty_microbatch(learner), {})
        for p in share_evenly(parts)
    ]
    return accumulate_and_step(learner, learner.sft_step, microbatches, optimizer=optimizer)


def warm_start(learner: Learner, examples: Sequence[SFTExample], cfg: WarmStartConfig, *, seed: int, run_dir: Path,
               optimizer: Optimizer | None = None, start: int = 0,
               after_step: Callable[[int, float], bool] | None = None) -> int:
    """``cfg.steps`` SFT steps on ``examples`` (r1_zero traces of the training questions) before RL, with their
    own AdamW at ``cfg.lr`` (``optimizer``: that one, e.g. restored from a checkpoint); logged to
    ``run_dir/warm_start_metrics.jsonl``. Nothing when ``cfg.steps`` is 0.

    Resumable: from step ``start + 1`` (the log cut back to ``start``); after each step ``after_step(step,
    seconds)`` may checkpoint, exit on a signal, or return False to end the warm start early (the budget's
    share). Returns the last step done."""
    from shell.runlog import RunLogger

    steps, batch_size = cfg.steps, cfg.batch_size
    if steps <= 0 or start >= steps:
        return min(start, max(steps, 0))
    if not examples:
        # the loops refuse data without solutions before loading (rl_session.load_rl_data); this is what is left
        # after the context filter, or a direct caller's empty list
        raise ValueError("warm start: no SFT traces to train on (no training question has a solution that fits "
                         "the model's context)")
    optimizer = optimizer if optimizer is not None else Optimizer(learner.model, learner.optim, lr=cfg.lr)
    k = warm_start_microbatches(batch_size, world().size)
    logger = (RunLogger(run_dir, logger="none", metrics_name="warm_start_metrics.jsonl", step_keys=("train_step",),
                        resume_step=start if start > 0 else None) if is_main() else None)
    done = start
    try:
        for step in range(start + 1, steps + 1):
            t0 = time.monotonic()
            idx = batch_indices(len(examples), batch_size, step - 1, seed=seed, stream="warm-start")
            m = sft_update(learner, [examples[i] for i in idx], gradient_accumulation_steps=k, optimizer=optimizer)
            if logger is not None:
                logger.log({"train_step": step, **m})
            say(f"[warm start {step}/{steps}] loss {m['train/loss']:.4f}")
            done = step
            if after_step is not None and not after_step(step, time.monotonic() - t0) and step < steps:
                break
    finally:
        if logger is not None:
            logger.close()
    return done


def warm_start_microbatches(batch_size: int, ranks: int = 1) -> int:
    """Microbatches per warm-start step: the largest divisor of ``batch_size`` up to ``batch_size // 8``
    (microbatches of about 8) that is a multiple of ``ranks``, else the smallest such divisor; ``ValueError``
    when ``batch_size`` is not a multiple of ``ranks``."""
    divisors = [k for k in range(ranks, batch_size + 1, ranks) if batch_size % k == 0]
    if not divisors:
        raise ValueError(f"--warm-start.batch-size ({batch_size}) must be a multiple of the number of ranks ({ranks})")
    below = [k for k in divisors if k <= max(1, batch_size // 8)]
    return below[-1] if below else divisors[0]


# ------------------------------------------------------------------------------------------------ GRPO


@dataclass(frozen=True)
class PolicyGradientSettings:
    """What a policy-gradient update on one rollout batch needs (GRPO's flags)."""

    loss_type: PolicyLossType
    group_size: int
    train_batch_size: int
    gradient_accumulation_steps: int
    epochs_per_rollout_batch: int = 1
    cliprange: float = 0.2
    cliprange_high: float | None = None
    """The upper epsilon of grpo_clip / gspo / cispo (DAPO's clip-higher); None: ``cliprange``."""
    length_normalization: LengthNormalization = "masked_mean"
    normalize_constant: float | None = None
    """``masked_normalize``'s constant (the maximum generation length)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (0: none)."""
    tis_cap: float = 0.0
    """Truncated importance sampling of the sampler/trainer mismatch: the weights' cap (0: off)."""
    mask_truncated: bool = False
    """Responses that hit the token limit (finish reason "length") get no loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0: off)."""
    temperature: float = 1.0
    """The rollout temperature: old, new and reference log-probs are those of ``softmax(logits / temperature)``."""

    @property
    def needs_old_log_probs(self) -> bool:
        """The objective needs the sampling policy's log-probs (:attr:`core.ObjectiveSettings.needs_old_log_probs`)."""
        return self.objective(1.0).needs_old_log_probs

    def objective(self, normalize_constant: float | None) -> ObjectiveSettings:
        """The microbatch objective's settings, with ``normalize_constant`` (a train batch's for ``token_mean``)."""
        return ObjectiveSettings(
            loss_type=self.loss_type, gradient_accumulation_steps=self.gradient_accumulation_steps,
            length_normalization=self.length_normalization, normalize_constant=normalize_constant,
            cliprange=self.cliprange, cliprange_high=self.cliprange_high, kl_coef=self.kl_coef, tis_cap=self.tis_cap,
            entropy_coef=self.entropy_coef,
        )

    def off_policy(self, rollout_batch_size: int) -> bool:
        """More than one optimizer step per rollout batch: later steps train on another policy's samples."""
        return self.epochs_per_rollout_batch > 1 or self.train_batch_size < rollout_batch_size


def plan_microbatches(n: int, settings: PolicyGradientSettings, *, seed: int,
                      split: Split | None = None) -> list[list[list[list[int]]]]:
    """Row indices of a rollout batch of ``n`` responses, as epochs → train batches → microbatches.

    On-policy (one train batch, one epoch) keeps rollout order, so a microbatch of ``group_size`` rows is one
    group sharing its prompt. Off-policy, each epoch visits the groups in its own seeded order (whole groups
    stay together); every row appears exactly once per epoch. ``split`` (:func:`token_budget_split`) cuts each
    train batch into microbatches instead of ``gradient_accumulation_steps`` equal ones.
    """
    g = settings.group_size
    if n % g or n % settings.train_batch_size or settings.train_batch_size % settings.gradient_accumulation_steps:
        raise ValueError(f"{n} rollouts do not split into groups of {g}, train batches of {settings.train_batch_size} "
                         f"and {settings.gradient_accumulation_steps} microbatches each")
    micro = settings.train_batch_size // settings.gradient_accumulation_steps
    epochs = []
    for e in range(settings.epochs_per_rollout_batch):
        groups = list(range(n // g))
        if settings.off_policy(n):
            groups = [groups[i] for i in seeded_permutation(len(groups), derive_seed(seed, "microbatch-order", e))]
        order = [q * g + j for q in groups for j in range(g)]
        batches = []
        for b in range(0, n, settings.train_batch_size):
            rows = order[b : b + settings.train_batch_size]
            batches.append([rows[m : m + micro] for m in range(0, len(rows), micro)] if split is None else split(rows))
        epochs.append(batches)
    return epochs


def _policy_log_probs(learner: Learner, tokenized: Sequence[dict[str, Any]], *, temperature: float
                      ) -> list[dict[str, Tensor]]:
    """Log-probs at ``temperature`` of tokenized batches under the current policy, in inference mode (under
    torchrun with the policy gathered once for all of them)."""
    learner.model.eval()
    out = []
    with gathered(learner.model), torch.inference_mode(), learner.autocast():
        for tb in tokenized:
            r = learner.log_probs(tb["input_ids"], tb["labels"], prefix_len=tb["prefix_len"], temperature=temperature)
            out.append({k: v.float().clone() for k, v in r.items()})
    return out


class Reference:
    """A frozen copy of the policy at the start of RL (the KL penalty's reference), kept on disk in the run
    folder so that a resumed run compares against the same weights."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig) -> None:
        self.model = model.eval().requires_grad_(False)
        self.log_probs = make_log_probs_fn(self.model, compile=optim.compile, share_prompt_prefix=optim.share_prompt_prefix)

    @classmethod
    def base(cls, learner: Learner) -> Reference:
        """A LoRA policy's frozen base as the reference: the policy itself with its adapter switched off
        (:func:`shell.lora.adapter_disabled`) while the reference log-probs run; no second copy, nothing saved."""
        from shell.lora import adapter_disabled

        ref = cls.__new__(cls)
        ref.model = learner.model
        policy_log_probs = make_log_probs_fn(learner.model, compile=learner.optim.compile,
                                             share_prompt_prefix=learner.optim.share_prompt_prefix)

        def log_probs(*args: Any, **kwargs: Any) -> dict[str, Tensor]:
            was_training = learner.model.training
            learner.model.eval()
            try:
                with adapter_disabled(learner.model):
                    return policy_log_probs(*args, **kwargs)
            finally:
                learner.model.train(was_training)

        ref.log_probs = log_probs
        return ref

    @classmethod
    def of(cls, learner: Learner) -> Reference:
        """A frozen copy of the learner's current policy (whole on every rank under torchrun)."""
        return cls(unsharded_copy(learner.model), learner.optim)

    @classmethod
    def load(cls, folder: Path, learner: Learner) -> Reference:
        """The reference saved in ``folder`` (by :meth:`save`), in a copy of the learner's model."""
        from shell.checkpoint import load_model_weights

        model = unsharded_copy(learner.model)
        load_model_weights(model, folder)
        return cls(model, learner.optim)

    def save(self, folder: Path) -> None:
        from shell.checkpoint import save_pretrained_atomic

        save_pretrained_atomic(self.model, None, folder)


def _sampler_tensors(tb: dict[str, Any], token_ids: Sequence[Sequence[int] | None],
                     log_probs: Sequence[Sequence[float] | None]) -> tuple[Tensor, Tensor]:
    """The sampler's per-token log-probs laid out like ``tb`` (batch, seq), and where they are known: on the
    rows whose re-tokenized response is exactly the sampled tokens (a trailing eos, kept by the sampler but not
    in the text, is dropped)."""
    mask = tb["response_mask"]
    values = torch.zeros(mask.shape, dtype=torch.float32)
    known = torch.zeros(mask.shape, dtype=torch.bool)
    for r, (ids, lps) in enumerate(zip(token_ids, log_probs)):
        if ids is None or lps is None:
            continue
        positions = mask[r].nonzero().squeeze(-1).cpu()
        labels = tb["labels"][r, positions].tolist()
        ids, lps = list(ids), list(lps)
        if len(ids) == len(labels) + 1 and ids[:-1] == labels:  # sampled eos, not part of the text
            ids, lps = ids[:-1], lps[:-1]
        if ids == labels:
            values[r, positions] = torch.tensor(lps, dtype=torch.float32)
            known[r, positions] = True
    device = mask.device
    return values.to(device), known.to(device)


def grpo_update(
    learner: Learner, rollouts: Rollouts, raw_rewards: Tensor, advantages: Tensor, settings: PolicyGradientSettings,
    *, seed: int, reference: Reference | None = None,
) -> list[dict[str, float]]:
    """Epochs × train batches of policy-gradient steps on one rollout batch; ``train/`` metrics per optimizer step.

    Off-policy losses that need them get the old log-probs once, before the first step (the sampling
    policy's, under inference mode); on-policy the forward's own detached log-probs serve. With a
    ``reference`` (``kl_coef > 0``) its log-probs are computed once too. Every log-prob (old, new, reference) is
    that of ``softmax(logits / settings.temperature)``, the distribution the rollouts were sampled from. Every
    step logs the sampler/trainer mismatch where the sampler reported log-probs (:func:`core.sampler_mismatch`);
    ``tis_cap > 0`` corrects for it.

    Under torchrun every rank holds the whole rollout batch and runs its share of each train batch's
    microbatches (``gradient_accumulation_steps`` must be a multiple of the number of ranks; a token budget,
    ``--optim.max-tokens-per-microbatch``, packs a multiple of them).
    """
    n = len(rollouts)
    split = token_budget_split(learner, rollouts.prompts, rollouts.responses)
    plan = plan_microbatches(n, settings, seed=seed, split=split)
    keys = [tuple(mb) for epoch in plan for batch in epoch for mb in batch]
    tokenized = {k: learner.tokenize([rollouts.prompts[i] for i in k], [rollouts.responses[i] for i in k])
                 if k else _empty_microbatch(learner) for k in dict.fromkeys(keys)}
    truncated = [reason == "length" for reason in rollouts.finish_reasons] if settings.mask_truncated else [False] * n
    for k, tb in tokenized.items():
        rows = [j for j, i in enumerate(k) if truncated[i]]
        if rows:
            tb["response_mask"][rows] = False
    off_policy = settings.off_policy(n)
    needs_old = settings.needs_old_log_probs
    temperature = settings.temperature
    order = list(dict.fromkeys(tuple(mb) for epoch in plan for batch in epoch for mb in share_evenly(batch) if mb))
    old: dict[tuple[int, ...], Tensor] = {}
    if needs_old and off_policy:
        old = {k: r["log_probs"] for k, r in zip(order, _policy_log_probs(learner, [tokenized[k] for k in order],
                                                                          temperature=temperature))}
    ref: dict[tuple[int, ...], Tensor] = {}
    if reference is not None and settings.kl_coef > 0:
        with torch.inference_mode(), learner.autocast():
            for k in order:
                tb = tokenized[k]
                ref[k] = reference.log_probs(tb["input_ids"], tb["labels"], prefix_len=tb["prefix_len"],
                                             temperature=temperature)["log_probs"].float().clone()
    device = learner.device
    metrics = []
    for epoch in plan:
        for batch in epoch:
            batch_tokens = sum(int(tokenized[tuple(mb)]["response_mask"].sum()) for mb in batch)
            constant = float(max(1, batch_tokens)) if settings.length_normalization == "token_mean" else settings.normalize_constant
            objective = settings.objective(constant)
            step_rows = sum(len(mb) for mb in batch)
            microbatches = []
            for mb in share_evenly(batch):
                tb = tokenized[tuple(mb)]
                if not mb:
                    microbatches.append((tb, {}))
                    continue
                idx = torch.tensor(mb)
                sampler: dict[str, Tensor] = {}
                if rollouts.sampler_log_probs and any(rollouts.sampler_log_probs[i] is not None for i in mb):
                    values, known = _sampler_tensors(tb, [rollouts.sampler_token_ids[i] for i in mb],
                                                     [rollouts.sampler_log_probs[i] for i in mb])
                    sampler = {"sampler_log_probs": values, "sampler_mask": known}
                tensors = PolicyGradientTensors(
                    advantages=advantages[idx].unsqueeze(-1).to(device), raw_rewards=raw_rewards[idx].unsqueeze(-1).to(device),
                    old_log_probs=old.get(tuple(mb)), on_policy=not old, ref_log_probs=ref.get(tuple(mb)),
                    accumulation_divisor=None if split is None else step_rows / len(mb), **sampler,
                )
                microbatches.append((tb, {"settings": objective, "tensors": tensors, "temperature": temperature}))
            m = accumulate_and_step(learner, learner.grpo_step, microbatches)
            m.setdefault("train/clip_fraction", 0.0)
            m["train/truncated_fraction"] = sum(truncated[i] for mb in batch for i in mb) / step_rows
            metrics.append(m)
    return metrics


def response_entropies(learner: Learner, prompts: Sequence[str], responses: Sequence[str], *, microbatch: int,
                       temperature: float = 1.0) -> list[float]:
    """Each response's mean token entropy of ``softmax(logits / temperature)`` under the learner's policy
    (:func:`shell.steps.mean_token_entropies` with its log-probs function and autocast): the rollout and
    evaluation entropy where the sampler reports none. Under torchrun each rank scores its share of the
    responses and every rank gets them all."""
    rows = share(range(len(responses)))
    with gathered(learner.model):
        out = mean_token_entropies(learner.model, learner.tokenizer, [prompts[i] for i in rows],
                                   [responses[i] for i in rows], microbatch=microbatch,
                                   log_probs=learner.log_probs, autocast_bf16=learner.optim.autocast_bf16,
                                   temperature=temperature)
    return unshare(out)

