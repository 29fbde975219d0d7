"""The typed policy-gradient objective (core.policy_gradient_objective) and the objectives peers ship: GSPO, CISPO,
RLOO advantages, DAPO's overlong penalty, the entropy bonus, log-probs at a temperature; and the invariance suite
(microbatch split × loss type × length normalisation, padding, the shared-prompt-prefix path, compile, on-policy
ratio 1 at T = 1 and T = 0.7)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import core
from doubles import tiny_policy
from shell.config import OptimConfig, SamplingConfig
from shell.grpo import GRPOConfig, check_config, pg_settings
from shell.rollout import Rollouts
from shell.steps import PolicyGradientTensors, make_train_step, tokenize_batch
from shell.update import Learner, PolicyGradientSettings, grpo_update

LOSS_TYPES = core.POLICY_LOSS_TYPES
NORMS = core.LENGTH_NORMALIZATIONS


# ---------------------------------------------------------------------------------------------- GSPO


def test_gspo_hand_worked():
    # one response of 2 tokens: mean(lp - old) = (log 1.1 + log 1.3) / 2 -> s = sqrt(1.1 * 1.3)
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.1, 1.3, 5.0]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([[2.0]], dtype=torch.float64)
    loss, meta = core.compute_gspo_loss(adv, lp, old, mask, cliprange=0.2)
    s = math.sqrt(1.1 * 1.3)
    assert meta["sequence_ratio"].item() == pytest.approx(s)
    assert loss[0, :2].tolist() == pytest.approx([-2 * s, -2 * s])  # inside [0.8, 1.2]: unclipped
    core.masked_mean(loss, mask).backward()
    assert lp.grad[0].tolist() == pytest.approx([-2 * s / 2, -2 * s / 2, 0.0])  # s * A * (1/|y|) per token
    # above 1 + eps with a positive advantage: clipped, no gradient
    lp2 = torch.log(torch.tensor([[1.5, 1.5, 1.0]], dtype=torch.float64)).requires_grad_(True)
    loss, meta = core.compute_gspo_loss(adv, lp2, old, mask, cliprange=0.2, cliprange_high=0.3)
    assert loss[0, :2].tolist() == pytest.approx([-2 * 1.3, -2 * 1.3]) and meta["clipped"][0, :2].all()
    core.masked_mean(loss, mask).backward()
    assert lp2.grad.abs().max().item() == 0.0


@st.composite
def pg_batches(draw, dtype=torch.float64):
    b, s = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[0, 0] = True
    base = -torch.rand(b, s, generator=g, dtype=dtype) * 2
    old = base + torch.randn(b, s, generator=g, dtype=dtype) * 0.2
    adv = torch.randn(b, 1, generator=g, dtype=dtype)
    return base.masked_fill(~mask, -30.0), old, mask, adv


@given(pg_batches(), st.sampled_from([0.05, 0.2]), st.sampled_from([None, 0.3]))
def test_gspo_token_is_gspo_with_a_per_response_mean(batch, eps, eps_high):
    """GSPO-token with masked_mean has GSPO's sequence loss -min(s A, clip(s) A) and its gradient."""
    lp0, old, mask, adv = batch
    lp = lp0.clone().requires_grad_(True)
    loss, _ = core.compute_gspo_loss(adv, lp, old, mask, cliprange=eps, cliprange_high=eps_high)
    counts = mask.sum(-1).clamp(min=1)
    token_form = ((loss * mask).sum(-1) / counts).mean()
    token_form.backward()
    ref = lp0.clone().requires_grad_(True)
    s = torch.exp(((ref - old) * mask).sum(-1, keepdim=True) / counts.unsqueeze(-1))
    hi = eps if eps_high is None else eps_high
    seq = -torch.minimum(s * adv, s.clamp(1 - eps, 1 + hi) * adv)
    seq = torch.where(mask.any(-1, keepdim=True), seq, torch.zeros_like(seq))  # an empty response contributes 0
    seq.mean().backward()
    assert token_form.item() == pytest.approx(seq.mean().item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(lp.grad, ref.grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------- CISPO


def test_cispo_hand_worked_every_token_keeps_a_gradient():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.log(torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[3.0]], dtype=torch.float64)
    loss, meta = core.compute_cispo_loss(adv, lp, old, cliprange_low=0.2, cliprange_high=0.28)
    w = torch.tensor([0.8, 1.0, 1.28], dtype=torch.float64)  # clip(r, 0.8, 1.28)
    assert torch.allclose(loss.detach(), -w * 3 * lp.detach())
    loss.sum().backward()
    assert torch.allclose(lp.grad, -3 * w)  # d/dlp of -sg(w) A lp: never 0, clipped or not
    assert meta["clipped_low"].tolist() == [[True, False, False]]
    assert meta["clipped_high"].tolist() == [[False, False, True]]


@given(pg_batches(), st.sampled_from([0.2, 1.0]), st.sampled_from([0.28, 2.0]))
def test_cispo_gradient_is_the_clipped_weight_times_the_advantage(batch, low, high):
    lp0, old, _, adv = batch
    lp = lp0.clone().requires_grad_(True)
    loss, meta = core.compute_cispo_loss(adv, lp, old, cliprange_low=low, cliprange_high=high)
    loss.sum().backward()
    weight = torch.exp(lp0 - old).clamp(1 - low, 1 + high)
    assert torch.allclose(lp.grad, -weight * adv, atol=1e-12)
    assert torch.equal(meta["clipped_high"], torch.exp(lp0 - old) > 1 + high)


# ---------------------------------------------------------------------------------------------- RLOO, overlong


def test_rloo_hand_worked():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    a = core.compute_rloo_advantages(r, group_size=3)
    assert a.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="group_size >= 2"):
        core.compute_rloo_advantages(r, group_size=1)
    with pytest.raises(ValueError, match="whole number of groups"):
        core.compute_rloo_advantages(r, group_size=4)


