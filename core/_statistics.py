"""Evaluation statistics: pass@k, majority voting and bootstrap confidence intervals over problems."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 22  # values gathered per batch of resamples (bounds memory at 32 MiB of float64)


def pass_at_k(
    num_samples: int | Int[Tensor, "problem"],
    num_correct: int | Int[Tensor, "problem"],
    k: int,
) -> float | Float[Tensor, "problem"]:
    r"""The unbiased pass@k estimator of one problem (or of each problem), Chen et al. 2021.

    .. math::  \mathrm{pass@}k = 1 - \binom{n - c}{k} \Big/ \binom{n}{k}
               = 1 - \prod_{i = n - c + 1}^{n} \Bigl(1 - \frac{k}{i}\Bigr)

    the probability that at least one of ``k`` samples drawn without replacement from the ``n`` samples
    (``c`` of them correct) is correct; 1 when ``n - c < k``. Averaged over problems it is the benchmark's
    pass@k; ``pass_at_k(n, c, 1) = c / n``.

    Args:
        num_samples: ``n`` (an int, or ``(problem,)`` integers), ``n >= k``.
        num_correct: ``c``, ``0 <= c <= n``, the same type and shape as ``num_samples``.
        k: samples per attempt, ``k >= 1``.

    Returns:
        A float in [0, 1] for ints; for tensors a ``(problem,)`` float64 tensor.

    Raises:
        ValueError: ``k < 1``, ``n < k``, ``c`` outside ``[0, n]``, or tensors of different shapes.
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got {k}")
    if isinstance(num_samples, Tensor) or isinstance(num_correct, Tensor):
        n = torch.as_tensor(num_samples)
        c = torch.as_tensor(num_correct)
        if n.shape != c.shape or n.ndim != 1:
            raise ValueError(f"num_samples {tuple(n.shape)} and num_correct {tuple(c.shape)} must be the same (problem,) shape")
        if bool((n < k).any()) or bool((c < 0).any()) or bool((c > n).any()):
            raise ValueError(f"pass@{k} needs k <= num_samples and 0 <= num_correct <= num_samples per problem")
        n, c = n.to(torch.float64), c.to(torch.float64)
        wrong = n - c
        # log C(n - c, k) - log C(n, k) where n - c >= k; elsewhere every draw holds a correct sample.
        safe = torch.where(wrong >= k, wrong, torch.full_like(wrong, float(k)))
        log_ratio = (torch.lgamma(safe + 1) - torch.lgamma(safe - k + 1)
                     - torch.lgamma(n + 1) + torch.lgamma(n - k + 1))
        return torch.where(wrong >= k, 1.0 - torch.exp(log_ratio), torch.ones_like(n))
    n, c = int(num_samples), int(num_correct)
    if n < k or not 0 <= c <= n:
        raise ValueError(f"pass@{k} needs k <= num_samples and 0 <= num_correct <= num_samples, got n={n}, c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    r"""The sample whose answer wins the vote: maj@k's choice among one problem's ``k`` samples.

    .. math::  \hat a = \arg\max_a |\{j : a_j = a\}|, \qquad
               \text{returned: } \min\{j : a_j = \hat a\}

    ``answers`` are already normalised (equal answers compare equal); ``None`` (no extracted answer) does not
    vote. Ties between answers go to the one that occurs first.

    Args:
        answers: ``k`` normalised answers (or ``None``), in sample order.

    Returns:
        The index of the first sample holding the winning answer; ``None`` when no sample has an answer.
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for j, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, j)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, m in counts.items() if m == best)


