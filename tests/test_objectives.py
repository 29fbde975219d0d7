"""Objective extensions in core: asymmetric clip, k3 KL penalty, TIS weights, dynamic-sampling mask,
token-level length normalisation. Hand-worked values and hypothesis invariants.

Guard tests assert ``ValueError``. Where a wrong shape is already refused by the jaxtyping hook that
pytest installs (``TypeCheckError``, a ``TypeError``), the guard itself is exercised on the
undecorated function (``inspect.unwrap``) with shapes that would otherwise broadcast silently.
"""

from __future__ import annotations

import inspect
import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import core

# ---------------------------------------------------------------- helpers


def _close(tensor, expected):
    return torch.allclose(tensor.detach().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)


def _course_clip_loss(adv, lp, old, eps):
    """The course's GRPO-Clip loss and ``clipped`` flags, written out independently."""
    ratio = torch.exp(lp - old)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * adv
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@st.composite
def clip_inputs(draw):
    b, s = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64)
    old = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.4
    return adv, lp, old


# ---------------------------------------------------------------- asymmetric clip (clip-higher)


@given(clip_inputs(), st.floats(0.05, 0.5))
def test_cliprange_high_equal_to_cliprange_is_the_course_clip_loss(inputs, eps):
    adv, lp, old = inputs
    ref_loss, ref_clipped = _course_clip_loss(adv, lp, old, eps)
    for high in (None, eps):
        loss, meta = core.compute_grpo_clip_loss(adv, lp, old, eps, cliprange_high=high)
        assert torch.equal(loss, ref_loss)
        assert torch.equal(meta["clipped"], ref_clipped)
        assert meta["clip_fraction"].item() == pytest.approx(ref_clipped.double().mean().item())
        assert torch.equal(meta["ratio"], torch.exp(lp - old))


def test_cliprange_high_hand_worked():
    # ratios 1.25, 1.3 (A = +2) and 0.7 (A = -2); eps = 0.2, eps_high = 0.28
    lp = torch.log(torch.tensor([[1.25, 1.3], [0.7, 1.0]], dtype=torch.float64))
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([[2.0], [-2.0]], dtype=torch.float64)
    sym, meta_sym = core.compute_grpo_clip_loss(adv, lp, old, 0.2)
    assert _close(sym, [[-2 * 1.2, -2 * 1.2], [2 * 0.8, -2 * -1.0]])
    assert meta_sym["clipped"].tolist() == [[True, True], [True, False]]
    asym, meta = core.compute_grpo_clip_loss(adv, lp, old, 0.2, cliprange_high=0.28)
    # 1.25 < 1.28: unclipped -1.25 A; 1.3 > 1.28: clipped -1.28 A; the lower side keeps 1 - 0.2
    assert _close(asym, [[-2 * 1.25, -2 * 1.28], [2 * 0.8, 2.0]])
    assert meta["clipped"].tolist() == [[False, True], [True, False]]
    assert meta["clip_fraction"].item() == pytest.approx(0.5)


def test_cliprange_high_passes_through_dispatch_and_microbatch_loss():
    lp = torch.log(torch.tensor([[1.25, 1.3]], dtype=torch.float64))
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0]], dtype=torch.float64)
    direct, _ = core.compute_grpo_clip_loss(adv, lp, old, 0.2, cliprange_high=0.28)
    via, meta = core.compute_policy_gradient_loss(
        lp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange=0.2, cliprange_high=0.28
    )
    assert torch.equal(direct, via) and meta["clipped"].tolist() == [[False, True]]
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, meta = core.grpo_microbatch_loss(
        lp, mask, gradient_accumulation_steps=1, loss_type="grpo_clip", advantages=adv, old_log_probs=old,
        cliprange=0.2, cliprange_high=0.28,
    )
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2)
    assert meta["clip_fraction"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- k3 KL penalty


def test_kl_penalty_hand_worked():
    lp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64)).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.25]], dtype=torch.float64))
    kl = core.compute_kl_penalty(lp, ref)
    # delta = log(0.25/0.5) = -log 2: e^delta - delta - 1 = 0.5 + log 2 - 1
    assert _close(kl, [[0.5 + math.log(2) - 1, 0.0]])
    kl.sum().backward()
    # d/dlp (e^(ref-lp) - (ref-lp) - 1) = 1 - e^(ref-lp)
    assert _close(lp.grad, [[0.5, 0.0]])


