"""Microbatch train steps: the pure objectives from ``core`` plus the policy forward and ``backward``.

* :func:`sft_microbatch_train_step`, :func:`grpo_microbatch_train_step` -- the reference interface:
  log-probs in, loss out, ``backward`` called.
* :func:`make_train_step` -- a whole microbatch step on a model (forward, log-probs, objective,
  ``backward``), ``torch.compile``'d when asked: the step every training loop runs.
* :func:`make_log_probs_fn` -- the same forward without a loss, for old and reference log-probs.
* :func:`tokenize_batch` -- a tokenized microbatch plus the prompt prefix its rows share.
* :func:`mean_token_entropies` -- each response's mean token entropy under a model (where a sampler reports none).

Per-token tensors (log-probs, entropies, old and reference log-probs, masks) always cover every position
of the tokenized batch: where a shared prompt prefix is run once apart, its positions hold 0
in the outputs and are sliced off the inputs inside the step, so every caller sees one shape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from core import (
    ObjectiveInputs, ObjectiveSettings, grpo_microbatch_loss, label_log_probs, masked_mean, policy_gradient_objective,
    sft_microbatch_loss, tokenize_prompt_and_output,
)
from shell.fsdp import is_sharded
from shell.models import cache_kwarg

__all__ = [
    "PolicyGradientTensors",
    "PrefixedModel",
    "activation_checkpointing",
    "common_prefix_len",
    "compiled_graph_count",
    "grpo_microbatch_train_step",
    "make_log_probs_fn",
    "make_train_step",
    "mean_token_entropies",
    "sft_microbatch_train_step",
    "tokenize_batch",
]


def sft_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""One SFT microbatch: compute the loss, call ``backward``, return the loss.

    .. math::  L = -\frac{1}{k}\,\frac{1}{B}\sum_b \frac{1}{c}\sum_t m_{bt}\,\log\pi_{bt}

    Args:
        policy_log_probs: ``(batch, seq)`` log-probs of the labels (requires grad).
        response_mask: ``(batch, seq)`` true on response tokens.
        gradient_accumulation_steps: ``k``, microbatches per optimizer step.
        normalize_constant: ``c``, divides the per-example sum.

    Returns:
        the scalar loss (as back-propagated, i.e. already divided by ``k``; detached) and metadata
        (``num_response_tokens``; ``nll_per_token``, the mean NLL over response tokens).
    """
    loss = sft_microbatch_loss(
        policy_log_probs,
        response_mask,
        gradient_accumulation_steps=gradient_accumulation_steps,
        normalize_constant=normalize_constant,
    )
    loss.backward()
    with torch.no_grad():
        metadata = {
            "num_response_tokens": response_mask.sum(),
            "nll_per_token": -masked_mean(policy_log_probs.detach(), response_mask),
        }
    return loss.detach(), metadata


def grpo_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    loss_type: str,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    *,
    length_normalization: str = "masked_mean",
    normalize_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    r"""One GRPO microbatch: per-token policy-gradient loss, length-normalised, ``backward``.

    .. math::  L = \frac{1}{k}\,\frac{1}{B}\sum_b \operatorname{agg}_t(m_{bt}\,\ell_{bt})

    where ``\ell`` is :func:`core.compute_policy_gradient_loss` of ``loss_type`` and ``agg`` is
    ``masked_mean`` over the sequence (default) or ``masked_normalize`` by ``normalize_constant``
    (Dr. GRPO: the maximum generation length).

    Args:
        policy_log_probs: ``(batch, seq)`` (requires grad).
        response_mask: ``(batch, seq)`` true on response tokens.
        gradient_accumulation_steps: ``k``.
        loss_type: ``no_baseline``, ``reinforce_with_baseline``, ``grpo_clip`` or ``grpo_no_clip``.
        raw_rewards: ``(batch, 1)``; advantages: ``(batch, 1)``; old_log_probs: ``(batch, seq)``;
            cliprange: float — as each loss type needs.
        length_normalization: ``masked_mean`` or ``masked_normalize``.
        normalize_constant: the constant for ``masked_normalize``.

    Returns:
        the scalar loss (divided by ``k``, detached) and metadata from the loss
        (``clip_fraction`` over response tokens for ``grpo_clip``).
    """
    loss, metadata = grpo_microbatch_loss(
        policy_log_probs,
        response_mask,
        gradient_accumulation_steps=gradient_accumulation_steps,
        loss_type=loss_type,
        raw_rewards=raw_rewards,
        advantages=advantages,
        old_log_probs=old_log_probs,
        cliprange=cliprange,
        length_normalization=length_normalization,
        normalize_constant=normalize_constant,
    )
    loss.backward()
    return loss.detach(), metadata