@given(st.integers(1, 4), st.integers(2, 6), st.integers(0, 10_000))
def test_rloo_is_reward_minus_the_mean_of_the_others(n_groups, g, seed):
    r = torch.randint(0, 3, (n_groups * g,), generator=torch.Generator().manual_seed(seed)).float()
    a = core.compute_rloo_advantages(r, group_size=g)
    for i in range(len(r)):
        q = i // g
        others = [r[j] for j in range(q * g, q * g + g) if j != i]
        assert a[i].item() == pytest.approx((r[i] - sum(others) / (g - 1)).item(), abs=1e-6)
    assert torch.allclose(a.reshape(-1, g).sum(-1), torch.zeros(n_groups), atol=1e-5)
    centred = core.normalize_group_rewards(r, group_size=g, advantage_eps=0.0, normalize_by_std=False)
    assert torch.allclose(a, centred * g / (g - 1), atol=1e-6)


def test_overlong_penalty_hand_worked():
    lengths = torch.tensor([0, 10, 12, 14, 16, 20])
    p = core.overlong_penalty(lengths, max_tokens=16, buffer=4, penalty=0.5)
    assert p.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError, match="buffer"):
        core.overlong_penalty(lengths, max_tokens=16, buffer=0)
    with pytest.raises(ValueError, match="penalty"):
        core.overlong_penalty(lengths, max_tokens=16, buffer=4, penalty=-1.0)


@given(st.integers(1, 64), st.integers(1, 64), st.floats(0, 3))
def test_overlong_penalty_is_zero_then_linear_to_minus_p(max_tokens, buffer, penalty):
    buffer = min(buffer, max_tokens)
    lengths = torch.arange(0, max_tokens + 1)
    p = core.overlong_penalty(lengths, max_tokens=max_tokens, buffer=buffer, penalty=penalty)
    assert torch.all(p[: max_tokens - buffer + 1] == 0) and p[-1].item() == pytest.approx(-penalty)
    assert torch.all(p[1:] <= p[:-1] + 1e-7)  # never grows with the length
    assert torch.allclose(p.diff()[max_tokens - buffer:], torch.full((buffer,), -penalty / buffer), atol=1e-5)


