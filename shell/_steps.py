"""Microbatch train steps: the pure objectives from ``core`` plus ``backward`` (so they live in the shell)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from core import get_response_log_probs, grpo_microbatch_loss, masked_mean, sft_microbatch_loss


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


def _sft_objective(policy_log_probs: Tensor, response_mask: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    return sft_microbatch_loss(policy_log_probs, response_mask, **kwargs), {}


_OBJECTIVES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {
    "sft": _sft_objective,
    "grpo": grpo_microbatch_loss,
}


def make_train_step(
    model: torch.nn.Module, objective: str, *, compile: bool = False
) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """A whole microbatch step on ``model``: forward, log-probs, objective, ``backward``.

    ``objective`` is ``"sft"`` (:func:`core.sft_microbatch_loss`) or ``"grpo"``
    (:func:`core.grpo_microbatch_loss`). With ``compile=True`` the forward pass and the loss are
    ``torch.compile``'d with dynamic shapes; ``backward`` runs through the compiled graph.

    Returns:
        ``step(input_ids, labels, response_mask, *, return_token_entropy=False, **objective_kwargs)
        -> (loss, metadata)``: ``input_ids``, ``labels``, ``response_mask`` are ``(batch, seq)``;
        the objective's keyword arguments (``gradient_accumulation_steps``, ``loss_type``,
        ``advantages`` (batch, 1), ...) pass through. ``loss`` is detached; metadata holds the
        objective's metadata (detached), ``log_probs`` (batch, seq) and, when asked,
        ``token_entropy`` (batch, seq).
    """
    if objective not in _OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(_OBJECTIVES)}")
    loss_fn = _OBJECTIVES[objective]

    def forward(input_ids, labels, response_mask, return_token_entropy, loss_kwargs):
        out = get_response_log_probs(model, input_ids, labels, return_token_entropy=return_token_entropy)
        loss, meta = loss_fn(out["log_probs"], response_mask, **loss_kwargs)
        return loss, out, meta

    fwd = torch.compile(forward, dynamic=True) if compile else forward

    def step(input_ids, labels, response_mask, *, return_token_entropy=False, **loss_kwargs):
        loss, out, meta = fwd(input_ids, labels, response_mask, return_token_entropy, loss_kwargs)
        loss.backward()
        metadata: dict[str, Any] = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in meta.items()}
        metadata.update({k: v.detach() for k, v in out.items()})
        return loss.detach(), metadata

    return step
