"""The functional core: hand-worked values and hypothesis invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import core
from shell import grpo_microbatch_train_step, make_train_step, sft_microbatch_train_step
from shell.steps import PolicyGradientTensors

# ---------------------------------------------------------------- strategies


@st.composite
def masked_batches(draw, min_batch=1, max_batch=4, min_seq=1, max_seq=6):
    b = draw(st.integers(min_batch, max_batch))
    s = draw(st.integers(min_seq, max_seq))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, generator=g, dtype=torch.float64)
    mask = torch.rand(b, s, generator=g) > 0.4
    mask[:, 0] = True  # every row has a response token (loops never feed an empty row)
    return x, mask


# ---------------------------------------------------------------- masking


def test_masked_mean_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, True]])
    assert core.masked_mean(x, m).item() == pytest.approx((1 + 3 + 6) / 3)
    assert torch.allclose(core.masked_mean(x, m, dim=1), torch.tensor([2.0, 6.0]))
    assert torch.allclose(core.masked_mean(x, m, dim=0), torch.tensor([1.0, float("nan"), 4.5]), equal_nan=True)
    assert torch.allclose(core.masked_normalize(x, m, 2.0, dim=1), torch.tensor([2.0, 3.0]))
    assert core.masked_normalize(x, m, 5.0).item() == pytest.approx(10 / 5)


def test_masked_mean_empty_slice_is_nan():
    x = torch.ones(2, 3)
    m = torch.zeros(2, 3, dtype=torch.bool)
    assert math.isnan(core.masked_mean(x, m).item())


def test_mask_shape_mismatch_is_refused(no_shape_checks):
    # Outside the pytest-only shape checker, only the function's own guard stands between a (3,) mask and a
    # silent broadcast over (3, 3).
    with pytest.raises(ValueError, match="mask"):
        core.masked_mean(torch.ones(3, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        core.masked_normalize(torch.ones(3, 3), torch.ones(3, dtype=torch.bool), 2.0)


@given(masked_batches(), st.sampled_from([None, 0, 1, -1]), st.floats(0.5, 10.0))
def test_masked_out_values_change_neither_output_nor_gradient(batch, dim, const):
    x, m = batch
    garbage = torch.where(m, x, torch.full_like(x, 1e30))
    garbage[~m] = float("nan") if dim is None else 1e30
    for fn in (lambda t: core.masked_mean(t, m, dim=dim), lambda t: core.masked_normalize(t, m, const, dim=dim)):
        a = x.clone().requires_grad_(True)
        b = garbage.clone().requires_grad_(True)
        out_a, out_b = fn(a), fn(b)
        assert torch.allclose(out_a, out_b, equal_nan=True)
        out_a.nan_to_num().sum().backward()
        out_b.nan_to_num().sum().backward()
        assert torch.equal(a.grad, b.grad)
        assert torch.all(a.grad[~m] == 0)


# ---------------------------------------------------------------- entropy and log-probs


def test_entropy_hand_worked():
    uniform = torch.zeros(1, 1, 8)
    assert core.compute_entropy(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    onehot = torch.tensor([[[1e4, 0.0, 0.0]]])
    assert core.compute_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert core.compute_entropy(p.log().view(1, 1, 3)).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 50), st.floats(1e-3, 1e4), st.integers(0, 1000))
def test_entropy_bounds_and_finite(b, s, v, scale, seed):
    logits = torch.randn(b, s, v, generator=torch.Generator().manual_seed(seed)) * scale
    h = core.compute_entropy(logits)
    assert h.shape == (b, s)
    assert torch.isfinite(h).all()
    assert (h >= -1e-5).all() and (h <= math.log(v) + 1e-5).all()
    ref = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    assert torch.allclose(h.double(), ref, atol=1e-4)


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a learnable table indexed by position (for exact gradients)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids):
        class Out:
            pass

        out = Out()
        out.logits = self.table[: input_ids.shape[0], : input_ids.shape[1]] + 0 * input_ids[..., None]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_get_response_log_probs_matches_log_softmax_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 100, 11, generator=g) * 3).to(dtype)  # 300 positions: several chunks of 128 rows
    labels = torch.randint(0, 11, (3, 100), generator=g)
    model = _FixedLogits(logits)
    out = core.get_response_log_probs(model, labels, labels, return_token_entropy=True)
    ref_model = _FixedLogits(logits)
    ref = torch.log_softmax(ref_model.table.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    tol = 2e-6 if dtype == torch.float32 else 1e-2  # float32 maths: within a few ulps of |log p| <= ~15
    assert out["log_probs"].dtype == torch.float32
    assert torch.allclose(out["log_probs"].double(), ref, atol=tol, rtol=0)
    ent_ref = -(torch.softmax(logits.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    assert torch.allclose(out["token_entropy"].double(), ent_ref, atol=tol, rtol=0)
    w = torch.randn(3, 100, generator=g)
    (out["log_probs"] * w).sum().backward()
    (ref * w).sum().backward()
    assert model.table.grad.dtype == dtype
    assert torch.allclose(model.table.grad.double(), ref_model.table.grad.double(), atol=tol, rtol=0)


def test_get_response_log_probs_only_entropy_when_asked():
    model = _FixedLogits(torch.randn(1, 3, 5))
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert set(core.get_response_log_probs(model, ids, ids)) == {"log_probs"}


# ---------------------------------------------------------------- tokenisation


class _CharTokenizer:
    """One token per character (ids = ord), pad id 0: enough to hand-check the shifting."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_tokenize_prompt_and_output_hand_worked():
    out = core.tokenize_prompt_and_output(["ab", "c"], ["XY", "Z"], _CharTokenizer())
    a, b, c, X, Y, Z = (ord(ch) for ch in "abcXYZ")
    assert out["input_ids"].tolist() == [[a, b, X], [c, Z, 0]]
    assert out["labels"].tolist() == [[b, X, Y], [Z, 0, 0]]
    assert out["response_mask"].tolist() == [[False, True, True], [True, False, False]]
    assert out["response_mask"].dtype == torch.bool