def test_group_normalized_advantages_dispatches_the_estimator_and_adds_the_length_penalty():
    scores = [{"reward": r, "format_reward": 1.0, "answer_reward": r} for r in (1.0, 0.0, 0.0, 1.0)]
    shaping = torch.tensor([0.0, -0.5, 0.0, 0.0])
    adv, raw, stats = core.group_normalized_advantages(scores, group_size=2, advantage_eps=1e-6, normalize_by_std=True,
                                                       estimator="rloo", reward_shaping=shaping)
    assert raw.tolist() == [1.0, -0.5, 0.0, 1.0] and adv.tolist() == pytest.approx([1.5, -1.5, -1.0, 1.0])
    assert stats["reward_mean"] == 0.5  # of the task rewards
    grpo_adv, _, _ = core.group_normalized_advantages(scores, group_size=2, advantage_eps=0.0, normalize_by_std=False)
    assert grpo_adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


# ---------------------------------------------------------------------------------------------- temperature


def test_log_probs_and_entropy_at_a_temperature_are_those_of_the_tempered_softmax():
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 7) * 3).requires_grad_(True)
    labels = torch.randint(0, 7, (2, 3))
    for t in (1.0, 0.7, 1.6):
        out = core.label_log_probs(logits, labels, temperature=t, return_token_entropy=True)
        ref = torch.log_softmax(logits / t, -1)
        torch.testing.assert_close(out["log_probs"], ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(out["token_entropy"], -(ref.exp() * ref).sum(-1))
        (g,) = torch.autograd.grad(out["log_probs"].sum(), logits)
        (g_ref,) = torch.autograd.grad(ref.gather(-1, labels.unsqueeze(-1)).sum(), logits)
        torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="temperature"):
        core.label_log_probs(logits, labels, temperature=0.0)
    # the entropy bonus's entropy keeps its gradient, the logged one does not
    h = core.label_log_probs(logits, labels, temperature=0.7, return_token_entropy=True, entropy_grad=True)["token_entropy"]
    assert h.requires_grad and not core.label_log_probs(logits, labels, return_token_entropy=True)["token_entropy"].requires_grad


