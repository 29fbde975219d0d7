"""The policy-gradient objective as one typed, pure function: its settings, one microbatch's inputs, the
microbatch loss and its diagnostics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from core._losses import (
    LENGTH_NORMALIZATIONS, LengthNormalization, compute_cispo_loss, compute_gspo_loss, compute_kl_penalty,
    compute_policy_gradient_loss, truncated_importance_weights,
)
from core._masking import masked_mean, masked_normalize

PerToken = Float[Tensor, "batch seq"]
PerSequence = Float[Tensor, "batch 1"]
TokenMask = Bool[Tensor, "batch seq"]

PolicyLossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip", "gspo", "cispo"]
"""Every per-token loss of :func:`policy_gradient_objective`: the course's four plus GSPO and CISPO."""
POLICY_LOSS_TYPES: tuple[str, ...] = get_args(PolicyLossType)
RATIO_LOSS_TYPES: tuple[str, ...] = ("grpo_clip", "grpo_no_clip", "gspo", "cispo")
"""The loss types whose value depends on the sampling (old) policy's log-probs."""


def _check_names(loss_type: str, length_normalization: str) -> None:
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(POLICY_LOSS_TYPES)}")
    if length_normalization not in LENGTH_NORMALIZATIONS:
        raise ValueError(f"unknown length_normalization {length_normalization!r}; expected one of "
                         f"{', '.join(LENGTH_NORMALIZATIONS)}")


