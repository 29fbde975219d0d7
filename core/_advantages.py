"""Group-normalised advantages (GRPO)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor


def _groups(values: Tensor, group_size: int) -> Tensor:
    """``values`` (batch,) as (n_groups, group_size), or ValueError naming what does not fit."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if values.ndim != 1 or values.shape[0] % group_size != 0:
        raise ValueError(f"rollout batch of shape {tuple(values.shape)} is not a whole number of groups of {group_size}")
    return values.reshape(-1, group_size)


def normalize_group_rewards(
    raw_rewards: Float[Tensor, "batch"],
    *,
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> Float[Tensor, "batch"]:
    r"""Advantages from rewards grouped in consecutive blocks of ``group_size``.

    .. math::  A_i = \frac{r_i - \operatorname{mean}(r_{G(i)})}{\operatorname{std}(r_{G(i)}) + \epsilon}
               \quad\text{(or only } r_i - \operatorname{mean}(r_{G(i)}) \text{ without std)}

    The std is the unbiased one (torch's default), so ``group_size`` must be ≥ 2 with std.

    Args:
        raw_rewards: ``(batch,)`` rewards, ``batch = n_groups * group_size``.
        group_size: responses per question.
        advantage_eps: ``\epsilon`` added to the std.
        normalize_by_std: divide by the group std.

    Returns:
        ``(batch,)`` float32 advantages; they sum to zero within each group.
    """
    _groups(raw_rewards, group_size)
    if normalize_by_std and group_size < 2:
        raise ValueError("normalize_by_std needs group_size >= 2 (the unbiased std of one sample is undefined)")
    groups = raw_rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if normalize_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + advantage_eps)
    return centred.reshape(-1)


AdvantageEstimator = Literal["grpo", "rloo"]
"""grpo: group-normalised rewards (:func:`normalize_group_rewards`); rloo: leave-one-out baselines
(:func:`compute_rloo_advantages`)."""


