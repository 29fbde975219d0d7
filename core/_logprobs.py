"""Per-token log-probabilities and entropies without a full-vocabulary float32 copy."""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Rows of (batch*seq) processed at a time: bounds the float32 temporaries to
# _CHUNK_ROWS x vocab (e.g. 128 x 151,936 x 4 B = 78 MB) whatever the sequence length.
_CHUNK_ROWS = 128


def compute_entropy(logits: Float[Tensor, "batch seq vocab"]) -> Float[Tensor, "batch seq"]:
    r"""Entropy of the softmax over the vocabulary, per position.

    .. math::  H(p) = -\sum_v p_v \log p_v, \quad \log p_v = z_v - \operatorname{lse}(z)

    Computed through log-sum-exp, so it is finite and correct for ``|logits| ~ 1e4``.
    Differentiable; temporaries are float32 and chunked over positions.

    Args:
        logits: ``(batch, seq, vocab)`` unnormalised scores.

    Returns:
        ``(batch, seq)`` entropies in ``[0, log vocab]``, float32 (or float64 for float64 input).
    """
    return _tempered_entropy(logits, 1.0)


def _tempered_entropy(logits: Tensor, temperature: float) -> Tensor:
    """:func:`compute_entropy` of ``logits / temperature``, without a scaled copy of the logits."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = [_entropy_rows(chunk, temperature) for chunk in flat.split(_CHUNK_ROWS, dim=0)]
    return torch.cat(out, dim=0).reshape(logits.shape[:-1])


def _entropy_rows(rows: Tensor, temperature: float = 1.0) -> Tensor:
    z = rows.float() if rows.dtype != torch.float64 else rows
    if temperature != 1.0:
        z = z / temperature
    # -sum p log p on the shifted log-probs: no cancellation of two ~|z| sized terms.
    # Shift by the max first: z - max is exact for the entries that matter (Sterbenz), so the
    # log-probs keep full float32 precision even when |z| ~ 1e4.
    shifted = z - z.max(dim=-1, keepdim=True).values
    log_p = shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)
    return -(torch.exp(log_p) * log_p).sum(dim=-1)


class _LabelLogProbs(torch.autograd.Function):
    """log softmax(z / T)[y] over rows of (N, vocab), float32 math in chunks, gradient in z's dtype.

    Saves only the logits (already alive as the model's output), the labels and the (N,) log-sum-exp,
    so no full-vocabulary float32 tensor is kept for backward even when the logits are bf16; the
    temperature scales each chunk as it is upcast, so no scaled copy of the logits is made either.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / temperature
        lse = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        out = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            z = logits[start : start + _CHUNK_ROWS].to(acc)
            if inv_t != 1.0:
                z = z * inv_t
            y = labels[start : start + _CHUNK_ROWS]
            lse[start : start + _CHUNK_ROWS] = torch.logsumexp(z, dim=-1)
            out[start : start + _CHUNK_ROWS] = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse[start : start + _CHUNK_ROWS]
        ctx.save_for_backward(logits, labels, lse)
        ctx.inv_t = inv_t
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        grad = torch.empty_like(logits)
        in_place = grad.dtype == lse.dtype  # float32/64 logits: build each chunk inside grad itself
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            sl = slice(start, start + _CHUNK_ROWS)
            # d/dz (z_y / T - lse(z / T)) = (onehot(y) - softmax(z / T)) / T
            g = grad_out[sl].to(lse.dtype).unsqueeze(-1) * inv_t
            if in_place:
                chunk = torch.mul(logits[sl], inv_t, out=grad[sl]) if inv_t != 1.0 else grad[sl].copy_(logits[sl])
                chunk.sub_(lse[sl].unsqueeze(-1))
            else:
                chunk = logits[sl].to(lse.dtype)
                chunk = chunk.mul_(inv_t) if inv_t != 1.0 else chunk
                chunk.sub_(lse[sl].unsqueeze(-1))
            chunk.exp_().mul_(-g)
            chunk.scatter_add_(-1, labels[sl].unsqueeze(-1), g)
            if not in_place:
                grad[sl] = chunk.to(grad.dtype)
        return grad, None, None


def label_log_probs(
    logits: Float[Tensor, "batch seq vocab"],
    labels: Int[Tensor, "batch seq"],
    *,
    temperature: float = 1.0,
    return_token_entropy: bool = False,
    entropy_grad: bool = False,
) -> dict[str, Tensor]:
    r"""Log-probability of each label under ``softmax(logits / T)``, and optionally its entropy.

    .. math::  \log p_T(y_t) = z_{t, y_t}/T - \operatorname{lse}(z_t/T), \qquad
               H_T(t) = -\sum_v p_T(v)\,\log p_T(v)

    Never builds a full-vocabulary float32 log-softmax copy: the label logit is gathered and the
    log-sum-exp is taken in float32 chunks of positions (a custom autograd function whose backward
    recomputes the softmax chunk by chunk), so the extra peak memory beyond the logits and their
    gradient is bounded by one chunk. Under ``torch.compile`` the same quantities are written as plain
    expressions (no chunk loop, so one graph serves every sequence length) and inductor fuses them.

    Args:
        logits: ``(batch, seq, vocab)`` unnormalised scores.
        labels: ``(batch, seq)`` token ids.
        temperature: ``T > 0``, the sampling temperature whose distribution is scored.
        return_token_entropy: also return ``token_entropy``.
        entropy_grad: the entropy keeps its gradient (an entropy bonus in the loss; it then holds float32
            chunks of the vocabulary for backward); otherwise it is a logging statistic, without gradient.

    Returns:
        ``{"log_probs": (batch, seq)}`` float32, plus ``"token_entropy": (batch, seq)`` when asked.

    Raises:
        ValueError: ``temperature <= 0`` or ``labels`` not ``logits.shape[:-1]``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to score log-probs, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be logits' leading shape {tuple(logits.shape[:-1])}")
    grad_ctx = contextlib.nullcontext() if entropy_grad else torch.no_grad()
    if torch.compiler.is_compiling():
        # Traced by torch.compile: plain expressions with no loop over a shape-dependent number of
        # chunks (which would recompile for every sequence length); inductor fuses the float32
        # upcast into the log-sum-exp reduction, so no float32 copy of the logits is kept either.
        z = logits.float()
        if temperature != 1.0:
            z = z / temperature
        out = {"log_probs": z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)}
        if return_token_entropy:
            with grad_ctx:
                zd = z if entropy_grad else z.detach()
                log_p = zd - torch.logsumexp(zd, dim=-1, keepdim=True)
                out["token_entropy"] = -(torch.exp(log_p) * log_p).sum(dim=-1)
        return out
    flat = logits.reshape(-1, logits.shape[-1])
    log_probs = _LabelLogProbs.apply(flat, labels.reshape(-1), float(temperature))
    out = {"log_probs": log_probs.reshape(labels.shape)}
    if return_token_entropy:
        with grad_ctx:
            out["token_entropy"] = _tempered_entropy(logits if entropy_grad else logits.detach(), temperature)
    return out


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch seq"],
    labels: Int[Tensor, "batch seq"],
    return_token_entropy: bool = False,
    *,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    r"""Log-probability of each label under the model at sampling temperature ``T``, and optionally the
    token entropy of that distribution.

    .. math::  \log p_{\theta,T}(y_t \mid x, y_{<t}) = z_{t, y_t}/T - \operatorname{lse}(z_t/T), \quad
               z = \operatorname{model}(x).\mathrm{logits}

    ``T = 1`` (the default) is the model's own distribution (the course's interface); a sampler at
    temperature ``T`` draws from ``softmax(z / T)``, so its tokens' log-probs, and an on-policy importance
    ratio of 1, are these at the same ``T``. :func:`label_log_probs` on the model's logits: chunked
    float32 log-sum-exp, no full-vocabulary float32 copy; the entropy carries no gradient.

    Args:
        model: a causal LM whose ``model(input_ids).logits`` is ``(batch, seq, vocab)``.
        input_ids: ``(batch, seq)`` token ids.
        labels: ``(batch, seq)`` next-token ids (``input_ids`` shifted left).
        return_token_entropy: also return ``token_entropy``.
        temperature: ``T > 0``.

    Returns:
        ``{"log_probs": (batch, seq)}`` float32, plus ``"token_entropy": (batch, seq)`` when asked.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(
            f"get_response_log_probs: input_ids {tuple(input_ids.shape)} and labels "
            f"{tuple(labels.shape)} must have the same shape"
        )
    return label_log_probs(model(input_ids).logits, labels, temperature=temperature,
                           return_token_entropy=return_token_entropy)