@dataclass(frozen=True)
class ObjectiveSettings:
    """The policy-gradient objective's hyper-parameters (one optimizer step's microbatches share them).

    ``cliprange`` is the lower epsilon of ``grpo_clip`` / ``gspo`` / ``cispo`` and ``cliprange_high`` the
    upper one (None: ``cliprange``). ``normalize_constant`` is ``masked_normalize``'s ``c`` (the maximum
    generation length) and ``token_mean``'s (the response tokens of the whole train batch).
    ``tis_cap > 0`` weights each token by truncated importance weights where sampler log-probs are given.
    """

    loss_type: PolicyLossType
    gradient_accumulation_steps: int = 1
    length_normalization: LengthNormalization = "masked_mean"
    normalize_constant: float | None = None
    cliprange: float | None = 0.2
    cliprange_high: float | None = None
    kl_coef: float = 0.0
    tis_cap: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        _check_names(self.loss_type, self.length_normalization)
        if self.length_normalization != "masked_mean" and self.normalize_constant is None:
            what = "max generation length" if self.length_normalization == "masked_normalize" else "train-batch response tokens"
            raise ValueError(f"length_normalization={self.length_normalization!r} needs normalize_constant ({what})")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        for name in ("kl_coef", "tis_cap", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def needs_old_log_probs(self) -> bool:
        """The loss needs the sampling policy's log-probs: a ratio loss, or TIS (old against sampler)."""
        return self.loss_type in RATIO_LOSS_TYPES or self.tis_cap > 0

    @property
    def upper_clip(self) -> float | None:
        return self.cliprange if self.cliprange_high is None else self.cliprange_high


@dataclass(frozen=True)
class ObjectiveInputs:
    """One microbatch's tensors. Per-token tensors are ``(batch, seq)``; ``advantages`` / ``raw_rewards``
    ``(batch, 1)``; ``truncated`` ``(batch,)``. Optional ones are None where the objective does not need them:
    ``old_log_probs`` (ratio losses, TIS), ``sampler_log_probs`` with ``sampler_mask`` (true where the sampler's
    log-prob is known) for the mismatch diagnostics and TIS, ``importance_weights`` (given weights, used when no
    sampler log-probs are), ``ref_log_probs`` (KL), ``token_entropy`` (with gradient: the entropy bonus).

    ``accumulation_divisor``: this microbatch's ``k`` where the step's microbatches differ in size (a token
    budget, ``--optim.max-tokens-per-microbatch``): the step's rows over this microbatch's, ``N / B``, so that
    the microbatch losses sum to the mean over the step's ``N`` rows whatever the split. None: the settings'
    ``gradient_accumulation_steps`` (equal microbatches). Unused by ``token_mean``."""

    policy_log_probs: Float[Tensor, "batch seq"]
    response_mask: Bool[Tensor, "batch seq"]
    advantages: Float[Tensor, "batch 1"] | None = None
    raw_rewards: Float[Tensor, "batch 1"] | None = None
    old_log_probs: Float[Tensor, "batch seq"] | None = None
    sampler_log_probs: Float[Tensor, "batch seq"] | None = None
    sampler_mask: Bool[Tensor, "batch seq"] | None = None
    importance_weights: Float[Tensor, "batch seq"] | None = None
    ref_log_probs: Float[Tensor, "batch seq"] | None = None
    token_entropy: Float[Tensor, "batch seq"] | None = None
    accumulation_divisor: float | None = None

    def __post_init__(self) -> None:
        if self.accumulation_divisor is not None and not self.accumulation_divisor > 0:
            raise ValueError(f"accumulation_divisor must be > 0, got {self.accumulation_divisor}")


_PER_TOKEN_FIELDS = ("response_mask", "old_log_probs", "sampler_log_probs", "sampler_mask", "importance_weights",
                     "ref_log_probs", "token_entropy")


def _check_per_token(policy_log_probs: Tensor, **tensors: Tensor | None) -> None:
    """Every given per-token tensor has ``policy_log_probs``' shape (no silent broadcast)."""
    for name, value in tensors.items():
        if value is not None and value.shape != policy_log_probs.shape:
            raise ValueError(f"{name} {tuple(value.shape)} must match policy_log_probs {tuple(policy_log_probs.shape)}")


def _need(value: Tensor | None, what: str, settings: ObjectiveSettings) -> Tensor:
    if value is None:
        raise ValueError(f"loss_type={settings.loss_type!r} needs {what}")
    return value


def _course_loss(x: ObjectiveInputs, s: ObjectiveSettings) -> tuple[Tensor, dict[str, Tensor]]:
    return compute_policy_gradient_loss(x.policy_log_probs, s.loss_type, x.raw_rewards, x.advantages, x.old_log_probs,
                                        s.cliprange, cliprange_high=s.cliprange_high)


def _gspo_loss(x: ObjectiveInputs, s: ObjectiveSettings) -> tuple[Tensor, dict[str, Tensor]]:
    return compute_gspo_loss(_need(x.advantages, "advantages", s), x.policy_log_probs,
                             _need(x.old_log_probs, "old_log_probs", s), x.response_mask,
                             cliprange=s.cliprange, cliprange_high=s.cliprange_high)


def _cispo_loss(x: ObjectiveInputs, s: ObjectiveSettings) -> tuple[Tensor, dict[str, Tensor]]:
    return compute_cispo_loss(_need(x.advantages, "advantages", s), x.policy_log_probs,
                              _need(x.old_log_probs, "old_log_probs", s),
                              cliprange_low=s.cliprange, cliprange_high=s.upper_clip)


_PER_TOKEN: dict[str, Callable[[ObjectiveInputs, ObjectiveSettings], tuple[Tensor, dict[str, Tensor]]]] = {
    **{name: _course_loss for name in ("no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip")},
    "gspo": _gspo_loss,
    "cispo": _cispo_loss,
}


def sampler_mismatch(
    old_log_probs: Float[Tensor, "batch seq"],
    sampler_log_probs: Float[Tensor, "batch seq"],
    known: Bool[Tensor, "batch seq"],
    *,
    tis_cap: float,
) -> tuple[Float[Tensor, "batch seq"], dict[str, Tensor]]:
    r"""The sampler/trainer mismatch on the tokens whose sampler log-prob is ``known``, and its truncated
    importance-sampling (TIS) weights.

    .. math::  \rho_t = \exp(\log\pi_{\mathrm{old},t} - \log\pi_{\mathrm{sampler},t}), \quad
               w_t = \min(\rho_t, C) \text{ where known, else } 1, \quad
               \mathrm{k3}_t = \rho_t - \log\rho_t - 1

    ``k3`` estimates :math:`\mathrm{KL}(\pi_\mathrm{sampler} \| \pi_\mathrm{old})` on the sampler's tokens.
    No gradient flows through any of it.

    Args:
        old_log_probs, sampler_log_probs: ``(batch, seq)``.
        known: ``(batch, seq)`` true where the sampler's log-prob of the token is known (and a response token).
        tis_cap: ``C``; 0 means no TIS (the weights are all 1).

    Returns:
        ``(batch, seq)`` weights and scalar means over the known tokens: ``logprob_mismatch`` (mean
        ``|old - sampler|``), ``rollout_corr/k3_kl``, ``sampling/importance_sampling_ratio/mean`` and
        ``.../max`` (of ``\rho``, before any cap), ``sampler_known_count`` (the number of known tokens)
        and, with TIS, ``tis_capped_fraction``.
    """
    if not (old_log_probs.shape == sampler_log_probs.shape == known.shape):
        raise ValueError(f"old {tuple(old_log_probs.shape)}, sampler {tuple(sampler_log_probs.shape)} and known "
                         f"{tuple(known.shape)} log-prob tensors must have one shape")
    with torch.no_grad():
        old, sampler = old_log_probs.detach().float(), sampler_log_probs.detach().float()
        log_rho = torch.where(known, old - sampler, 0.0)
        rho = torch.exp(log_rho)
        n = known.sum().clamp(min=1)
        meta = {
            "logprob_mismatch": log_rho.abs().sum() / n,
            "rollout_corr/k3_kl": torch.where(known, rho - log_rho - 1.0, 0.0).sum() / n,
            "sampling/importance_sampling_ratio/mean": torch.where(known, rho, 0.0).sum() / n,
            "sampling/importance_sampling_ratio/max": torch.where(known, rho, 0.0).max() if known.any() else rho.new_zeros(()),
            "sampler_known_count": known.sum().float(),
        }
        weights = torch.ones_like(rho)
        if tis_cap > 0:
            weights = torch.where(known, truncated_importance_weights(old, sampler, cap=tis_cap), 1.0)
            meta["tis_capped_fraction"] = (known & (weights >= tis_cap)).sum() / n
    return weights, meta


def _aggregate(per_token: Tensor, mask: Tensor, s: ObjectiveSettings, k: float | None) -> Tensor:
    if s.length_normalization == "token_mean":
        return masked_normalize(per_token, mask, s.normalize_constant)
    if s.length_normalization == "masked_mean":
        # a response with no response tokens (masked out, e.g. truncated) contributes 0 instead of 0/0
        counts = mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)
        per_example = masked_normalize(per_token, mask, 1.0, dim=-1) / counts
    else:
        per_example = masked_normalize(per_token, mask, s.normalize_constant, dim=-1)
    return per_example.mean() / (s.gradient_accumulation_steps if k is None else k)