def test_get_response_log_probs_at_a_temperature():
    model, _ = tiny_policy(seed=1)
    ids = torch.randint(0, 50, (2, 5))
    labels = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        logits = model(ids).logits.float()
    out = core.get_response_log_probs(model, ids, labels, True, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(out["log_probs"].detach(), ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    default = core.get_response_log_probs(model, ids, labels)["log_probs"].detach()
    torch.testing.assert_close(default, torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1))


# ---------------------------------------------------------------------------------------------- the typed objective


def _inputs(lp, mask, old, adv, **kw):
    return core.ObjectiveInputs(lp, mask, advantages=adv, raw_rewards=adv, old_log_probs=old, **kw)


def _settings(loss_type, norm, k, constant, **kw):
    return core.ObjectiveSettings(loss_type=loss_type, gradient_accumulation_steps=k, length_normalization=norm,
                                  normalize_constant=constant, cliprange=0.2, **kw)


@given(pg_batches(), st.sampled_from(LOSS_TYPES), st.sampled_from(NORMS), st.sampled_from([1, 2, 3]),
       st.sampled_from([0.0, 0.1]))
def test_microbatch_split_does_not_change_the_loss_or_gradient(batch, loss_type, norm, parts, kl_coef):
    """Every loss type × length normalisation: equal microbatches (k of them) sum to the whole batch's loss and
    gradient (token_mean with the whole batch's token count; the others dividing by k)."""
    lp0, old, mask, adv = batch
    b = lp0.shape[0] - lp0.shape[0] % parts
    if b == 0:
        return
    lp0, old, mask, adv = lp0[:b], old[:b], mask[:b], adv[:b]
    ref = old - 0.1
    constant = float(max(1, int(mask.sum()))) if norm == "token_mean" else 6.0

    def run(k):
        lp = lp0.clone().requires_grad_(True)
        total = torch.zeros((), dtype=lp0.dtype)
        size = b // k
        for i in range(k):
            sl = slice(i * size, (i + 1) * size)
            loss, _ = core.policy_gradient_objective(
                _inputs(lp[sl], mask[sl], old[sl], adv[sl], ref_log_probs=ref[sl]),
                settings=_settings(loss_type, norm, k, constant, kl_coef=kl_coef))
            loss.backward()
            total = total + loss.detach()
        return total, lp.grad

    whole, whole_grad = run(1)
    split, split_grad = run(parts)
    assert split.item() == pytest.approx(whole.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(split_grad, whole_grad, atol=1e-12)
    assert torch.all(whole_grad[~mask] == 0)


@given(pg_batches(), st.sampled_from(LOSS_TYPES), st.sampled_from(NORMS), st.data())
def test_unequal_microbatches_with_their_own_divisor_sum_to_the_whole_batch(batch, loss_type, norm, data):
    """A token budget's unequal microbatches: each with ``accumulation_divisor = N / B`` (the step's rows over its
    own; the settings' k unused) sums to the whole batch's loss and gradient, every loss type × normalisation."""
    lp0, old, mask, adv = batch
    n = lp0.shape[0]
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1), label="cuts")) if n > 1 else []
    bounds = [0, *cuts, n]
    constant = float(max(1, int(mask.sum()))) if norm == "token_mean" else 6.0
    settings = _settings(loss_type, norm, 3, constant, kl_coef=0.1)  # k = 3 must not matter

    def run(parts):
        lp = lp0.clone().requires_grad_(True)
        total = torch.zeros((), dtype=lp0.dtype)
        for a, b in parts:
            sl = slice(a, b)
            loss, _ = core.policy_gradient_objective(
                _inputs(lp[sl], mask[sl], old[sl], adv[sl], ref_log_probs=old[sl] - 0.1,
                        accumulation_divisor=n / (b - a)), settings=settings)
            loss.backward()
            total = total + loss.detach()
        return total, lp.grad

    whole, whole_grad = run([(0, n)])
    split, split_grad = run(list(zip(bounds[:-1], bounds[1:])))
    assert split.item() == pytest.approx(whole.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(split_grad, whole_grad, atol=1e-12)
    if norm != "token_mean":  # the divisor replaces k: a whole batch with divisor 1 is k = 1's loss
        one, _ = core.policy_gradient_objective(_inputs(lp0, mask, old, adv, ref_log_probs=old - 0.1),
                                                settings=replace(settings, gradient_accumulation_steps=1))
        assert whole.item() == pytest.approx(one.item(), rel=1e-12, abs=1e-12)


def test_the_keyword_form_takes_a_float_divisor_and_the_inputs_check_it():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    # no_baseline, masked_mean: per response -A * mean(log p): -(log 0.5 + log 0.25) / 2 and +log 0.5; their
    # mean over the 2 rows, divided by k
    mean = (-(math.log(0.5) + math.log(0.25)) / 2 + math.log(0.5)) / 2
    for k in (2, 2.5):
        loss, _ = core.grpo_microbatch_loss(lp, mask, gradient_accumulation_steps=k, loss_type="no_baseline",
                                            raw_rewards=adv)
        assert loss.item() == pytest.approx(mean / k)
    with pytest.raises(ValueError, match="accumulation_divisor"):
        core.ObjectiveInputs(lp, mask, accumulation_divisor=0.0)


@given(pg_batches(), st.sampled_from(LOSS_TYPES), st.sampled_from(NORMS), st.integers(1, 4))
def test_padding_does_not_change_the_loss_or_gradient(batch, loss_type, norm, pad):
    lp0, old, mask, adv = batch
    constant = float(max(1, int(mask.sum()))) if norm == "token_mean" else 6.0
    settings = _settings(loss_type, norm, 1, constant, entropy_coef=0.05)
    entropy = torch.rand_like(lp0)

    def run(width):
        extra = lambda x, fill: torch.cat([x, torch.full((x.shape[0], width), fill, dtype=x.dtype)], 1)  # noqa: E731
        lp = extra(lp0, -7.0).requires_grad_(True)
        loss, meta = core.policy_gradient_objective(
            _inputs(lp, extra(mask, False), extra(old, 3.0), adv, token_entropy=extra(entropy, 9.0)), settings=settings)
        loss.backward()
        return loss, lp.grad[:, : lp0.shape[1]], meta

    a, ga, ma = run(0)
    b, gb, mb = run(pad)
    assert b.item() == pytest.approx(a.item(), rel=1e-12, abs=1e-12) and torch.allclose(ga, gb, atol=1e-12)
    assert {k: round(v.item(), 9) for k, v in ma.items()} == {k: round(v.item(), 9) for k, v in mb.items()}


def test_objective_hand_worked_entropy_bonus_tis_and_diagnostics():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])
    old = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.5]], dtype=torch.float64))  # ratios 1, 0.5 | 2
    adv = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    sampler = old + torch.tensor([[0.0, math.log(2)], [0.0, 0.0]], dtype=torch.float64)  # rho 1, 0.5 | 1
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    settings = core.ObjectiveSettings(loss_type="grpo_clip", length_normalization="token_mean", normalize_constant=3.0,
                                      cliprange=0.2, tis_cap=0.8, entropy_coef=0.1)
    loss, m = core.policy_gradient_objective(
        core.ObjectiveInputs(lp, mask, advantages=adv, old_log_probs=old, sampler_log_probs=sampler,
                             sampler_mask=torch.ones_like(mask), token_entropy=entropy), settings=settings)
    # per token: -min(r A, clip(r) A) = 1, 0.8 | -1.2 ; TIS weights min(rho, 0.8) = 0.8, 0.5 | 0.8
    # loss = (0.8 * 1 + 0.5 * 0.8 - 0.8 * 1.2 - 0.1 * (1 + 2 + 3)) / 3
    assert loss.item() == pytest.approx((0.8 + 0.4 - 0.96 - 0.6) / 3)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)  # r = 0.5 < 0.8 with A < 0
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)  # r = 2 > 1.2 with A > 0
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert m["ratio_max"].item() == pytest.approx(2.0) and m["ratio_mean"].item() == pytest.approx(3.5 / 3)
    assert m["sampling/importance_sampling_ratio/mean"].item() == pytest.approx(2.5 / 3)
    assert m["sampling/importance_sampling_ratio/max"].item() == pytest.approx(1.0)
    assert m["rollout_corr/k3_kl"].item() == pytest.approx((0.5 - math.log(0.5) - 1) / 3)
    assert m["tis_capped_fraction"].item() == pytest.approx(2 / 3)
    assert m["entropy_bonus"].item() == pytest.approx(0.1 * 2.0)
    with pytest.raises(ValueError, match="token_entropy"):
        core.policy_gradient_objective(core.ObjectiveInputs(lp, mask, advantages=adv, old_log_probs=old), settings=settings)