def test_tokenize_uses_eos_when_no_pad():
    tok = _CharTokenizer()
    tok.pad_token_id = None
    out = core.tokenize_prompt_and_output(["a", "abc"], ["b", "d"], tok)
    assert out["labels"][0, -1].item() == 1


# ---------------------------------------------------------------- advantages


def _reward_fn(response, truth):
    r = float(response == truth)
    return {"reward": r, "format_reward": 1.0, "answer_reward": r}


def test_group_normalized_rewards_hand_worked():
    responses = ["1", "2", "1", "1", "0", "0"]
    truths = ["1", "1", "1", "0", "0", "0"]
    adv, raw, meta = core.compute_group_normalized_rewards(_reward_fn, responses, truths, 3, 1e-6, True)
    assert raw.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert raw.dtype == adv.dtype == torch.float32 and adv.shape == (6,)
    std = torch.tensor([1.0, 0.0, 1.0]).std().item()  # unbiased: sqrt(1/3)
    expected = [(1 - 2 / 3) / (std + 1e-6), (0 - 2 / 3) / (std + 1e-6), (1 - 2 / 3) / (std + 1e-6)]
    assert adv[:3].tolist() == pytest.approx(expected, rel=1e-5)
    assert adv[3:].tolist() == pytest.approx([-2 / 3 / (std + 1e-6), 1 / 3 / (std + 1e-6), 1 / 3 / (std + 1e-6)], rel=1e-5)
    adv2, _, _ = core.compute_group_normalized_rewards(_reward_fn, responses, truths, 3, 1e-6, False)
    assert adv2.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3, -2 / 3, 1 / 3, 1 / 3], rel=1e-5)
    assert meta["reward_mean"] == pytest.approx(4 / 6)
    assert meta["zero_variance_group_fraction"] == 0.0
    assert meta["format_reward_mean"] == 1.0
    assert all(isinstance(v, float) for v in meta.values())