@given(clip_inputs())
def test_kl_penalty_nonnegative_zero_at_equality_gradient_only_to_policy(inputs):
    _, lp0, ref0 = inputs
    lp = lp0.clone().requires_grad_(True)
    ref = ref0.clone().requires_grad_(True)
    kl = core.compute_kl_penalty(lp, ref)
    assert kl.shape == lp.shape
    assert torch.all(kl >= 0)
    assert torch.all(core.compute_kl_penalty(lp0, lp0) == 0)
    kl.sum().backward()
    assert ref.grad is None
    assert torch.allclose(lp.grad, 1 - torch.exp(ref0 - lp0))


def test_kl_penalty_shape_guard():
    lp, ref = torch.zeros(2, 3), torch.zeros(1, 3)  # would broadcast silently
    with pytest.raises((ValueError, TypeError)):
        core.compute_kl_penalty(lp, ref)
    with pytest.raises(ValueError, match="ref_log_probs"):
        inspect.unwrap(core.compute_kl_penalty)(lp, ref)


# ---------------------------------------------------------------- truncated importance weights


def test_truncated_importance_weights_hand_worked():
    old = torch.tensor([[math.log(2.0), math.log(0.5), 0.0]])
    sampler = torch.zeros(1, 3)
    w = core.truncated_importance_weights(old, sampler, cap=1.5)
    assert _close(w, [[1.5, 0.5, 1.0]])


@given(clip_inputs(), st.floats(0.5, 3.0))
def test_truncated_importance_weights_capped_exact_below_cap_and_gradient_free(inputs, cap):
    _, old0, sampler0 = inputs
    old = old0.clone().requires_grad_(True)
    sampler = sampler0.clone().requires_grad_(True)
    w = core.truncated_importance_weights(old, sampler, cap=cap)
    assert not w.requires_grad and w.grad_fn is None
    assert w.shape == old.shape
    assert torch.all(w <= cap) and torch.all(w > 0)
    raw = torch.exp(old0 - sampler0)
    below = raw < cap
    assert torch.allclose(w[below], raw[below])
    assert torch.all(w[~below] == cap)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan")])
def test_truncated_importance_weights_cap_must_be_positive(cap):
    with pytest.raises(ValueError, match="cap"):
        core.truncated_importance_weights(torch.zeros(2, 3), torch.zeros(2, 3), cap=cap)


def test_truncated_importance_weights_shape_guard():
    old, sampler = torch.zeros(2, 3), torch.zeros(2, 1)  # would broadcast silently
    with pytest.raises((ValueError, TypeError)):
        core.truncated_importance_weights(old, sampler, cap=2.0)
    with pytest.raises(ValueError, match="sampler_log_probs"):
        inspect.unwrap(core.truncated_importance_weights)(old, sampler, cap=2.0)


# ---------------------------------------------------------------- dynamic-sampling mask


def test_nonconstant_group_mask_hand_worked():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    assert core.nonconstant_group_mask(rewards, group_size=2).tolist() == [False, False, False, False, True, True]
    assert core.nonconstant_group_mask(rewards, group_size=3).tolist() == [True] * 6
    assert core.nonconstant_group_mask(rewards, group_size=1).tolist() == [False] * 6
    assert core.nonconstant_group_mask(torch.tensor([0.5, 0.25, 0.5, 0.5]), group_size=4).tolist() == [True] * 4
    assert core.nonconstant_group_mask(torch.tensor([1, 0, 1, 1]), group_size=2).tolist() == [True, True, False, False]


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_nonconstant_group_mask_matches_group_normalised_advantages(n_groups, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (n_groups * group_size,), generator=g).float()
    constant = torch.full((n_groups,), 0.5).repeat_interleave(group_size)
    assert not core.nonconstant_group_mask(constant, group_size=group_size).any()
    keep = core.nonconstant_group_mask(rewards, group_size=group_size)
    assert keep.dtype == torch.bool and keep.shape == rewards.shape
    # constant over each group, and true exactly where the (unnormalised) advantages are not all zero
    groups = keep.view(n_groups, group_size)
    assert torch.all(groups == groups[:, :1])
    adv = core.normalize_group_rewards(rewards, group_size=group_size, advantage_eps=1e-6, normalize_by_std=False)
    assert torch.equal(groups[:, 0], (adv.view(n_groups, group_size) != 0).any(dim=1))


@pytest.mark.parametrize(("n", "group_size"), [(5, 2), (4, 3), (4, 0), (4, -2)])
def test_nonconstant_group_mask_refuses_partial_groups(n, group_size):
    with pytest.raises(ValueError, match="group"):
        core.nonconstant_group_mask(torch.ones(n), group_size=group_size)


