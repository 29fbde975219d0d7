"""Token-budget microbatches (--optim.max-tokens-per-microbatch): the step's loss and gradient equal the fixed
split's (float32, every loss type × length normalisation, SFT too), each microbatch within the budget."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from core import POLICY_LOSS_TYPES
from doubles import tiny_policy
from shell.config import OptimConfig
from shell.data import SFTExample
from shell.rollout import Rollouts
from shell.update import Learner, PolicyGradientSettings, grpo_update, padded_lengths, plan_microbatches, sft_update, token_budget_split

PROMPTS = ["Q: 2+3=", "Q: 12+30=", "Q: 9-1=", "Q: 100+1="]
RESPONSES = [" 5 </answer>", " 4 2 and so on </answer>", " 8", " 101 because 100 plus 1 is 101 </answer>",
             " 7 </answer>", " 42 </answer>", " eight, as 9 - 1 = 8 </answer>", " 1 0 1"]
BUDGET = 64  # rows of 20-50 tokens: microbatches of 1 to 3 rows, unequal


def _rollouts() -> Rollouts:
    n = len(RESPONSES)
    return Rollouts(prompts=[PROMPTS[i // 2] for i in range(n)], responses=list(RESPONSES), truths=["0"] * n,
                    num_tokens=[1] * n, entropies=[None] * n, finish_reasons=["stop"] * n,
                    sampler_token_ids=[None] * n, sampler_log_probs=[None] * n)


def _learners(budget: int | None = BUDGET) -> tuple[Learner, Learner]:
    model, tok = tiny_policy(seed=2)
    optim = OptimConfig(lr=1e-3, autocast_bf16=False)
    fixed = Learner(model, tok, optim)
    packed = Learner(copy.deepcopy(model), tok, replace(optim, max_tokens_per_microbatch=budget))
    return fixed, packed


def _capture_gradients(learner: Learner) -> list[list[torch.Tensor]]:
    """Record the accumulated gradients at each optimizer step (before clipping)."""
    seen: list[list[torch.Tensor]] = []
    step = learner.optimizer.step

    def recording() -> float:
        seen.append([p.grad.detach().clone() for p in learner.optimizer.params])
        return step()

    learner.optimizer.step = recording
    return seen


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for ga, gb in zip(a, b):
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_the_budget_gives_unequal_microbatches_within_it():
    fixed, packed = _learners()
    ro = _rollouts()
    lengths = padded_lengths(packed.tokenizer, ro.prompts, ro.responses)
    split = token_budget_split(packed, ro.prompts, ro.responses)
    assert token_budget_split(fixed, ro.prompts, ro.responses) is None
    [[batch]] = plan_microbatches(8, PolicyGradientSettings(loss_type="no_baseline", group_size=2, train_batch_size=8,
                                                            gradient_accumulation_steps=4), seed=0, split=split)
    assert sorted(i for mb in batch for i in mb) == list(range(8))
    assert len({len(mb) for mb in batch}) > 1  # unequal: the normalisation is really exercised
    for mb in batch:
        assert len(mb) * max(lengths[i] for i in mb) <= BUDGET
        tb = packed.tokenize([ro.prompts[i] for i in mb], [ro.responses[i] for i in mb])
        assert tb["input_ids"].numel() == len(mb) * max(lengths[i] for i in mb)  # the lengths are the tokenized widths


@pytest.mark.parametrize("length_normalization", ["masked_mean", "masked_normalize", "token_mean"])
@pytest.mark.parametrize("loss_type", POLICY_LOSS_TYPES)
def test_grpo_loss_and_gradients_equal_the_fixed_split(loss_type, length_normalization):
    ro = _rollouts()
    raw = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    adv = torch.tensor([1.0, -1.0, 0.5, 0.5, -0.7, 0.7, 0.9, -0.9])
    # two train batches of 4: off-policy, so the second step's grpo_clip sees old log-probs and ratios away from 1
    settings = PolicyGradientSettings(loss_type=loss_type, group_size=2, train_batch_size=4, gradient_accumulation_steps=2,
                                      length_normalization=length_normalization,
                                      normalize_constant=40.0 if length_normalization == "masked_normalize" else None)
    fixed, packed = _learners()
    grads_fixed, grads_packed = _capture_gradients(fixed), _capture_gradients(packed)
    m_fixed = grpo_update(fixed, ro, raw, adv, settings, seed=0)
    m_packed = grpo_update(packed, ro, raw, adv, settings, seed=0)
    assert len(m_fixed) == len(m_packed) == 2
    for a, b in zip(m_fixed, m_packed):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
        assert b["train/response_tokens"] == a["train/response_tokens"]
    _same(grads_fixed, grads_packed)


def _examples() -> list[SFTExample]:
    return [SFTExample(prompt=PROMPTS[i // 2], response=r) for i, r in enumerate(RESPONSES)]


@pytest.mark.parametrize("budget", [BUDGET, 1])  # 1: every row over the budget, one microbatch each
def test_sft_loss_and_gradients_equal_the_fixed_split(budget):
    fixed, packed = _learners(budget)
    grads_fixed, grads_packed = _capture_gradients(fixed), _capture_gradients(packed)
    batch = _examples()
    for _ in range(2):
        a = sft_update(fixed, batch, gradient_accumulation_steps=2)
        b = sft_update(packed, batch, gradient_accumulation_steps=2)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    _same(grads_fixed, grads_packed)


def test_the_flag_is_checked():
    with pytest.raises(ValueError, match="--optim.max-tokens-per-microbatch"):
        OptimConfig(max_tokens_per_microbatch=0).check()
    OptimConfig(max_tokens_per_microbatch=1).check()


@pytest.mark.parametrize("module", ["shell.sft", "shell.expert_iteration", "shell.grpo"])
def test_every_training_loop_takes_the_flag(module):
    import importlib

    from shell.config import cli

    presets = importlib.import_module(module).PRESETS
    config_type = type(next(iter(presets.values()))[1])
    cfg = cli(config_type, presets, description="", args=["--optim.max-tokens-per-microbatch", "512"])
    assert cfg.optim.max_tokens_per_microbatch == 512
    assert cli(config_type, presets, description="", args=[]).optim.max_tokens_per_microbatch is None


def test_empty_microbatches_that_pad_a_rank_share_change_nothing(monkeypatch):
    """Three rows each over the budget, planned for two ranks: [a], [b], [c] and an empty one. Run here in one
    process (every microbatch, the empty one included), the step equals the fixed split's."""
    import shell.update as update
    from shell.world import World

    monkeypatch.setattr(update, "world", lambda: World(rank=0, size=2, local_rank=0))
    fixed, packed = _learners(budget=1)
    ro = _rollouts().select([0, 1, 3])
    lengths = padded_lengths(packed.tokenizer, ro.prompts, ro.responses)
    split = token_budget_split(packed, ro.prompts, ro.responses)
    assert split(range(3)) == sorted(([i] for i in range(3)), key=lambda mb: -lengths[mb[0]]) + [[]]
    grads_fixed, grads_packed = _capture_gradients(fixed), _capture_gradients(packed)
    settings = PolicyGradientSettings(loss_type="grpo_clip", group_size=1, train_batch_size=3, gradient_accumulation_steps=3)
    raw, adv = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.5, -1.0, 0.5])
    [a] = grpo_update(fixed, ro, raw, adv, settings, seed=0)
    [b] = grpo_update(packed, ro, raw, adv, settings, seed=0)
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    batch = [SFTExample(prompt=p, response=r) for p, r in zip(ro.prompts, ro.responses)]
    a = sft_update(fixed, batch, gradient_accumulation_steps=3)
    b = sft_update(packed, batch, gradient_accumulation_steps=3)
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    _same(grads_fixed, grads_packed)