def test_group_normalized_advantages_of_graded_scores_hand_worked():
    scores = [{"reward": 1.0, "format_reward": 1.0, "answer_reward": 1.0}, {"reward": 0.0, "format_reward": 1.0, "answer_reward": 0.0},
              {"reward": 0.0, "format_reward": 0.0, "answer_reward": 0.0}, {"reward": 0.0, "format_reward": 1.0, "answer_reward": 0.0}]
    adv, raw, meta = core.group_normalized_advantages(scores, group_size=2, advantage_eps=0.0, normalize_by_std=False)
    assert raw.tolist() == [1.0, 0.0, 0.0, 0.0] and adv.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert (meta["format_reward_mean"], meta["answer_reward_mean"], meta["zero_variance_group_fraction"]) == (0.75, 0.25, 0.5)
    responses, truths = ["1", "2", "1", "1"], ["1", "1", "0", "0"]  # the reference adapter is this function of its scores
    ref = core.compute_group_normalized_rewards(_reward_fn, responses, truths, 2, 1e-6, True)
    own = core.group_normalized_advantages([_reward_fn(r, t) for r, t in zip(responses, truths)], group_size=2,
                                           advantage_eps=1e-6, normalize_by_std=True)
    assert all(torch.equal(a, b) for a, b in zip(ref[:2], own[:2])) and ref[2] == own[2]


@given(st.integers(1, 5), st.integers(2, 6), st.booleans(), st.integers(0, 10_000))
def test_advantages_sum_to_zero_per_group(n_groups, group_size, by_std, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(n_groups * group_size, generator=g) > 0.5).float()
    adv = core.normalize_group_rewards(rewards, group_size=group_size, advantage_eps=1e-6, normalize_by_std=by_std)
    sums = adv.view(n_groups, group_size).sum(1)
    assert torch.allclose(sums, torch.zeros(n_groups), atol=1e-4)
    same = rewards.view(n_groups, group_size)
    equal_groups = (same == same[:, :1]).all(1)
    assert torch.all(adv.view(n_groups, group_size)[equal_groups] == 0)


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="groups"):
        core.normalize_group_rewards(torch.ones(5), group_size=2, advantage_eps=1e-6, normalize_by_std=True)


# ---------------------------------------------------------------- losses


def test_naive_and_clip_loss_hand_worked():
    lp = torch.tensor([[-1.0, -2.0]])
    a = torch.tensor([[2.0]])
    assert core.compute_naive_policy_gradient_loss(a, lp).tolist() == [[2.0, 4.0]]
    old = torch.tensor([[-1.0, -2.0 - math.log(2.0)]])  # ratios 1 and 2
    loss, meta = core.compute_grpo_clip_loss(a, lp, old, 0.2)
    assert loss[0].tolist() == pytest.approx([-2.0, -2.4])
    assert meta["clipped"].tolist() == [[False, True]]
    assert meta["clip_fraction"].item() == pytest.approx(0.5)
    loss_neg, meta_neg = core.compute_grpo_clip_loss(-a, lp, old, 0.2)
    # negative advantage: min(-2r, -2 clip(r)) is the unclipped -4 at r=2
    assert loss_neg[0].tolist() == pytest.approx([2.0, 4.0])
    assert meta_neg["clipped"].tolist() == [[False, False]]


