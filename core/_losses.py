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


def grpo_microbatch_loss(
    policy_log_probs: Float[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    gradient_accumulation_steps: int | float,
    loss_type: str,
    raw_rewards: Float[Tensor, "batch 1"] | None = None,
    advantages: Float[Tensor, "batch 1"] | None = None,
    old_log_probs: Float[Tensor, "batch seq"] | None = None,
    cliprange: float | None = None,
    cliprange_high: float | None = None,
    length_normalization: str = "masked_mean",
    normalize_constant: float | None = None,
    importance_weights: Float[Tensor, "batch seq"] | None = None,
    ref_log_probs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    r"""The GRPO microbatch objective.

    .. math::  \tilde\ell_{bt} = w_{bt}\,\ell_{bt} + \beta\,\kappa_{bt}, \qquad
               L = \begin{cases}
                 \frac{1}{k}\,\frac{1}{B}\sum_b \frac{1}{\sum_t m_{bt}}\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{masked\_mean} \\
                 \frac{1}{k}\,\frac{1}{B}\sum_b \frac{1}{c}\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{masked\_normalize (Dr. GRPO)} \\
                 \frac{1}{c}\sum_b\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{token\_mean (DAPO)}
               \end{cases}

    where ``\ell`` is :func:`compute_policy_gradient_loss`, ``w`` the ``importance_weights`` (1 when
    None), ``\kappa_{bt}`` :func:`compute_kl_penalty` against ``ref_log_probs`` and ``\beta = kl_coef``.
    A response whose mask is all false (e.g. a truncated response under overlong masking) contributes 0.
    With ``token_mean``, ``c`` is the number of response tokens of the whole train batch (every
    microbatch of one optimizer step), and there is no ``1/k`` nor ``1/B``: the microbatch losses
    of one step sum to the mean per-token loss over all its response tokens, and their gradient
    does not depend on how the batch is cut into microbatches.

    Args:
        policy_log_probs: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` true on response tokens.
        gradient_accumulation_steps: ``k`` (unused by ``token_mean``): the number of equal microbatches of
            the step, or for unequal ones (a token budget) the step's rows over this microbatch's, ``N / B``,
            so that the step's loss is the mean over its ``N`` rows whatever the split.
        loss_type, raw_rewards, advantages, old_log_probs, cliprange, cliprange_high: as in
            :func:`compute_policy_gradient_loss`.
        length_normalization: ``masked_mean``, ``masked_normalize`` or ``token_mean``.
        normalize_constant: ``c`` for ``masked_normalize`` (the maximum generation length) and for
            ``token_mean`` (the number of response tokens in the train batch).
        importance_weights: ``(batch, seq)`` per-token weights of the policy-gradient loss, e.g.
            :func:`truncated_importance_weights`; used as given (pass detached weights).
        ref_log_probs: ``(batch, seq)`` reference-policy log-probs, needed when ``kl_coef > 0``.
        kl_coef: ``\beta \ge 0``.

    Returns:
        scalar loss and metadata; ``clip_fraction`` (when clipping applies) is over response tokens;
        ``kl`` (when ``ref_log_probs`` is given) and ``tis_weight_mean`` (when
        ``importance_weights`` is given) are detached means over response tokens.

    Raises:
        ValueError: a shape mismatch, a missing ``normalize_constant`` or ``ref_log_probs``, a
            negative ``kl_coef``, or an unknown ``length_normalization``.
    """
    if response_mask.shape != policy_log_probs.shape:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}"
        )
    if length_normalization not in LENGTH_NORMALIZATIONS:
        raise ValueError(
            f"unknown length_normalization {length_normalization!r}; expected one of {', '.join(LENGTH_NORMALIZATIONS)}"
        )
    if length_normalization != "masked_mean" and normalize_constant is None:
        what = "max generation length" if length_normalization == "masked_normalize" else "train-batch response tokens"
        raise ValueError(f"length_normalization={length_normalization!r} needs normalize_constant ({what})")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_log_probs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs")
    if importance_weights is not None and importance_weights.shape != policy_log_probs.shape:
        raise ValueError(
            f"importance_weights {tuple(importance_weights.shape)} "
            f"must match policy_log_probs {tuple(policy_log_probs.shape)}"
        )
    per_token, metadata = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange,
        cliprange_high=cliprange_high,
    )
    out = dict(metadata)
    if importance_weights is not None:
        per_token = per_token * importance_weights.to(per_token.dtype)
        out["tis_weight_mean"] = masked_mean(importance_weights.detach(), response_mask)
    if ref_log_probs is not None:
        kl = compute_kl_penalty(policy_log_probs, ref_log_probs)
        out["kl"] = masked_mean(kl.detach(), response_mask)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if length_normalization == "token_mean":
        loss = masked_normalize(per_token, response_mask, normalize_constant)
    else:
        if length_normalization == "masked_mean":
            # masked_mean per response; a response with no response tokens (masked out, e.g. truncated)
            # contributes 0 instead of 0/0.
            counts = response_mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)
            per_example = masked_normalize(per_token, response_mask, 1.0, dim=-1) / counts
        else:
            per_example = masked_normalize(per_token, response_mask, normalize_constant, dim=-1)
        loss = per_example.mean() / gradient_accumulation_steps
    if "clipped" in metadata:
        out["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    return loss, out
