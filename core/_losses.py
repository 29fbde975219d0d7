"""Policy-gradient losses (per token) and the microbatch objectives built from them."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from core._masking import masked_mean, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]
"""The per-token policy-gradient losses of :func:`compute_policy_gradient_loss` (a type tyro checks at parse time)."""
LengthNormalization = Literal["masked_mean", "masked_normalize", "token_mean"]
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
    *,
    cliprange_high: float | None = None,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""GRPO-Clip (PPO-style) per-token loss, optionally with DAPO's asymmetric ("clip-higher") range.

    .. math::  r_t = \exp(\log\pi_\theta - \log\pi_{\theta_\mathrm{old}}), \quad
               \ell_t = -\min\big(r_t A, \operatorname{clip}(r_t, 1-\epsilon, 1+\epsilon_\mathrm{high}) A\big)

    with ``\epsilon_high = \epsilon`` when ``cliprange_high`` is None (the symmetric clip).

    Args:
        advantages: ``(batch, 1)`` per-sequence advantages.
        policy_log_probs: ``(batch, seq)`` log-probs under the policy being trained.
        old_log_probs: ``(batch, seq)`` log-probs under the policy that sampled (no gradient).
        cliprange: ``\epsilon``, the lower side of the range (and the upper side by default).
        cliprange_high: ``\epsilon_high``, the upper side of the range; None means ``cliprange``.

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
    high = cliprange if cliprange_high is None else cliprange_high
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + high) * a
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
    *,
    cliprange_high: float | None = None,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""Per-token policy-gradient loss of the chosen type.

    .. math::
        \ell_t = \begin{cases}
          -R\,\log\pi_t & \text{no\_baseline} \\
          -A\,\log\pi_t & \text{reinforce\_with\_baseline} \\
          -\min(r_t A, \operatorname{clip}(r_t, 1-\epsilon, 1+\epsilon_\mathrm{high}) A) & \text{grpo\_clip} \\
          -r_t A & \text{grpo\_no\_clip}
        \end{cases}, \quad r_t = \pi_t / \pi_{\mathrm{old},t}

    Args:
        policy_log_probs: ``(batch, seq)``.
        loss_type: one of ``no_baseline``, ``reinforce_with_baseline``, ``grpo_clip``, ``grpo_no_clip``.
        raw_rewards: ``(batch, 1)``, needed by ``no_baseline``.
        advantages: ``(batch, 1)``, needed by the other three.
        old_log_probs: ``(batch, seq)``, needed by ``grpo_clip`` and ``grpo_no_clip``.
        cliprange: needed by ``grpo_clip``.
        cliprange_high: optional upper clip range of ``grpo_clip`` (None: ``cliprange``); the
            other loss types ignore it, as they ignore ``cliprange``.

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
        return compute_grpo_clip_loss(
            advantages, policy_log_probs, old_log_probs, cliprange, cliprange_high=cliprange_high
        )
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


def compute_kl_penalty(
    policy_log_probs: Float[Tensor, "batch seq"],
    ref_log_probs: Float[Tensor, "batch seq"],
) -> Float[Tensor, "batch seq"]:
    r"""Per-token KL penalty to a reference policy: Schulman's k3 estimator of
    :math:`\mathrm{KL}(\pi_\theta \,\|\, \pi_\mathrm{ref})`.

    .. math::  \delta_t = \log\pi_{\mathrm{ref},t} - \log\pi_{\theta,t}, \quad
               k_t = e^{\delta_t} - \delta_t - 1 \;\ge 0

    It is zero where the two log-probs are equal. ``ref_log_probs`` is detached: the gradient
    flows to ``policy_log_probs`` only.

    Args:
        policy_log_probs: ``(batch, seq)`` log-probs under the policy being trained.
        ref_log_probs: ``(batch, seq)`` log-probs under the reference policy.

    Returns:
        ``(batch, seq)`` per-token penalty, in ``policy_log_probs``' dtype.

    Raises:
        ValueError: the two shapes differ.
    """
    if ref_log_probs.shape != policy_log_probs.shape:
        raise ValueError(
            f"ref_log_probs {tuple(ref_log_probs.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}"
        )
    delta = ref_log_probs.detach().to(policy_log_probs.dtype) - policy_log_probs
    return torch.exp(delta) - delta - 1.0


def truncated_importance_weights(
    old_log_probs: Float[Tensor, "batch seq"],
    sampler_log_probs: Float[Tensor, "batch seq"],
    *,
    cap: float,
) -> Float[Tensor, "batch seq"]:
    r"""Truncated importance-sampling (TIS) weights that correct for a sampler (e.g. vLLM) whose
    log-probs differ from the trainer's.

    .. math::  w_t = \min\big(\exp(\log\pi_{\mathrm{old},t} - \log\pi_{\mathrm{sampler},t}),\; C\big)

    The weights carry no gradient (computed under ``no_grad``), whatever the inputs require.

    Args:
        old_log_probs: ``(batch, seq)`` log-probs of the sampled tokens under the trainer's old policy.
        sampler_log_probs: ``(batch, seq)`` log-probs of the same tokens under the sampler.
        cap: ``C > 0``, the truncation.

    Returns:
        ``(batch, seq)`` weights in ``(0, C]``.

    Raises:
        ValueError: ``cap <= 0`` or the two shapes differ.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    if sampler_log_probs.shape != old_log_probs.shape:
        raise ValueError(
            f"sampler_log_probs {tuple(sampler_log_probs.shape)} must match old_log_probs {tuple(old_log_probs.shape)}"
        )
    with torch.no_grad():
        return torch.exp(old_log_probs.detach() - sampler_log_probs.detach()).clamp(max=cap)