@given(st.integers(1, 4), st.integers(1, 6), st.floats(0.05, 0.5), st.integers(0, 10_000))
def test_clip_loss_inside_range_equals_unclipped_and_zero_grad_where_binding(b, s, eps, seed):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64)
    old = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    lp = (old + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    loss, meta = core.compute_grpo_clip_loss(adv, lp, old, eps)
    unclipped, _ = core.compute_policy_gradient_loss(lp, "grpo_no_clip", advantages=adv, old_log_probs=old)
    ratio = torch.exp(lp - old)
    inside = (ratio > 1 - eps) & (ratio < 1 + eps)
    assert torch.allclose(loss[inside], unclipped[inside])
    loss.sum().backward()
    assert torch.all(lp.grad[meta["clipped"]] == 0)
    assert torch.all(lp.grad[inside & (adv != 0).expand_as(lp)] != 0)


def test_policy_gradient_loss_dispatch_and_errors():
    lp = torch.randn(2, 3)
    r = torch.tensor([[1.0], [0.0]])
    loss, _ = core.compute_policy_gradient_loss(lp, "no_baseline", raw_rewards=r)
    assert torch.allclose(loss, -r * lp)
    loss, _ = core.compute_policy_gradient_loss(lp, "reinforce_with_baseline", advantages=r - 0.5)
    assert torch.allclose(loss, -(r - 0.5) * lp)
    loss, meta = core.compute_policy_gradient_loss(lp, "grpo_clip", advantages=r, old_log_probs=lp, cliprange=0.2)
    assert torch.allclose(loss, -r * torch.ones_like(lp)) and meta["clip_fraction"].item() == 0
    with pytest.raises(ValueError, match="unknown loss_type"):
        core.compute_policy_gradient_loss(lp, "ppo", advantages=r)
    with pytest.raises(ValueError, match="raw_rewards"):
        core.compute_policy_gradient_loss(lp, "no_baseline", advantages=r)
    with pytest.raises(ValueError, match="cliprange"):
        core.compute_policy_gradient_loss(lp, "grpo_clip", advantages=r, old_log_probs=lp)
    with pytest.raises(ValueError, match="old_log_probs"):
        core.compute_policy_gradient_loss(lp, "grpo_no_clip", advantages=r)


def test_per_sequence_advantage_shape_is_checked(no_shape_checks):
    # (3,) against (3, 3) would broadcast along seq: only the guard refuses it once the shape checker is off.
    lp = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"\(batch, 1\)"):
        core.compute_naive_policy_gradient_loss(torch.ones(3), lp)
    with pytest.raises(ValueError, match=r"\(batch, 1\)"):
        core.compute_grpo_clip_loss(torch.ones(3), lp, lp, 0.2)
    with pytest.raises(ValueError, match="old_log_probs"):
        core.compute_grpo_clip_loss(torch.ones(3, 1), lp, torch.randn(3, 1), 0.2)


def test_no_shape_checks_fixture_really_turns_the_checker_off(no_shape_checks):
    # The guard tests above rely on it: with the checker on, a wrong dtype raises TypeCheckError (a TypeError).
    out = core.compute_entropy(torch.zeros(2, 3, 4))
    assert out.shape == (2, 3)
    import jaxtyping

    assert jaxtyping.config.jaxtyping_disable


# ---------------------------------------------------------------- microbatch steps


def test_sft_microbatch_train_step_hand_worked():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, True]])
    loss, meta = sft_microbatch_train_step(lp, m, 2, normalize_constant=2.0)
    # per example: -(-3)/2 = 1.5 and -(-11)/2 = 5.5; mean 3.5; / 2 steps
    assert loss.item() == pytest.approx(1.75)
    assert lp.grad.tolist() == [[-0.125, -0.125, 0.0], [0.0, -0.125, -0.125]]
    assert meta["num_response_tokens"].item() == 4


def test_grpo_microbatch_train_step_hand_worked():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    m = torch.tensor([[True, True, False], [False, True, True]])
    adv = torch.tensor([[1.0], [-1.0]])
    loss, _ = grpo_microbatch_train_step(lp, m, 1, "reinforce_with_baseline", advantages=adv)
    # per example masked mean of -A*lp: (1+2)/2 = 1.5 ; -(5+6)/2 = -5.5 ; batch mean -2
    assert loss.item() == pytest.approx(-2.0)
    assert lp.grad.tolist() == [[-0.25, -0.25, 0.0], [0.0, 0.25, 0.25]]
    lp.grad = None
    loss, _ = grpo_microbatch_train_step(
        lp, m, 2, "reinforce_with_baseline", advantages=adv, length_normalization="masked_normalize", normalize_constant=4.0
    )
    assert loss.item() == pytest.approx(((1 + 2) / 4 - (5 + 6) / 4) / 2 / 2)
    with pytest.raises(ValueError, match="normalize_constant"):
        grpo_microbatch_train_step(lp, m, 1, "no_baseline", raw_rewards=adv, length_normalization="masked_normalize")