# ---------------------------------------------------------------------------------------------- batches


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every row."""
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


def tokenize_batch(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, device: torch.device | str) -> dict[str, Any]:
    """``tokenize_prompt_and_output`` on ``device`` (``input_ids``, ``labels``, ``response_mask``: (batch, seq))
    plus ``prefix_len``, the length of the prompt prefix shared by the whole batch that a step may run once
    apart (it never covers a response label)."""
    batch = tokenize_prompt_and_output(list(prompts), list(responses), tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    prefix = min(common_prefix_len(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    out: dict[str, Any] = {k: v.to(device) for k, v in batch.items()}
    out["prefix_len"] = max(0, prefix)
    return out


# ---------------------------------------------------------------------------------------------- forward


class PrefixedModel(torch.nn.Module):
    """``model`` on the suffix of a batch, after its shared prefix ``prefix_ids`` (1, p) has been run once into a
    KV cache repeated for every row. Where gradients are on, the prefix keeps its gradient (the repeat sums the
    rows' gradients back into it), so the loss and gradient are the whole batch's exactly."""

    def __init__(self, model: torch.nn.Module, prefix_ids: Tensor):
        super().__init__()
        self.model = model
        self.prefix_ids = prefix_ids

    def forward(self, input_ids: Tensor) -> Any:
        kw = cache_kwarg(self.model)
        out = self.model(self.prefix_ids, use_cache=True)  # with gradient where it is on: one exact backward
        if is_sharded(self.model):  # (scoring only) FSDP regathers its weights: autocast's copies must not serve below
            torch.clear_autocast_cache()
        cache = out.past_key_values
        cache.batch_repeat_interleave(input_ids.shape[0])
        p = self.prefix_ids.shape[1]
        positions = torch.arange(p, p + input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return self.model(input_ids, position_ids=positions, use_cache=True, **{kw: cache})


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, ``model`` (a transformers model) recomputes each layer's activations in backward."""
    if not enabled:
        yield
        return
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _plan(model: torch.nn.Module, input_ids: Tensor, prefix_len: int, *, share_prompt_prefix: bool,
          checkpoint_above_tokens: int | None) -> tuple[bool, int]:
    """(activation checkpointing?, prefix positions run once): a long training microbatch is checkpointed
    and runs whole; otherwise the shared prefix (when on, at least 2 tokens and 2 rows) is split off. A training
    microbatch of an FSDP-sharded policy runs whole too: the prefix's gradient would reach its weights through
    the KV cache, past FSDP's backward hooks (a segfault in backward)."""
    grad = torch.is_grad_enabled()
    checkpoint = (
        checkpoint_above_tokens is not None and input_ids.numel() > checkpoint_above_tokens
        and grad and getattr(model, "supports_gradient_checkpointing", False)
    )
    whole = checkpoint or (grad and is_sharded(model))
    p = prefix_len if share_prompt_prefix and input_ids.shape[0] > 1 and not whole else 0
    return checkpoint, (p if p >= 2 else 0)


def _full_width(out: dict[str, Tensor], p: int) -> dict[str, Tensor]:
    """Outputs of positions ``p:`` padded with zeros at the prefix positions."""
    if p == 0:
        return out
    return {k: torch.cat([v.new_zeros((v.shape[0], p)), v], dim=1) for k, v in out.items()}


def _forward(model: torch.nn.Module) -> Callable[..., dict[str, Tensor]]:
    def forward(prefix_ids: Tensor | None, input_ids: Tensor, labels: Tensor, return_token_entropy: bool,
                temperature: float = 1.0, entropy_grad: bool = False) -> dict[str, Tensor]:
        target = model if prefix_ids is None else PrefixedModel(model, prefix_ids)
        return label_log_probs(target(input_ids).logits, labels, temperature=temperature,
                               return_token_entropy=return_token_entropy, entropy_grad=entropy_grad)

    return forward


@dataclass(frozen=True)
class PolicyGradientTensors:
    """One policy-gradient microbatch's tensors besides what the forward computes: ``advantages`` and
    ``raw_rewards`` ``(batch, 1)``; per-token ``(batch, seq)`` ones over every position of the tokenized batch.

    ``old_log_probs`` None with ``on_policy``: the sampling policy is the current one, so the forward's own
    detached log-probs serve (the ratio is 1, with its gradient). ``sampler_log_probs`` / ``sampler_mask``: the
    sampler's log-probs and where they are known (mismatch diagnostics, TIS). ``ref_log_probs``: the KL
    penalty's reference. ``accumulation_divisor``: this microbatch's ``k`` under a token budget (the step's rows
    over its own; :attr:`core.ObjectiveInputs.accumulation_divisor`), None with equal microbatches."""

    advantages: Tensor | None = None
    raw_rewards: Tensor | None = None
    old_log_probs: Tensor | None = None
    on_policy: bool = False
    sampler_log_probs: Tensor | None = None
    sampler_mask: Tensor | None = None
    ref_log_probs: Tensor | None = None
    accumulation_divisor: float | None = None

    def after(self, p: int) -> PolicyGradientTensors:
        """The per-token tensors at positions ``p:`` (a shared prefix of ``p`` positions run apart)."""
        return replace(self, **{f.name: getattr(self, f.name)[:, p:] for f in fields(self)
                                if f.name in _PER_TOKEN and getattr(self, f.name) is not None})

    def inputs(self, out: dict[str, Tensor], response_mask: Tensor, settings: ObjectiveSettings) -> ObjectiveInputs:
        """The objective's inputs from the forward's ``out`` (log-probs, entropy)."""
        lp = out["log_probs"]
        old = lp.detach() if self.old_log_probs is None and self.on_policy else self.old_log_probs
        return ObjectiveInputs(lp, response_mask, advantages=self.advantages, raw_rewards=self.raw_rewards,
                               old_log_probs=old, sampler_log_probs=self.sampler_log_probs,
                               sampler_mask=self.sampler_mask, ref_log_probs=self.ref_log_probs,
                               token_entropy=out.get("token_entropy") if settings.entropy_coef > 0 else None,
                               accumulation_divisor=self.accumulation_divisor)


_PER_TOKEN = ("old_log_probs", "sampler_log_probs", "sampler_mask", "ref_log_probs")


def _sft_objective(out: dict[str, Tensor], response_mask: Tensor, *, gradient_accumulation_steps: int | float,
                   normalize_constant: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    return sft_microbatch_loss(out["log_probs"], response_mask, gradient_accumulation_steps=gradient_accumulation_steps,
                               normalize_constant=normalize_constant), {}


def _grpo_objective(out: dict[str, Tensor], response_mask: Tensor, *, settings: ObjectiveSettings,
                    tensors: PolicyGradientTensors) -> tuple[Tensor, dict[str, Tensor]]:
    return policy_gradient_objective(tensors.inputs(out, response_mask, settings), settings=settings)


_OBJECTIVES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "sft": _sft_objective,
    "grpo": _grpo_objective,
}


def _compile(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``fn``, or a callable that calls ``torch.compile(fn, dynamic=True)`` on first use and then always calls
    what it returned (a step that is never used is never compiled)."""
    if not enabled:
        return fn
    compiled: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True))
        return compiled[0](*args, **kwargs)

    return call


def make_train_step(
    model: torch.nn.Module,
    objective: Literal["sft", "grpo"],
    *,
    compile: bool = False,
    share_prompt_prefix: bool = False,
    checkpoint_above_tokens: int | None = None,
) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """A whole microbatch step on ``model``: forward, log-probs, objective, ``backward``.

    ``objective`` is ``"sft"`` (:func:`core.sft_microbatch_loss`) or ``"grpo"``
    (:func:`core.policy_gradient_objective`). With ``compile=True`` the forward, the log-probs and the loss are
    one ``torch.compile``'d function with dynamic shapes (one graph for every batch size and sequence
    length; a separate one for a microbatch with a shared prefix and one for an activation-checkpointed
    microbatch); ``backward`` runs through the compiled graph.

    ``share_prompt_prefix``: a batch's shared prompt prefix (``prefix_len``) is run once (with its gradient).
    ``checkpoint_above_tokens``: a microbatch of more (padded) tokens is run with activation checkpointing
    (and whole).

    Returns:
        ``step(input_ids, labels, response_mask, *, prefix_len=0, return_token_entropy=False, temperature=1.0,
        **objective) -> (loss, metadata)``: ``input_ids``, ``labels``, ``response_mask`` are ``(batch, seq)``; the
        log-probs (and entropy) are those of ``softmax(logits / temperature)``, the sampler's distribution.
        ``objective``: SFT's ``gradient_accumulation_steps`` (and ``normalize_constant``); GRPO's ``settings``
        (:class:`core.ObjectiveSettings`) and ``tensors`` (:class:`PolicyGradientTensors`, its per-token
        tensors cut to the positions the forward covers). ``loss`` is detached; metadata holds the objective's
        metrics (detached), ``log_probs`` (batch, seq) and, when asked, ``token_entropy`` (batch, seq).
    """
    if objective not in _OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(_OBJECTIVES)}")
    loss_fn = _OBJECTIVES[objective]
    forward = _forward(model)

    def forward_and_loss(prefix_ids, input_ids, labels, response_mask, return_token_entropy, temperature, loss_kwargs):
        settings = loss_kwargs.get("settings")
        entropy_grad = settings is not None and settings.entropy_coef > 0
        out = forward(prefix_ids, input_ids, labels, return_token_entropy or entropy_grad, temperature, entropy_grad)
        loss, meta = loss_fn(out, response_mask, **loss_kwargs)
        return loss, out, meta

    compiled = _compile(forward_and_loss, compile)

    def step(input_ids, labels, response_mask, *, prefix_len=0, return_token_entropy=False, temperature=1.0,
             **loss_kwargs):
        checkpoint, p = _plan(model, input_ids, prefix_len, share_prompt_prefix=share_prompt_prefix,
                              checkpoint_above_tokens=checkpoint_above_tokens)
        prefix_ids = input_ids[:1, :p] if p else None
        if p:
            input_ids, labels, response_mask = input_ids[:, p:], labels[:, p:], response_mask[:, p:]
            loss_kwargs = {k: (v.after(p) if isinstance(v, PolicyGradientTensors) else v) for k, v in loss_kwargs.items()}
        with activation_checkpointing(model, checkpoint):
            loss, out, meta = compiled(prefix_ids, input_ids, labels, response_mask, return_token_entropy, temperature,
                                       loss_kwargs)
            loss.backward()
        metadata: dict[str, Any] = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in meta.items()}
        metadata.update(_full_width({k: v.detach() for k, v in out.items()}, p))
        return loss.detach(), metadata

    return step


def make_log_probs_fn(
    model: torch.nn.Module, *, compile: bool = False, share_prompt_prefix: bool = False
) -> Callable[..., dict[str, Tensor]]:
    """The forward of :func:`make_train_step` without a loss (call it under ``torch.inference_mode``): old
    log-probs of off-policy GRPO, reference log-probs, the policy's entropy on sampled responses.

    Returns:
        ``fn(input_ids, labels, *, prefix_len=0, return_token_entropy=False, temperature=1.0) -> {"log_probs":
        (batch, seq) [, "token_entropy": (batch, seq)]}`` over every position (0 on a shared prefix), of
        ``softmax(logits / temperature)``.
    """
    compiled = _compile(_forward(model), compile)

    def log_probs(input_ids, labels, *, prefix_len=0, return_token_entropy=False, temperature=1.0):
        _, p = _plan(model, input_ids, prefix_len, share_prompt_prefix=share_prompt_prefix, checkpoint_above_tokens=None)
        prefix_ids = input_ids[:1, :p] if p else None
        out = compiled(prefix_ids, input_ids[:, p:], labels[:, p:], return_token_entropy, temperature)
        return _full_width(out, p)

    return log_probs


def mean_token_entropies(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *, microbatch: int,
    log_probs: Callable[..., dict[str, Tensor]] | None = None, autocast_bf16: bool = False, temperature: float = 1.0,
) -> list[float]:
    """Each response's mean token entropy under ``model`` (inference mode, ``microbatch`` rows at a time): the
    rollout and evaluation entropy where the sampler reports none (vLLM).

    ``log_probs``: the model's :func:`make_log_probs_fn` (e.g. a learner's compiled one; default an eager one);
    ``autocast_bf16``: score in bf16 autocast; ``temperature``: the entropy of ``softmax(logits / temperature)``
    (the distribution the responses were sampled from). An empty response has entropy 0.
    """
    fn = log_probs if log_probs is not None else make_log_probs_fn(model)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for i in range(0, len(responses), max(1, microbatch)):
            tb = tokenize_batch(prompts[i : i + microbatch], responses[i : i + microbatch], tokenizer, device)
            with torch.inference_mode(), autocast:
                ent = fn(tb["input_ids"], tb["labels"], prefix_len=tb["prefix_len"], return_token_entropy=True,
                         temperature=temperature)["token_entropy"]
            mask = tb["response_mask"]
            per = (ent.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            out.extend(float(e) for e in per)
    finally:
        model.train(was_training)
    return out


def compiled_graph_count() -> int:
    """Graphs ``torch.compile`` has built in this process so far (each a compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