def _clip_metrics(meta: dict[str, Tensor], advantages: Tensor | None, mask: Tensor, s: ObjectiveSettings) -> dict[str, Tensor]:
    """TRL's clip ratios (fractions of response tokens): low, where the ratio fell below ``1 - eps`` with a
    negative advantage; high, above ``1 + eps_high`` with a positive one (CISPO: where its weight was
    truncated from below / above, whatever the advantage's sign); region, either."""
    if "clipped_low" in meta:
        low, high = meta["clipped_low"], meta["clipped_high"]
    else:
        ratio, a = meta["ratio"], advantages
        low = (ratio < 1.0 - s.cliprange) & (a < 0)
        high = (ratio > 1.0 + s.upper_clip) & (a > 0)
    return {"clip_ratio/low_mean": masked_mean(low.float(), mask), "clip_ratio/high_mean": masked_mean(high.float(), mask),
            "clip_ratio/region_mean": masked_mean((low | high).float(), mask)}


def policy_gradient_objective(
    inputs: ObjectiveInputs, *, settings: ObjectiveSettings
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    r"""One microbatch's policy-gradient loss and its diagnostics.

    .. math::  \tilde\ell_{bt} = w_{bt}\,\ell_{bt} + \beta\,\kappa_{bt} - c_H\,H_{bt}, \qquad
               L = \begin{cases}
                 \frac{1}{k}\,\frac{1}{B}\sum_b \frac{1}{\sum_t m_{bt}}\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{masked\_mean} \\
                 \frac{1}{k}\,\frac{1}{B}\sum_b \frac{1}{c}\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{masked\_normalize (Dr. GRPO)} \\
                 \frac{1}{c}\sum_b\sum_t m_{bt}\,\tilde\ell_{bt}
                   & \text{token\_mean (DAPO)}
               \end{cases}

    ``\ell`` is the per-token loss of ``settings.loss_type`` (:func:`compute_policy_gradient_loss`,
    :func:`compute_gspo_loss`, :func:`compute_cispo_loss`); ``w`` the TIS weights of
    :func:`sampler_mismatch` (with ``tis_cap > 0`` and sampler log-probs), else ``importance_weights``,
    else 1; ``\kappa`` :func:`compute_kl_penalty` against ``ref_log_probs``, ``\beta = kl_coef``; ``H`` the
    token entropy, ``c_H = entropy_coef`` (an entropy bonus); ``k = gradient_accumulation_steps``, or the
    microbatch's own ``inputs.accumulation_divisor`` (``N / B`` under a token budget). A response
    whose mask is all false contributes 0. With ``token_mean``, ``c`` counts the whole train batch's response
    tokens, so the step's gradient does not depend on the microbatch split.

    Args:
        inputs: the microbatch's tensors (``policy_log_probs`` with gradient; ``token_entropy`` with gradient
            when ``entropy_coef > 0``).
        settings: the objective's hyper-parameters.

    Returns:
        scalar loss and scalar metrics (detached; means over response tokens): ``clip_fraction`` and
        ``clip_ratio/{low,high,region}_mean`` (clipped losses), ``ratio_mean``, ``ratio_max`` (the raw policy
        ratio before clipping: GSPO's sequence ratio), ``kl`` (with ``ref_log_probs``), ``entropy_bonus``,
        ``tis_weight_mean`` and :func:`sampler_mismatch`'s (with sampler log-probs).

    Raises:
        ValueError: a shape that could broadcast, or a tensor the settings need that is missing.
    """
    s = settings
    lp, mask = inputs.policy_log_probs, inputs.response_mask
    _check_per_token(lp, **{name: getattr(inputs, name) for name in _PER_TOKEN_FIELDS})
    if s.needs_old_log_probs:
        _need(inputs.old_log_probs, "old_log_probs", s)
    if s.kl_coef > 0 and inputs.ref_log_probs is None:
        raise ValueError(f"kl_coef={s.kl_coef} needs ref_log_probs")
    if s.entropy_coef > 0 and inputs.token_entropy is None:
        raise ValueError(f"entropy_coef={s.entropy_coef} needs token_entropy")
    per_token, meta = _PER_TOKEN[s.loss_type](inputs, s)
    out: dict[str, Tensor] = {}
    weights = inputs.importance_weights
    if inputs.sampler_log_probs is not None:
        known = mask if inputs.sampler_mask is None else inputs.sampler_mask & mask
        old = lp if inputs.old_log_probs is None else inputs.old_log_probs
        tis, mismatch = sampler_mismatch(old, inputs.sampler_log_probs, known, tis_cap=s.tis_cap)
        out.update(mismatch)
        if s.tis_cap > 0:
            weights = tis
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
        out["tis_weight_mean"] = masked_mean(weights.detach(), mask)
    if inputs.ref_log_probs is not None:
        kl = compute_kl_penalty(lp, inputs.ref_log_probs)
        out["kl"] = masked_mean(kl.detach(), mask)
        if s.kl_coef > 0:
            per_token = per_token + s.kl_coef * kl
    if s.entropy_coef > 0:
        entropy = inputs.token_entropy.to(per_token.dtype)
        per_token = per_token - s.entropy_coef * entropy
        out["entropy_bonus"] = s.entropy_coef * masked_mean(entropy.detach(), mask)
    loss = _aggregate(per_token, mask, s, inputs.accumulation_divisor)
    if "clipped" in meta:
        out["clip_fraction"] = masked_mean(meta["clipped"].float(), mask)
    if "ratio" in meta:
        ratio = meta["ratio"].detach()
        out["ratio_mean"] = masked_mean(ratio, mask)
        out["ratio_max"] = torch.where(mask, ratio, 0.0).max() if mask.any() else ratio.new_zeros(())
        if s.loss_type in ("grpo_clip", "gspo", "cispo"):
            out.update(_clip_metrics(meta, inputs.advantages, mask, s))
    return loss, {k: v.detach() for k, v in out.items()}


def grpo_microbatch_loss(
    policy_log_probs: PerToken,
    response_mask: TokenMask,
    *,
    gradient_accumulation_steps: int | float,
    loss_type: str,
    raw_rewards: PerSequence | None = None, advantages: PerSequence | None = None,
    old_log_probs: PerToken | None = None, cliprange: float | None = None, cliprange_high: float | None = None,
    length_normalization: str = "masked_mean", normalize_constant: float | None = None,
    importance_weights: PerToken | None = None, ref_log_probs: PerToken | None = None, kl_coef: float = 0.0,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    r"""The GRPO microbatch objective in the course's keyword form: :func:`policy_gradient_objective` with
    ``ObjectiveSettings(loss_type, gradient_accumulation_steps, length_normalization, normalize_constant,
    cliprange, cliprange_high, kl_coef)`` on ``ObjectiveInputs(policy_log_probs, response_mask, advantages,
    raw_rewards, old_log_probs, importance_weights=..., ref_log_probs=...)``.

    .. math::  \tilde\ell_{bt} = w_{bt}\,\ell_{bt} + \beta\,\kappa_{bt}, \qquad
               L = \frac{1}{k}\,\frac{1}{B}\sum_b \operatorname{agg}_t(m_{bt}\,\tilde\ell_{bt})
               \quad (\text{token\_mean: } \tfrac{1}{c}\textstyle\sum_{bt} m_{bt}\tilde\ell_{bt})

    Args:
        policy_log_probs: ``(batch, seq)``.
        response_mask: ``(batch, seq)`` true on response tokens.
        gradient_accumulation_steps: ``k`` (unused by ``token_mean``): the number of equal microbatches of the
            step (an int, the settings'), or for unequal ones (a token budget) the step's rows over this
            microbatch's, ``N / B`` (a float, the inputs' ``accumulation_divisor``).
        loss_type, raw_rewards, advantages, old_log_probs, cliprange, cliprange_high: as in
            :func:`compute_policy_gradient_loss` (and ``gspo``, ``cispo``).
        length_normalization: ``masked_mean``, ``masked_normalize`` or ``token_mean``.
        normalize_constant: ``c`` of ``masked_normalize`` / ``token_mean``.
        importance_weights: ``(batch, seq)`` per-token weights ``w`` (1 when None), e.g.
            :func:`truncated_importance_weights`.
        ref_log_probs: ``(batch, seq)`` reference log-probs (``kl`` is reported whenever given).
        kl_coef: ``\beta \ge 0``.

    Returns:
        scalar loss and scalar metadata (see :func:`policy_gradient_objective`).
    """
    _check_names(loss_type, length_normalization)
    _check_per_token(policy_log_probs, response_mask=response_mask, old_log_probs=old_log_probs,
                     importance_weights=importance_weights, ref_log_probs=ref_log_probs)
    equal = isinstance(gradient_accumulation_steps, int)
    settings = ObjectiveSettings(
        loss_type=loss_type, gradient_accumulation_steps=gradient_accumulation_steps if equal else 1,  # type: ignore[arg-type]
        length_normalization=length_normalization, normalize_constant=normalize_constant,  # type: ignore[arg-type]
        cliprange=cliprange, cliprange_high=cliprange_high, kl_coef=kl_coef,
    )
    inputs = ObjectiveInputs(policy_log_probs, response_mask, advantages=advantages, raw_rewards=raw_rewards,
                             old_log_probs=old_log_probs, importance_weights=importance_weights,
                             ref_log_probs=ref_log_probs,
                             accumulation_divisor=None if equal else float(gradient_accumulation_steps))
    return policy_gradient_objective(inputs, settings=settings)
