"""Masked reductions over token positions."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Mask = Bool[Tensor, "*shape"] | Int[Tensor, "*shape"] | Float[Tensor, "*shape"]


def _check_mask(tensor: Tensor, mask: Tensor, fn: str) -> Tensor:
    # A mask of another shape would broadcast silently (e.g. (batch,) against (batch, seq)).
    if tuple(mask.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{fn}: mask shape {tuple(mask.shape)} must equal tensor shape {tuple(tensor.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(
    tensor: Float[Tensor, "*shape"],
    mask: Mask,
    dim: int | None = None,
) -> Float[Tensor, "*reduced"]:
    r"""Mean of ``tensor`` over the positions where ``mask`` is true.

    .. math::  \operatorname{masked\_mean}(x, m)_d = \frac{\sum_d m \, x}{\sum_d m}

    Masked-out entries do not reach the result or its gradient, even when they are NaN or inf.
    A slice with no true entry gives NaN (0/0), as the reference does: loops must never feed one.

    Args:
        tensor: ``(*shape)`` values.
        mask: ``(*shape)`` bool (or 0/1) mask, same shape as ``tensor``.
        dim: dimension to reduce; ``None`` reduces every element to a scalar.

    Returns:
        ``(*shape without dim)``, or a scalar when ``dim`` is None.
    """
    m = _check_mask(tensor, mask, "masked_mean")
    masked = torch.where(m, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    count = m.sum(dim=dim) if dim is not None else m.sum()
    total = masked.sum(dim=dim) if dim is not None else masked.sum()
    return total / count.to(total.dtype)


def masked_normalize(
    tensor: Float[Tensor, "*shape"],
    mask: Mask,
    normalize_constant: float,
    dim: int | None = None,
) -> Float[Tensor, "*reduced"]:
    r"""Sum of ``tensor`` where ``mask`` is true, divided by a constant (Dr. GRPO's length normalisation).

    .. math::  \operatorname{masked\_normalize}(x, m, c)_d = \frac{1}{c} \sum_d m \, x

    Args:
        tensor: ``(*shape)`` values.
        mask: ``(*shape)`` bool (or 0/1) mask, same shape as ``tensor``.
        normalize_constant: the divisor ``c`` (e.g. the maximum generation length).
        dim: dimension to sum over; ``None`` sums every element.

    Returns:
        ``(*shape without dim)``, or a scalar when ``dim`` is None.
    """
    m = _check_mask(tensor, mask, "masked_normalize")
    masked = torch.where(m, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    total = masked.sum(dim=dim) if dim is not None else masked.sum()
    return total / normalize_constant