def sft_microbatch_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    gradient_accumulation_steps: int | float,
    normalize_constant: float = 1.0,
) -> Float[Tensor, ""]:
    r"""The SFT microbatch objective (negative log-likelihood of the response tokens).

    .. math::  L = -\frac{1}{k}\,\frac{1}{B}\sum_{b=1}^{B} \frac{1}{c}\sum_t m_{bt} \log\pi_{bt}

    with ``k = gradient_accumulation_steps`` and ``c = normalize_constant``. For microbatches of unequal size
    (a token budget), ``k = N / B`` with ``N`` the rows of the optimizer step: the microbatch losses then sum
    to the mean over the step's ``N`` rows, as equal microbatches' do.

    Args:
        policy_log_probs: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` true on response tokens.

    Returns:
        scalar loss.
    """
    per_example = masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)
    return -per_example.mean() / gradient_accumulation_steps


def _check_same_shape(name: str, value: Tensor, log_probs: Tensor) -> None:
    if value.shape != log_probs.shape:
        raise ValueError(f"{name} {tuple(value.shape)} must match policy_log_probs {tuple(log_probs.shape)}")


def compute_gspo_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization") per-token loss, in its GSPO-token form.

    .. math::  s_i = \exp\Big(\frac{1}{|y_i|}\sum_{t \in y_i} \log\pi_{\theta,it} - \log\pi_{\mathrm{old},it}\Big),
               \quad s_{it} = \mathrm{sg}(s_i)\,\frac{\pi_{\theta,it}}{\mathrm{sg}(\pi_{\theta,it})},
               \quad \ell_{it} = -\min\big(s_{it} A_i,\ \operatorname{clip}(s_{it}, 1-\epsilon, 1+\epsilon_\mathrm{high}) A_i\big)

    ``s_it`` has the value ``s_i`` at every token of response ``i``, so a per-response mean of ``\ell``
    (``masked_mean``) is GSPO's sequence loss ``-min(s_i A_i, clip(s_i) A_i)``; its gradient is GSPO's,
    ``s_i A_i \frac{1}{|y_i|}\sum_t \nabla\log\pi_{\theta,it}`` where not clipped, 0 where clipped. The
    mean in ``s_i`` runs over ``response_mask``'s tokens (a response with none has ``s_i = 1``).

    Args:
        advantages: ``(batch, 1)`` per-sequence advantages.
        policy_log_probs: ``(batch, seq)`` log-probs under the policy being trained.
        old_log_probs: ``(batch, seq)`` log-probs under the policy that sampled (no gradient).
        response_mask: ``(batch, seq)`` true on response tokens.
        cliprange: ``\epsilon`` (the paper: 3e-4), the lower side and by default the upper one.
        cliprange_high: ``\epsilon_high`` (the paper: 4e-4); None means ``cliprange``.

    Returns:
        ``(batch, seq)`` per-token loss and metadata: ``ratio`` (batch, seq), ``s_i`` at each token
        (detached); ``sequence_ratio`` (batch, 1); ``clipped`` (batch, seq) bool, true where the clipped
        term is the smaller one (no gradient).
    """
    _check_per_sequence("advantages", advantages, policy_log_probs)
    _check_same_shape("old_log_probs", old_log_probs, policy_log_probs)
    _check_same_shape("response_mask", response_mask, policy_log_probs)
    m = response_mask.to(policy_log_probs.dtype)
    counts = m.sum(dim=-1, keepdim=True).clamp(min=1)
    log_s = (torch.where(response_mask, policy_log_probs.detach() - old_log_probs, 0.0).sum(dim=-1, keepdim=True)
             / counts)
    ratio = torch.exp(log_s + policy_log_probs - policy_log_probs.detach())
    a = advantages.to(policy_log_probs.dtype)
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + high) * a
    return -torch.minimum(unclipped, clipped), {
        "ratio": ratio.detach(), "sequence_ratio": torch.exp(log_s), "clipped": clipped < unclipped,
    }


def compute_cispo_loss(
    advantages: Float[Tensor, "batch 1"],
    policy_log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    *,
    cliprange_low: float,
    cliprange_high: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""CISPO (MiniMax-M1, 2025) per-token loss: a clipped, stop-gradient importance weight on REINFORCE.

    .. math::  r_t = \exp(\log\pi_{\theta,t} - \log\pi_{\mathrm{old},t}), \quad
               \ell_t = -\,\mathrm{sg}\big(\operatorname{clip}(r_t, 1-\epsilon_\mathrm{low}, 1+\epsilon_\mathrm{high})\big)\,A\,\log\pi_{\theta,t}

    Unlike the PPO clip, no token loses its gradient: a clipped ratio only bounds the token's weight.

    Args:
        advantages: ``(batch, 1)`` per-sequence advantages.
        policy_log_probs: ``(batch, seq)`` log-probs under the policy being trained.
        old_log_probs: ``(batch, seq)`` log-probs under the policy that sampled (no gradient).
        cliprange_low: ``\epsilon_low`` (large, e.g. 1.0, leaves the weight unbounded below, as the paper).
        cliprange_high: ``\epsilon_high``.

    Returns:
        ``(batch, seq)`` per-token loss and metadata: ``ratio`` (batch, seq, detached), ``clipped_low`` and
        ``clipped_high`` (batch, seq) bool, where the weight was truncated from below or above.
    """
    _check_per_sequence("advantages", advantages, policy_log_probs)
    _check_same_shape("old_log_probs", old_log_probs, policy_log_probs)
    ratio = torch.exp(policy_log_probs.detach() - old_log_probs.detach())
    weight = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    loss = -weight * advantages.to(policy_log_probs.dtype) * policy_log_probs
    return loss, {"ratio": ratio, "clipped_low": ratio < 1.0 - cliprange_low, "clipped_high": ratio > 1.0 + cliprange_high}