@given(st.integers(1, 4), st.sampled_from(["sft", "grpo_clip", "reinforce_with_baseline", "grpo_no_clip"]),
       st.sampled_from(["masked_mean", "masked_normalize"]), st.integers(0, 10_000))
def test_gradient_accumulation_equals_one_big_batch(k, kind, norm, seed):
    g = torch.Generator().manual_seed(seed)
    per, seq = 2, 5
    base = -torch.rand(k * per, seq, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(k * per, seq, generator=g) > 0.3
    mask[:, 0] = True
    adv = torch.randn(k * per, 1, generator=g, dtype=torch.float64)
    old = base + torch.randn(k * per, seq, generator=g, dtype=torch.float64) * 0.1

    def run(chunks: int) -> torch.Tensor:
        lp = base.clone().requires_grad_(True)
        size = k * per // chunks
        for i in range(chunks):
            sl = slice(i * size, (i + 1) * size)
            if kind == "sft":
                sft_microbatch_train_step(lp[sl], mask[sl], chunks, normalize_constant=3.0)
            else:
                grpo_microbatch_train_step(
                    lp[sl], mask[sl], chunks, kind, advantages=adv[sl], old_log_probs=old[sl], cliprange=0.2,
                    length_normalization=norm, normalize_constant=float(seq),
                )
        return lp.grad

    assert torch.allclose(run(k), run(1), atol=1e-10)


@given(masked_batches(min_batch=2), st.sampled_from(["grpo_clip", "reinforce_with_baseline"]))
def test_masked_out_tokens_do_not_change_loss_or_gradient(batch, kind):
    lp_base, mask = batch
    lp_base = -lp_base.abs()
    noise = torch.where(mask, torch.zeros_like(lp_base), torch.full_like(lp_base, -50.0))
    adv = torch.linspace(-1, 1, lp_base.shape[0], dtype=torch.float64)[:, None]
    results = []
    for lp0 in (lp_base, lp_base + noise):
        lp = lp0.clone().requires_grad_(True)
        loss, _ = grpo_microbatch_train_step(lp, mask, 1, kind, advantages=adv, old_log_probs=lp_base, cliprange=0.2)
        results.append((loss, lp.grad))
    assert torch.allclose(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_make_train_step_matches_manual_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(13, 8), torch.nn.Linear(8, 13))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            class Out:
                pass

            o = Out()
            o.logits = self.inner(ids)
            return o

    wrapped = Wrapper()
    ids = torch.randint(0, 13, (3, 6))
    labels = torch.randint(0, 13, (3, 6))
    mask = torch.rand(3, 6) > 0.3
    mask[:, 0] = True
    adv = torch.randn(3, 1)
    step = make_train_step(wrapped, "grpo")
    loss, meta = step(ids, labels, mask, settings=core.ObjectiveSettings(loss_type="reinforce_with_baseline"),
                      tensors=PolicyGradientTensors(advantages=adv), return_token_entropy=True)
    grads = [p.grad.clone() for p in wrapped.parameters()]
    wrapped.zero_grad()
    lp = core.get_response_log_probs(wrapped, ids, labels)["log_probs"]
    ref, _ = grpo_microbatch_train_step(lp, mask, 1, "reinforce_with_baseline", advantages=adv)
    assert torch.allclose(loss, ref)
    for a, b in zip(grads, [p.grad for p in wrapped.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)
    assert meta["token_entropy"].shape == (3, 6)
    with pytest.raises(ValueError, match="objective"):
        make_train_step(wrapped, "dpo")


def test_shape_annotations_are_checked_under_pytest():
    # The jaxtyping import hook (pyproject addopts) instruments `core` with beartype.
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        core.compute_entropy(torch.zeros(2, 3, dtype=torch.long))