# ---------------------------------------------------------------- token-level length normalisation


def _per_token_reference(lp, adv, old, loss_type, weights, ref, kl_coef):
    """Written out independently of core: w * pg + kl_coef * k3."""
    if loss_type == "reinforce_with_baseline":
        pg = -adv * lp
    elif loss_type == "grpo_no_clip":
        pg = -torch.exp(lp - old) * adv
    else:
        pg, _ = _course_clip_loss(adv, lp, old, 0.2)
    delta = ref - lp
    return weights * pg + kl_coef * (torch.exp(delta) - delta - 1)


@st.composite
def split_batches(draw):
    b, s = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    cuts = sorted(draw(st.sets(st.integers(1, b - 1), max_size=b - 1))) if b > 1 else []
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, s, generator=g) > 0.4
    mask[0, 0] = True  # at least one response token; other rows may be empty
    base = -torch.rand(b, s, generator=g, dtype=torch.float64) * 2
    base = base.masked_fill(~mask, -40.0)  # garbage on padding must not matter
    old = base + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.3
    ref = base + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64)
    sampler = old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.3
    weights = core.truncated_importance_weights(old, sampler, cap=2.0)
    return [0, *cuts, b], base, mask, old, ref, adv, weights


@given(
    split_batches(),
    st.sampled_from(["reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]),
    st.booleans(),
    st.sampled_from([0.0, 0.1]),
)
def test_token_mean_is_invariant_to_microbatch_split(batch, loss_type, use_tis, kl_coef):
    bounds, base, mask, old, ref, adv, weights = batch
    n_tokens = float(mask.sum())

    def run(edges):
        lp = base.clone().requires_grad_(True)
        total = torch.zeros((), dtype=torch.float64)
        for lo, hi in pairwise(edges):
            sl = slice(lo, hi)
            loss, _ = core.grpo_microbatch_loss(
                lp[sl], mask[sl], gradient_accumulation_steps=len(edges) - 1, loss_type=loss_type,
                advantages=adv[sl], old_log_probs=old[sl], cliprange=0.2,
                length_normalization="token_mean", normalize_constant=n_tokens,
                importance_weights=weights[sl] if use_tis else None, ref_log_probs=ref[sl], kl_coef=kl_coef,
            )
            loss.backward()
            total = total + loss.detach()
        return total, lp.grad

    split_loss, split_grad = run(bounds)
    full_loss, full_grad = run([0, base.shape[0]])
    assert torch.allclose(split_loss, full_loss, atol=1e-12)
    assert torch.allclose(split_grad, full_grad, atol=1e-12)
    assert torch.all(full_grad[~mask] == 0)

    lp = base.clone().requires_grad_(True)
    per_token = _per_token_reference(lp, adv, old, loss_type, weights if use_tis else 1.0, ref, kl_coef)
    expected = per_token[mask].sum() / mask.sum()
    expected.backward()
    assert full_loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(full_grad, lp.grad, atol=1e-12)


def test_token_mean_hand_worked():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0], [-1.0]])
    kwargs = {"loss_type": "reinforce_with_baseline", "length_normalization": "token_mean", "normalize_constant": 4.0}
    # per-token -A*lp on response tokens: 1, 2 | -5, -6 -> sum -8 over 4 tokens; k is not applied
    loss, _ = core.grpo_microbatch_loss(lp, m, gradient_accumulation_steps=3, advantages=adv, **kwargs)
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert lp.grad.tolist() == [[-0.25, -0.25, 0.0], [0.0, 0.25, 0.25]]
    parts = [
        core.grpo_microbatch_loss(
            lp[i : i + 1], m[i : i + 1], gradient_accumulation_steps=2, advantages=adv[i : i + 1], **kwargs
        )[0]
        for i in range(2)
    ]
    assert [p.item() for p in parts] == pytest.approx([3 / 4, -11 / 4])
    assert "token_mean" in core.LENGTH_NORMALIZATIONS


def test_token_mean_needs_normalize_constant():
    lp, m, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1)
    with pytest.raises(ValueError, match="normalize_constant"):
        core.grpo_microbatch_loss(
            lp, m, gradient_accumulation_steps=1, loss_type="reinforce_with_baseline", advantages=adv,
            length_normalization="token_mean",
        )


def test_unknown_length_normalization_is_refused():
    lp, m, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1)
    with pytest.raises(ValueError, match="length_normalization"):
        core.grpo_microbatch_loss(
            lp, m, gradient_accumulation_steps=1, loss_type="reinforce_with_baseline", advantages=adv,
            length_normalization="token_sum", normalize_constant=6.0,
        )


