"""Policy-gradient losses (per token) and the microbatch objectives built from them."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from core._masking import masked_mean, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]
"""The per-token policy-gradient losses of :func:`compute_policy_gradient_loss` (a type tyro checks at parse time)."""
LengthNormalization = Literal["masked_mean", "masked_normalize"]
"""How :func:`grpo_microbatch_loss` aggregates a response's per-token losses."""

LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LENGTH_NORMALIZATIONS: tuple[str, ...] = get_args(LengthNormalization)


def _check_per_sequence(name: str, value: Tensor, log_probs: Tensor) -> None:
    # (batch,) against (batch, seq) would broadcast along seq when batch == seq: refuse it.
    if value.ndim != 2 or value.shape[0] != log_probs.shape[0] or value.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (batch, 1) = ({log_probs.shape[0]}, 1), got {tuple(value.shape)}"
        )


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
) -> Float[Tensor, "batch seq"]:
    r"""REINFORCE per-token loss.

    .. math::  \ell_t = -A \, \log \pi_\theta(o_t \mid q, o_{<t})

    Args:
        raw_rewards_or_advantages: ``(batch, 1)`` reward or advantage of each sequence.
        policy_log_probs: ``(batch, seq)`` per-token log-probabilities.

    Returns:
        ``(batch, seq)`` per-token loss.
    """
    _check_per_sequence("raw_rewards_or_advantages", raw_rewards_or_advantages, policy_log_probs)
    return -raw_rewards_or_advantages.to(policy_log_probs.dtype) * policy_log_probs


def compute_grpo_clip_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    cliprange: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""GRPO-Clip (PPO-style) per-token loss.

    .. math::  r_t = \exp(\log\pi_\theta - \log\pi_{\theta_\mathrm{old}}), \quad
               \ell_t = -\min\big(r_t A, \operatorname{clip}(r_t, 1-\epsilon, 1+\epsilon) A\big)

    Args:
        advantages: ``(batch, 1)`` per-sequence advantages.
        policy_log_probs: ``(batch, seq)`` log-probs under the policy being trained.
        old_log_probs: ``(batch, seq)`` log-probs under the policy that sampled (no gradient).
        cliprange: ``\epsilon``.

    Returns:
        ``(batch, seq)`` per-token loss and metadata: ``clipped`` (batch, seq) bool, true where the
        clipped term is the smaller one (the min takes it, so the token gets no gradient);
        ``clip_fraction`` scalar, the mean of ``clipped`` over all positions; ``ratio`` (batch, seq).
    """
    _check_per_sequence("advantages", advantages, policy_log_probs)
    if old_log_probs.shape != policy_log_probs.shape:
        raise ValueError(
            f"old_log_probs {tuple(old_log_probs.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}"
        )
    a = advantages.to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * a
    loss = -torch.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    return loss, {
        "clipped": is_clipped,
        "clip_fraction": is_clipped.float().mean(),
        "ratio": ratio.detach(),
    }


def compute_policy_gradient_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    loss_type: str,
    raw_rewards: Float[Tensor, "batch 1"] | None = None,
    advantages: Float[Tensor, "batch 1"] | None = None,
    old_log_probs: Float[Tensor, "batch seq"] | None = None,
    cliprange: float | None = None,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""Per-token policy-gradient loss of the chosen type.

    .. math::
        \ell_t = \begin{cases}
          -R\,\log\pi_t & \text{no\_baseline} \\
          -A\,\log\pi_t & \text{reinforce\_with\_baseline} \\
          -\min(r_t A, \operatorname{clip}(r_t, 1\pm\epsilon) A) & \text{grpo\_clip} \\
          -r_t A & \text{grpo\_no\_clip}
        \end{cases}, \quad r_t = \pi_t / \pi_{\mathrm{old},t}

    Args:
        policy_log_probs: ``(batch, seq)``.
        loss_type: one of ``no_baseline``, ``reinforce_with_baseline``, ``grpo_clip``, ``grpo_no_clip``.
        raw_rewards: ``(batch, 1)``, needed by ``no_baseline``.
        advantages: ``(batch, 1)``, needed by the other three.
        old_log_probs: ``(batch, seq)``, needed by ``grpo_clip`` and ``grpo_no_clip``.
        cliprange: needed by ``grpo_clip``.

    Returns:
        ``(batch, seq)`` per-token loss and a metadata dict of tensors.

    Raises:
        ValueError: unknown ``loss_type`` or a missing argument.
    """

    def need(name: str, value: object) -> None:
        if value is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}")

    if loss_type == "no_baseline":
        need("raw_rewards", raw_rewards)
        return compute_naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        need("advantages", advantages)
        return compute_naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        need("advantages", advantages)
        need("old_log_probs", old_log_probs)
        need("cliprange", cliprange)
        return compute_grpo_clip_loss(advantages, policy_log_probs, old_log_probs, cliprange)
    if loss_type == "grpo_no_clip":
        need("advantages", advantages)
        need("old_log_probs", old_log_probs)
        _check_per_sequence("advantages", advantages, policy_log_probs)
        if old_log_probs.shape != policy_log_probs.shape:
            raise ValueError(
                f"old_log_probs {tuple(old_log_probs.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}"
            )
        ratio = torch.exp(policy_log_probs - old_log_probs)
        return -ratio * advantages.to(policy_log_probs.dtype), {"ratio": ratio.detach()}
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def sft_microbatch_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> Float[Tensor, ""]:
    r"""The SFT microbatch objective (negative log-likelihood of the response tokens).

    .. math::  L = -\frac{1}{k}\,\frac{1}{B}\sum_{b=1}^{B} \frac{1}{c}\sum_t m_{bt} \log\pi_{bt}

    with ``k = gradient_accumulation_steps`` and ``c = normalize_constant``.

    Args:
        policy_log_probs: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` true on response tokens.

    Returns:
        scalar loss.
    """
    per_example = masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)
    return -per_example.mean() / gradient_accumulation_steps