def test_settings_know_which_losses_need_old_log_probs():
    needs = {t for t in LOSS_TYPES if core.ObjectiveSettings(loss_type=t).needs_old_log_probs}
    assert needs == set(core.RATIO_LOSS_TYPES) == {"grpo_clip", "grpo_no_clip", "gspo", "cispo"}
    assert core.ObjectiveSettings(loss_type="reinforce_with_baseline", tis_cap=2.0).needs_old_log_probs
    with pytest.raises(ValueError, match="old_log_probs"):
        core.policy_gradient_objective(core.ObjectiveInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                                            advantages=torch.ones(1, 1)),
                                       settings=core.ObjectiveSettings(loss_type="gspo"))
    with pytest.raises(ValueError, match="advantages"):
        core.policy_gradient_objective(core.ObjectiveInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool),
                                                            old_log_probs=torch.zeros(1, 2)),
                                       settings=core.ObjectiveSettings(loss_type="cispo"))


# ---------------------------------------------------------------------------------------------- through the shell

PROMPTS = ["Q: 12 + 30 = ? think", "Q: 12 + 30 = ? think", "Q: 12 + 30 = ? think", "Q: 12 + 30 = ? think"]
RESPONSES = [" 42 </answer>", " 41 is it </answer>", " 42 </answer>", " no </answer>"]