# ---------------------------------------------------------------- TIS and KL terms in the microbatch loss


@given(
    clip_inputs(),
    st.sampled_from(["reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]),
    st.sampled_from(["masked_mean", "masked_normalize", "token_mean"]),
    st.integers(1, 3),
)
def test_unit_weights_and_zero_kl_leave_the_loss_unchanged(inputs, loss_type, norm, k):
    adv, base, old = inputs
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, -1] = base.shape[1] == 1  # a padded last column unless the sequence has one token
    common = {
        "gradient_accumulation_steps": k, "loss_type": loss_type, "advantages": adv, "old_log_probs": old,
        "cliprange": 0.2, "length_normalization": norm, "normalize_constant": float(mask.sum()),
    }
    results = []
    for extra in ({}, {"importance_weights": torch.ones_like(base), "ref_log_probs": old, "kl_coef": 0.0}):
        lp = base.clone().requires_grad_(True)
        loss, meta = core.grpo_microbatch_loss(lp, mask, **common, **extra)
        loss.backward()
        results.append((loss, lp.grad, meta))
    (loss0, grad0, meta0), (loss1, grad1, meta1) = results
    assert torch.equal(loss0, loss1) and torch.equal(grad0, grad1)
    assert "kl" not in meta0 and "tis_weight_mean" not in meta0
    assert meta1["tis_weight_mean"].item() == 1.0
    assert meta1["kl"].item() >= 0 and not meta1["kl"].requires_grad
    if loss_type == "grpo_clip":
        assert torch.equal(meta0["clip_fraction"], meta1["clip_fraction"])


def test_tis_and_kl_terms_hand_worked():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 2.0, 9.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    common = {"gradient_accumulation_steps": 1, "loss_type": "reinforce_with_baseline", "advantages": adv}
    loss, meta = core.grpo_microbatch_loss(lp, m, importance_weights=w, **common)
    # weighted -A*lp: 0.5, 4 | -5, -6 -> row means 2.25 and -5.5 -> -1.625
    assert loss.item() == pytest.approx(-1.625)
    assert meta["tis_weight_mean"].item() == pytest.approx((0.5 + 2 + 1 + 1) / 4)
    loss.backward()
    assert _close(lp.grad, [[-0.125, -0.5, 0.0], [0.0, 0.25, 0.25]])

    ref = lp.detach() + torch.tensor([[math.log(2.0), 0.0, 5.0], [0.0, 0.0, -math.log(2.0)]], dtype=torch.float64)
    k3_2 = 2 - math.log(2) - 1  # delta = log 2
    k3_half = 0.5 + math.log(2) - 1  # delta = -log 2
    loss, meta = core.grpo_microbatch_loss(lp.detach(), m, ref_log_probs=ref, kl_coef=0.1, **common)
    assert meta["kl"].item() == pytest.approx((k3_2 + k3_half) / 4)
    assert loss.item() == pytest.approx(((1 + 2 + 0.1 * k3_2) / 2 + (-5 - 6 + 0.1 * k3_half) / 2) / 2)
    loss_ref_only, meta_ref_only = core.grpo_microbatch_loss(lp.detach(), m, ref_log_probs=ref, **common)
    assert loss_ref_only.item() == pytest.approx(-2.0)
    assert meta_ref_only["kl"].item() == pytest.approx(meta["kl"].item())


def test_kl_coef_needs_ref_log_probs_and_is_nonnegative():
    lp, m, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1)
    common = {"gradient_accumulation_steps": 1, "loss_type": "reinforce_with_baseline", "advantages": adv}
    with pytest.raises(ValueError, match="ref_log_probs"):
        core.grpo_microbatch_loss(lp, m, kl_coef=0.1, **common)
    with pytest.raises(ValueError, match="kl_coef"):
        core.grpo_microbatch_loss(lp, m, kl_coef=-0.1, ref_log_probs=lp, **common)


def test_importance_weights_shape_guard():
    lp, m, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1)
    w = torch.ones(2, 1)  # would broadcast along seq
    common = {
        "gradient_accumulation_steps": 1, "loss_type": "reinforce_with_baseline", "advantages": adv,
        "importance_weights": w,
    }
    with pytest.raises((ValueError, TypeError)):
        core.grpo_microbatch_loss(lp, m, **common)
    with pytest.raises(ValueError, match="importance_weights"):
        inspect.unwrap(core.grpo_microbatch_loss)(lp, m, **common)