def bootstrap_ci(
    numerators: Float[Tensor, "problem *metric"],
    denominators: Float[Tensor, "problem *metric"] | None = None,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Float[Tensor, "*metric"], Float[Tensor, "*metric"], Float[Tensor, "*metric"]]:
    r"""A figure over problems with its percentile-bootstrap interval (problems resampled with replacement).

    .. math::  \hat\theta = \frac{\sum_i x_i}{\sum_i d_i}, \qquad
               \hat\theta^{(b)} = \frac{\sum_i w^{(b)}_i x_i}{\sum_i w^{(b)}_i d_i}, \quad
               w^{(b)} \sim \mathrm{Multinomial}(P, \tfrac{1}{P}\mathbf{1}), \quad b = 1 \dots B

    and the interval is the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of the :math:`\hat\theta^{(b)}`
    (resamples whose denominator is 0 are left out), widened to hold :math:`\hat\theta` where floating-point
    rounding puts it a hair outside. Without ``denominators`` (all 1) :math:`\hat\theta` is the mean over
    problems; with per-problem sample counts it is the mean over samples (a ratio estimator, e.g. the mean
    length of the correct responses). Every metric column is resampled with the same problems, so their
    intervals are joint draws of one bootstrap.

    Args:
        numerators: ``(problem, *metric)`` per-problem values :math:`x_i`.
        denominators: ``(problem, *metric)`` per-problem weights :math:`d_i \geq 0`, or None (all 1).
        resamples: :math:`B \geq 1`.
        level: the interval's coverage, in (0, 1).
        seed: the resampling seed (the same inputs and seed give the same interval).

    Returns:
        ``(estimate, low, high)``, each ``(*metric,)`` float64; NaN where :math:`\sum_i d_i = 0`.

    Raises:
        ValueError: no problems, shapes that differ, ``resamples < 1`` or ``level`` outside (0, 1).
    """
    if resamples < 1:
        raise ValueError(f"bootstrap needs resamples >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap level must be in (0, 1), got {level}")
    x = numerators.to(torch.float64)
    d = torch.ones_like(x) if denominators is None else denominators.to(torch.float64)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"bootstrap needs at least one problem, got values of shape {tuple(x.shape)}")
    if d.shape != x.shape:
        raise ValueError(f"denominators {tuple(d.shape)} must have the numerators' shape {tuple(x.shape)}")
    metric_shape = x.shape[1:]
    problems = x.shape[0]
    x2, d2 = x.reshape(problems, -1), d.reshape(problems, -1)
    estimate = x2.sum(0) / d2.sum(0)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // (problems * x2.shape[1] or 1)))
    draws = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = torch.randint(problems, (rows, problems), generator=generator)  # problem indices, with replacement
        draws.append(x2[picks].sum(1) / d2[picks].sum(1))
    theta = torch.cat(draws)  # (resamples, metric)
    theta = torch.where(torch.isfinite(theta), theta, torch.full_like(theta, float("nan")))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.nanquantile(theta, q, dim=0)
    low = torch.minimum(low, estimate)
    high = torch.maximum(high, estimate)
    return estimate.reshape(metric_shape), low.reshape(metric_shape), high.reshape(metric_shape)


def paired_bootstrap_ci(
    baseline: Float[Tensor, "problem *metric"],
    other: Float[Tensor, "problem *metric"],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Float[Tensor, "*metric"], Float[Tensor, "*metric"], Float[Tensor, "*metric"]]:
    r"""The difference of two evaluations on the same problems, with its paired bootstrap interval.

    .. math::  \hat\Delta = \frac{1}{P}\sum_i (y_i - x_i), \qquad
               \hat\Delta^{(b)} = \frac{1}{P}\sum_i w^{(b)}_i (y_i - x_i)

    Both runs are resampled with the same problems (row ``i`` of each is problem ``i``), so the variation
    between problems, which both share, cancels: a difference far smaller than either interval's width can
    be significant. The interval is :func:`bootstrap_ci`'s of the per-problem differences.

    Args:
        baseline: ``(problem, *metric)`` per-problem values :math:`x_i` of the first run.
        other: ``(problem, *metric)`` values :math:`y_i` of the other run on the same problems.
        resamples: :math:`B \geq 1`.
        level: the interval's coverage, in (0, 1).
        seed: the resampling seed.

    Returns:
        ``(difference, low, high)``, each ``(*metric,)`` float64: ``other − baseline``.

    Raises:
        ValueError: the two have different shapes (not the same problems), or as :func:`bootstrap_ci`.
    """
    if baseline.shape != other.shape:
        raise ValueError(f"a paired comparison needs the same problems: shapes {tuple(baseline.shape)} and "
                         f"{tuple(other.shape)} differ")
    return bootstrap_ci(other.to(torch.float64) - baseline.to(torch.float64), resamples=resamples, level=level,
                        seed=seed)