def _rollouts(n=4):
    return Rollouts(prompts=PROMPTS[:n], responses=RESPONSES[:n], truths=["42"] * n, num_tokens=[3] * n,
                    entropies=[None] * n, finish_reasons=["stop"] * n, sampler_token_ids=[None] * n,
                    sampler_log_probs=[None] * n)


def _grads_of_one_step(settings, *, share_prompt_prefix=False, seed=3):
    model, tok = tiny_policy(seed=seed)
    learner = Learner(model, tok, OptimConfig(lr=0.0, autocast_bf16=False, max_grad_norm=1e9,
                                              share_prompt_prefix=share_prompt_prefix))
    learner.optimizer.step = lambda: 0.0  # keep the gradients
    raw = torch.tensor([1.0, 0.0, 1.0, 0.0])
    [m] = grpo_update(learner, _rollouts(), raw, raw - 0.5, settings, seed=0)
    return m, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_an_optimizer_step_does_not_depend_on_the_split_or_the_prefix_path(loss_type, norm):
    """One optimizer step on the tiny policy at T = 0.7: the same loss and gradient with 1, 2 or 4 microbatches,
    and with the shared prompt prefix run once apart."""
    base = PolicyGradientSettings(loss_type=loss_type, group_size=4, train_batch_size=4, gradient_accumulation_steps=1,
                                  length_normalization=norm, normalize_constant=8.0, temperature=0.7, kl_coef=0.0,
                                  entropy_coef=0.01)
    m1, g1 = _grads_of_one_step(base)
    for other in (replace(base, gradient_accumulation_steps=2), replace(base, gradient_accumulation_steps=4)):
        m, g = _grads_of_one_step(other)
        assert m["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5, abs=1e-7)
        for name in g1:
            torch.testing.assert_close(g[name], g1[name], rtol=1e-4, atol=1e-6)
    mp, gp = _grads_of_one_step(base, share_prompt_prefix=True)
    assert mp["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5, abs=1e-7)
    for name in g1:
        torch.testing.assert_close(gp[name], g1[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("loss_type", core.RATIO_LOSS_TYPES)
def test_on_policy_the_ratio_is_exactly_one_in_float32(temperature, loss_type):
    settings = PolicyGradientSettings(loss_type=loss_type, group_size=4, train_batch_size=4,
                                      gradient_accumulation_steps=2, temperature=temperature)
    m, _ = _grads_of_one_step(settings)
    assert m["train/ratio_mean"] == 1.0 and m["train/ratio_max"] == 1.0
    assert m.get("train/clip_ratio/region_mean", 0.0) == 0.0
    # off-policy (2 epochs): the first step's ratio, old log-probs from the inference-mode pass, is 1 up to rounding
    model, tok = tiny_policy(seed=3)
    learner = Learner(model, tok, OptimConfig(lr=1e-3, autocast_bf16=False))
    raw = torch.tensor([1.0, 0.0, 1.0, 0.0])
    first, second = grpo_update(learner, _rollouts(), raw, raw - 0.5, replace(settings, epochs_per_rollout_batch=2),
                                seed=0)
    assert abs(first["train/ratio_max"] - 1.0) < 1e-6 and abs(first["train/ratio_mean"] - 1.0) < 1e-6
    assert abs(second["train/ratio_mean"] - 1.0) > 1e-6  # the policy moved: the check can fail


def test_grpo_old_log_probs_at_sampling_temperature_0_7_are_the_tempered_ones():
    """--sampling.temperature 0.7: the off-policy old log-probs the loss receives are
    core.get_response_log_probs(..., temperature=0.7) of the rollouts, not the T = 1 ones."""
    cfg = GRPOConfig(rollout_batch_size=4, group_size=4, train_batch_size=4, gradient_accumulation_steps=1,
                     epochs_per_rollout_batch=2, loss_type="grpo_clip", sampling=SamplingConfig(temperature=0.7, min_tokens=4))
    check_config(cfg)
    settings = pg_settings(cfg)
    assert settings.temperature == 0.7
    model, tok = tiny_policy(seed=5)
    learner = Learner(model, tok, OptimConfig(lr=0.0, autocast_bf16=False))
    seen = []
    step = learner.grpo_step

    def recording(*args, **kwargs):
        seen.append((args, kwargs))
        return step(*args, **kwargs)

    learner.grpo_step = recording
    raw = torch.tensor([1.0, 0.0, 1.0, 0.0])
    grpo_update(learner, _rollouts(), raw, raw - 0.5, settings, seed=0)
    (ids, labels, mask), kwargs = seen[0]
    assert kwargs["temperature"] == 0.7 and kwargs["settings"].loss_type == "grpo_clip"
    old = kwargs["tensors"].old_log_probs
    with torch.no_grad():
        tempered = core.get_response_log_probs(model, ids, labels, temperature=0.7)["log_probs"]
        plain = core.get_response_log_probs(model, ids, labels)["log_probs"]
    torch.testing.assert_close(old[mask], tempered[mask], rtol=0, atol=1e-5)
    assert (old[mask] - plain[mask]).abs().max() > 1e-2


@pytest.mark.parametrize(("changes", "message"), [
    ({"overlong_buffer": 100}, "--overlong-buffer \\(100\\) must be at most --sampling.max-tokens"),
    ({"overlong_penalty": -1.0}, "--overlong-penalty"),
    ({"entropy_coef": -0.1}, "--entropy-coef"),
    ({"advantage_estimator": "rloo", "group_size": 1, "rollout_batch_size": 4, "train_batch_size": 4,
      "gradient_accumulation_steps": 1, "use_std_normalization": False}, "rloo needs --group-size >= 2"),
    ({"sampling": SamplingConfig(temperature=0.0)}, "--sampling.temperature must be > 0"),
])
def test_new_flags_are_checked(changes, message):
    base = GRPOConfig(sampling=SamplingConfig(min_tokens=4, max_tokens=48))
    with pytest.raises(ValueError, match=message):
        check_config(replace(base, **changes))


def test_compiled_policy_gradient_step_equals_eager(no_shape_checks):
    """torch.compile of the whole microbatch step (forward at T = 0.7, GSPO, entropy bonus, TIS): the same loss
    and gradients as eager."""
    model, tok = tiny_policy(seed=8)
    tb = tokenize_batch(PROMPTS[:3], RESPONSES[:3], tok, "cpu")
    with torch.no_grad():
        old = core.get_response_log_probs(model, tb["input_ids"], tb["labels"], temperature=0.7)["log_probs"] - 0.01
    settings = core.ObjectiveSettings(loss_type="gspo", cliprange=0.2, entropy_coef=0.01, tis_cap=2.0)
    tensors = PolicyGradientTensors(advantages=torch.tensor([[1.0], [-0.5], [0.2]]), old_log_probs=old,
                                    sampler_log_probs=old + 0.02, sampler_mask=tb["response_mask"])
    results = []
    for compile in (False, True):
        model.zero_grad(set_to_none=True)
        step = make_train_step(model, "grpo", compile=compile)
        loss, meta = step(tb["input_ids"], tb["labels"], tb["response_mask"], temperature=0.7, settings=settings,
                          tensors=tensors, return_token_entropy=True)
        results.append((loss, meta, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, m0, g0), (l1, m1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for key in ("ratio_mean", "rollout_corr/k3_kl", "entropy_bonus"):
        torch.testing.assert_close(m1[key], m0[key], rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)