def group_normalized_advantages(
    scores: Sequence[Mapping[str, float]],
    *,
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
    estimator: AdvantageEstimator = "grpo",
    reward_shaping: Float[Tensor, "batch"] | None = None,
) -> tuple[Float[Tensor, "batch"], Float[Tensor, "batch"], dict[str, float]]:
    r"""Advantages of graded rollouts, by group.

    .. math::  r_i = \mathrm{scores}_i[\text{"reward"}] + s_i, \quad
               A_i = \frac{r_i - \operatorname{mean}_{G(i)} r}{\operatorname{std}_{G(i)} r + \epsilon}
               \ \text{(grpo; without std: only the centring)}, \quad
               A_i = r_i - \tfrac{1}{G-1}\textstyle\sum_{j \in G(i), j \ne i} r_j \ \text{(rloo)}

    with ``s`` the optional ``reward_shaping`` (e.g. :func:`overlong_penalty`; 0 without it). Groups are
    consecutive blocks of ``group_size`` responses to the same question.

    Args:
        scores: ``batch`` reward dicts ``{"reward", "format_reward", "answer_reward"}`` (a reward function's, or
            the batch grader's), grouped consecutively.
        group_size: responses per question.
        advantage_eps: added to the std (grpo).
        normalize_by_std: divide by the (unbiased) group std (grpo).
        estimator: ``"grpo"`` (:func:`normalize_group_rewards`) or ``"rloo"`` (:func:`compute_rloo_advantages`).
        reward_shaping: ``(batch,)`` added to the task rewards before the advantages.

    Returns:
        ``advantages`` (batch,) float32, ``raw_rewards`` (batch,) float32 (shaped), and metadata floats of the
        task rewards (before shaping): ``reward_mean/std/min/max``, ``format_reward_mean``, ``answer_reward_mean``
        (NaN where a dict lacks the key), ``zero_variance_group_fraction``.
    """
    task = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)
    if reward_shaping is not None and reward_shaping.shape != task.shape:
        raise ValueError(f"reward_shaping of shape {tuple(reward_shaping.shape)} for {task.shape[0]} scores")
    raw = task if reward_shaping is None else task + reward_shaping.to(task.dtype)
    if estimator == "rloo":
        advantages = compute_rloo_advantages(raw, group_size=group_size)
    elif estimator == "grpo":
        advantages = normalize_group_rewards(
            raw, group_size=group_size, advantage_eps=advantage_eps, normalize_by_std=normalize_by_std
        )
    else:
        raise ValueError(f"estimator must be 'grpo' or 'rloo', got {estimator!r}")
    metadata = reward_statistics(task, group_size=group_size)
    for key in ("format_reward", "answer_reward"):
        values = [float(s.get(key, float("nan"))) for s in scores]
        metadata[f"{key}_mean"] = sum(values) / len(values)
    return advantages, raw, metadata


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, Any], dict[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[Any],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[Float[Tensor, "batch"], Float[Tensor, "batch"], dict[str, float]]:
    r"""Score each rollout with ``reward_fn`` and normalise rewards within each group.

    .. math::  r_i = \mathrm{reward\_fn}(o_i, y_i)[\text{"reward"}], \quad
               A_i = \frac{r_i - \operatorname{mean}_{G(i)} r}{\operatorname{std}_{G(i)} r + \epsilon}

    Groups are consecutive blocks of ``group_size`` responses to the same question.

    Args:
        reward_fn: ``(response, ground_truth) -> {"reward", "format_reward", "answer_reward"}``.
        rollout_responses: ``batch`` responses.
        repeated_ground_truths: ``batch`` ground truths, each repeated ``group_size`` times.
        group_size: responses per question.
        advantage_eps: added to the std.
        normalize_by_std: divide by the (unbiased) group std.

    Returns:
        :func:`group_normalized_advantages` of the scores: ``advantages`` (batch,) float32, ``raw_rewards``
        (batch,) float32, and metadata floats.
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(
            f"{len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths"
        )
    scores = [reward_fn(r, g) for r, g in zip(rollout_responses, repeated_ground_truths)]
    return group_normalized_advantages(
        scores, group_size=group_size, advantage_eps=advantage_eps, normalize_by_std=normalize_by_std
    )


def reward_statistics(raw_rewards: Float[Tensor, "batch"], *, group_size: int) -> dict[str, float]:
    r"""Summary statistics of a rollout batch's rewards.

    ``zero_variance_group_fraction`` is the fraction of groups whose rewards are all equal
    (their advantages are zero: they carry no learning signal).

    Args:
        raw_rewards: ``(batch,)`` rewards, ``batch = n_groups * group_size``.
        group_size: responses per question.

    Returns:
        floats ``reward_mean``, ``reward_std`` (unbiased; 0 for one element), ``reward_min``,
        ``reward_max``, ``zero_variance_group_fraction``.
    """
    groups = raw_rewards.float().reshape(-1, group_size)
    zero_var = (groups.max(dim=1).values == groups.min(dim=1).values).float().mean()
    return {
        "reward_mean": raw_rewards.float().mean().item(),
        "reward_std": raw_rewards.float().std().item() if raw_rewards.numel() > 1 else 0.0,
        "reward_min": raw_rewards.min().item(),
        "reward_max": raw_rewards.max().item(),
        "zero_variance_group_fraction": zero_var.item(),
    }


def nonconstant_group_mask(
    rewards: Shaped[Tensor, "rollout_batch"], *, group_size: int
) -> Bool[Tensor, "rollout_batch"]:
    r"""Which responses belong to a group whose rewards are not all equal (DAPO's dynamic sampling).

    .. math::  \mathrm{keep}_i = \big[\max_{j \in G(i)} r_j \ne \min_{j \in G(i)} r_j\big]

    A constant group has zero advantages, so it carries no policy-gradient signal.
    Groups are consecutive blocks of ``group_size`` responses to the same question.

    Args:
        rewards: ``(rollout_batch,)`` rewards (any dtype), ``rollout_batch = n_groups * group_size``.
        group_size: responses per question, ``>= 1``.

    Returns:
        ``(rollout_batch,)`` bool, true for every response of a group with at least two distinct rewards.

    Raises:
        ValueError: ``group_size < 1``, or ``rewards`` is not 1-D or not a whole number of groups.
    """
    groups = _groups(rewards, group_size)
    nonconstant = (groups != groups[:, :1]).any(dim=1)
    return nonconstant.repeat_interleave(group_size)


def compute_rloo_advantages(raw_rewards: Float[Tensor, "batch"], *, group_size: int) -> Float[Tensor, "batch"]:
    r"""REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): each response's reward
    minus the mean reward of the other responses to the same question.

    .. math::  A_i = r_i - \frac{1}{G-1}\sum_{j \in G(i),\, j \ne i} r_j = \frac{G}{G-1}\big(r_i - \bar r_{G(i)}\big)

    Groups are consecutive blocks of ``group_size`` responses.

    Args:
        raw_rewards: ``(batch,)`` rewards, ``batch = n_groups * group_size``.
        group_size: ``G \ge 2``.

    Returns:
        ``(batch,)`` float32 advantages; they sum to zero within each group.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out mean of no rewards), got {group_size}")
    groups = _groups(raw_rewards, group_size).float()
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def overlong_penalty(
    response_lengths: Shaped[Tensor, "batch"], *, max_tokens: int, buffer: int, penalty: float = 1.0
) -> Float[Tensor, "batch"]:
    r"""DAPO's soft overlong punishment (Yu et al. 2025), a reward term for responses near the token limit.

    .. math::  R_\mathrm{len}(L) = \begin{cases}
                 0 & L \le L_\max - B \\
                 -P\,\frac{L - (L_\max - B)}{B} & L_\max - B < L \le L_\max \\
                 -P & L > L_\max
               \end{cases}

    with ``L_max = max_tokens``, ``B = buffer`` (DAPO's ``L_cache``) and ``P = penalty``.

    Args:
        response_lengths: ``(batch,)`` response lengths in tokens (any real dtype).
        max_tokens: ``L_max``, the generation limit.
        buffer: ``B`` in ``[1, max_tokens]``.
        penalty: ``P \ge 0``.

    Returns:
        ``(batch,)`` float32 penalties in ``[-P, 0]``, to add to the rewards.
    """
    if not 1 <= buffer <= max_tokens:
        raise ValueError(f"buffer must be in [1, max_tokens={max_tokens}], got {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    excess = (response_lengths.float() - (max_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return -penalty * excess / buffer