def grpo_microbatch_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    gradient_accumulation_steps: int,
    loss_type: str,
    raw_rewards: Float[Tensor, "batch 1"] | None = None,
    advantages: Float[Tensor, "batch 1"] | None = None,
    old_log_probs: Float[Tensor, "batch seq"] | None = None,
    cliprange: float | None = None,
    length_normalization: str = "masked_mean",
    normalize_constant: float | None = None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    r"""The GRPO microbatch objective.

    .. math::  L = \frac{1}{k}\,\frac{1}{B}\sum_b \operatorname{agg}_t(m_{bt}\,\ell_{bt}), \quad
               \operatorname{agg} = \begin{cases}\frac{1}{\sum_t m_{bt}}\sum_t & \text{masked\_mean}\\
               \frac{1}{c}\sum_t & \text{masked\_normalize (Dr. GRPO)}\end{cases}

    Args:
        policy_log_probs: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` true on response tokens.
        gradient_accumulation_steps: ``k``.
        loss_type, raw_rewards, advantages, old_log_probs, cliprange: as in
            :func:`compute_policy_gradient_loss`.
        length_normalization: ``masked_mean`` or ``masked_normalize``.
        normalize_constant: ``c`` for ``masked_normalize`` (the maximum generation length).

    Returns:
        scalar loss and metadata; ``clip_fraction`` (when clipping applies) is over response tokens.
    """
    if response_mask.shape != policy_log_probs.shape:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}"
        )
    per_token, metadata = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange
    )
    if length_normalization == "masked_mean":
        per_example = masked_mean(per_token, response_mask, dim=-1)
    elif length_normalization == "masked_normalize":
        if normalize_constant is None:
            raise ValueError("length_normalization='masked_normalize' needs normalize_constant (max generation length)")
        per_example = masked_normalize(per_token, response_mask, normalize_constant, dim=-1)
    else:
        raise ValueError(
            f"unknown length_normalization {length_normalization!r}; expected one of {', '.join(LENGTH_NORMALIZATIONS)}"
        )
    loss = per_example.mean() / gradient_accumulation_steps
    out = dict(metadata)
    if "clipped" in metadata:
        out["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    return loss, out
