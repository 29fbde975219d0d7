"""GRPO pieces on a tiny random model: learning direction, on-policy ratio, the microbatch plan, the
prefix + checkpointing + off-policy combination, config checks, and an exact resume."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core import normalize_group_rewards
from doubles import save_tiny_policy, tiny_grpo_args, tiny_policy
from shell.config import OptimConfig
from shell.grpo import GRPOConfig, check_config, pg_settings
from shell.runlog import read_metrics
from shell.steps import make_log_probs_fn, tokenize_batch
from shell.rollout import Rollouts
from shell.update import Learner, PolicyGradientSettings, Reference, grpo_update, plan_microbatches


def _group(prompt="Q: 2+3=", good=" 5 </answer>", bad=" 7 </answer>", g=4):
    responses = [good if i % 2 == 0 else bad for i in range(g)]
    raw = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(g)])
    return [prompt] * g, responses, raw


def _rollouts(prompts, responses, finish=None):
    n = len(responses)
    return Rollouts(prompts=list(prompts), responses=list(responses), truths=["5"] * n, num_tokens=[1] * n,
                    entropies=[None] * n, finish_reasons=list(finish or ["stop"] * n),
                    sampler_token_ids=[None] * n, sampler_log_probs=[None] * n)


def _seq_log_prob(model, tok, prompt, response):
    tb = tokenize_batch([prompt], [response], tok, "cpu")
    with torch.no_grad():
        out = make_log_probs_fn(model)(tb["input_ids"], tb["labels"])
    return float((out["log_probs"] * tb["response_mask"]).sum())


def _settings(**kw) -> PolicyGradientSettings:
    base = dict(loss_type="reinforce_with_baseline", group_size=4, train_batch_size=4, gradient_accumulation_steps=2)
    return PolicyGradientSettings(**{**base, **kw})


@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "grpo_clip", "no_baseline"])
def test_grpo_update_raises_log_prob_of_higher_reward_response(loss_type):
    model, tok = tiny_policy(seed=1)
    prompts, responses, raw = _group()
    adv = normalize_group_rewards(raw, group_size=4, advantage_eps=1e-6, normalize_by_std=True)
    before_good = _seq_log_prob(model, tok, prompts[0], responses[0])
    before_bad = _seq_log_prob(model, tok, prompts[1], responses[1])
    learner = Learner(model, tok, OptimConfig(lr=3e-3, autocast_bf16=False))
    for _ in range(3):
        metrics = grpo_update(learner, _rollouts(prompts, responses), raw, adv, _settings(loss_type=loss_type), seed=0)
    after_good = _seq_log_prob(model, tok, prompts[0], responses[0])
    after_bad = _seq_log_prob(model, tok, prompts[1], responses[1])
    assert after_good > before_good
    if loss_type != "no_baseline":
        assert after_bad < before_bad
    assert all(m["train/grad_norm"] > 0 for m in metrics)


def test_on_policy_single_epoch_has_ratio_one_and_no_clipping():
    model, tok = tiny_policy(seed=2)
    prompts, responses, raw = _group()
    learner = Learner(model, tok, OptimConfig(lr=1e-2, autocast_bf16=False))
    on = _settings(loss_type="grpo_clip", cliprange=0.01, gradient_accumulation_steps=1)
    metrics = grpo_update(learner, _rollouts(prompts, responses), raw, raw - raw.mean(), on, seed=0)
    assert metrics[0]["train/clip_fraction"] == 0.0
    # off-policy: the second epoch sees a moved policy against the stored old log-probs, so it clips
    metrics = grpo_update(learner, _rollouts(prompts, responses), raw, raw - raw.mean(), replace(on, epochs_per_rollout_batch=3),
                          seed=0)
    assert metrics[0]["train/clip_fraction"] == 0.0
    assert metrics[-1]["train/clip_fraction"] > 0.0


def test_microbatch_plan_on_policy_keeps_order_off_policy_shuffles_whole_groups():
    on = _settings(group_size=4, train_batch_size=16, gradient_accumulation_steps=4)
    [[batch]] = plan_microbatches(16, on, seed=0)
    assert batch == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # one group per microbatch
    off = replace(on, train_batch_size=8, gradient_accumulation_steps=2, epochs_per_rollout_batch=3)
    plan = plan_microbatches(16, off, seed=0)
    assert [len(epoch) for epoch in plan] == [2, 2, 2]  # 2 train batches of 2 microbatches each, per epoch
    orders = []
    for epoch in plan:
        rows = [r for batch in epoch for mb in batch for r in mb]
        assert sorted(rows) == list(range(16))  # every row exactly once per epoch
        groups = [rows[i : i + 4] for i in range(0, 16, 4)]
        assert all(g == list(range(g[0], g[0] + 4)) and g[0] % 4 == 0 for g in groups)  # whole groups stay together
        orders.append([g[0] // 4 for g in groups])
    assert len({tuple(o) for o in orders}) > 1  # epochs visit the groups in different orders
    assert plan == plan_microbatches(16, off, seed=0) and plan != plan_microbatches(16, off, seed=1)  # seeded
    with pytest.raises(ValueError, match="groups of 4"):
        plan_microbatches(10, off, seed=0)


@pytest.mark.parametrize("compile", [False, True])
def test_off_policy_clip_with_prefix_sharing_and_checkpointing(compile, no_shape_checks):
    """Old log-probs (inference mode: prefix shared) and a checkpointed training forward (prefix not shared)
    cover the same positions: this combination used to crash on a shape mismatch."""
    model, tok = tiny_policy(seed=4)
    prompts, responses, raw = _group(g=4)
    prompts = [p + " think" for p in prompts]
    learner = Learner(model, tok, OptimConfig(lr=1e-3, autocast_bf16=False, share_prompt_prefix=True,
                                              checkpoint_above_tokens=0, compile=compile))
    off = _settings(loss_type="grpo_clip", train_batch_size=2, gradient_accumulation_steps=1, epochs_per_rollout_batch=2)
    metrics = grpo_update(learner, _rollouts(prompts, responses), raw, raw - raw.mean(), off, seed=0)
    assert len(metrics) == 4 and all(m["train/grad_norm"] > 0 for m in metrics)


def test_truncated_responses_get_no_loss():
    """--mask-truncated: a response that hit the token limit contributes nothing (no gradient from it)."""
    model, tok = tiny_policy(seed=6)
    prompts, responses, raw = _group(g=4)
    adv = raw - raw.mean()
    settings = _settings(gradient_accumulation_steps=1, mask_truncated=True)

    def grads(finish):
        model.zero_grad(set_to_none=True)
        learner = Learner(model, tok, OptimConfig(lr=0.0, autocast_bf16=False, max_grad_norm=1e9))
        learner.optimizer.step = lambda: 0.0  # keep the gradients for inspection
        m = grpo_update(learner, _rollouts(prompts, responses, finish), raw, adv, settings, seed=0)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, m

    all_stop, m0 = grads(["stop"] * 4)
    two_cut, m1 = grads(["stop", "stop", "length", "length"])
    only_first_two = {k: v for k, v in all_stop.items()}
    assert m0[0]["train/truncated_fraction"] == 0.0 and m1[0]["train/truncated_fraction"] == 0.5
    # Same loss as training on the first two responses alone (the batch mean still divides by 4).
    model.zero_grad(set_to_none=True)
    learner = Learner(model, tok, OptimConfig(lr=0.0, autocast_bf16=False))
    learner.optimizer.step = lambda: 0.0
    half = _settings(group_size=2, train_batch_size=2, gradient_accumulation_steps=1)
    grpo_update(learner, _rollouts(prompts[:2], responses[:2]), raw[:2], adv[:2], half, seed=0)
    first_two = {n: p.grad.clone() / 2 for n, p in model.named_parameters() if p.grad is not None}
    for name in first_two:
        torch.testing.assert_close(two_cut[name], first_two[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(two_cut[n], only_first_two[n]) for n in two_cut)


@pytest.mark.parametrize(("shift", "weight", "capped"), [(0.0, 1.0, 0.0), (0.1, math.exp(-0.1), 0.0), (-math.log(3), 2.0, 1.0)])
def test_sampler_mismatch_tis_weights_and_kl(shift, weight, capped):
    """Sampler log-probs = the policy's + ``shift``: the logged mismatch is |shift|, the TIS weights
    min(exp(-shift), cap 2) (hand-worked), and a reference equal to the policy gives KL 0 (then > 0 once the
    policy has moved)."""
    model, tok = tiny_policy(seed=7)
    prompts, responses, raw = _group(g=4)
    learner = Learner(model, tok, OptimConfig(lr=1e-2, autocast_bf16=False))
    tb = learner.tokenize(prompts, responses)
    with torch.no_grad():
        lp = make_log_probs_fn(model)(tb["input_ids"], tb["labels"])["log_probs"]
    ro = _rollouts(prompts, responses)
    for r in range(4):
        pos = tb["response_mask"][r].nonzero().squeeze(-1)
        ro.sampler_token_ids[r] = tb["labels"][r, pos].tolist()
        ro.sampler_log_probs[r] = (lp[r, pos] + shift).tolist()
    settings = _settings(loss_type="grpo_clip", gradient_accumulation_steps=1, kl_coef=0.1, tis_cap=2.0)
    reference = Reference.of(learner)
    [m] = grpo_update(learner, ro, raw, raw - 0.5, settings, seed=0, reference=reference)
    assert m["train/logprob_mismatch"] == pytest.approx(abs(shift), abs=1e-5)
    assert m["train/tis_weight_mean"] == pytest.approx(weight, rel=1e-5)
    assert m["train/tis_capped_fraction"] == capped
    assert m["train/kl"] == pytest.approx(0.0, abs=1e-7)
    [m] = grpo_update(learner, ro, raw, raw - 0.5, settings, seed=0, reference=reference)
    assert m["train/kl"] > 1e-6


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rollout_batch_size": 10, "group_size": 4}, "--rollout-batch-size \\(10\\) must be divisible by --group-size"),
        ({"train_batch_size": 256, "gradient_accumulation_steps": 100}, "divisible by --gradient-accumulation-steps"),
        ({"rollout_batch_size": 8, "group_size": 8, "train_batch_size": 4, "gradient_accumulation_steps": 2}, ">= --group-size"),
        ({"cliprange_high": -0.1}, "--cliprange-high must be > 0"),
        ({"max_sampling_rounds": 0}, "--max-sampling-rounds must be >= 1"),
    ],
)
def test_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(replace(GRPOConfig(), **changes))


def test_loss_type_is_checked_when_parsing(capsys):
    from shell.config import cli
    from shell.grpo import PRESETS

    with pytest.raises(SystemExit) as exc:
        cli(GRPOConfig, PRESETS, description="", args=["--loss-type", "ppo"])
    assert exc.value.code == 2 and "ppo" in capsys.readouterr().err
    assert pg_settings(cli(GRPOConfig, PRESETS, description="", args=["--loss-type", "grpo_clip"])).loss_type == "grpo_clip"


def _args(tiny: Path, runs: Path, name: str, steps: int) -> list[str]:
    return tiny_grpo_args(tiny, runs, name, steps, "--warm-start.steps", "1", "--warm-start.batch-size", "8")


def test_modern_objective_flags_run_and_log(tmp_path):
    """--kl-coef, --tis-cap, --cliprange-high, token_mean, --dynamic-sampling, --mask-truncated through the loop."""
    from shell import grpo

    tiny = save_tiny_policy(tmp_path / "tiny")
    grpo.main([*_args(tiny, tmp_path, "modern", 2), "--kl-coef", "0.01", "--tis-cap", "2", "--cliprange-high", "0.28",
               "--length-normalization", "token_mean", "--dynamic-sampling", "--max-sampling-rounds", "2",
               "--warm-start.steps", "0"])
    rows = [r for r in read_metrics(tmp_path / "modern") if "train_step" in r]
    keys = {"train/kl", "train/tis_weight_mean", "train/tis_capped_fraction", "train/logprob_mismatch",
            "train/sampler_known_fraction", "train/sampling_rounds", "train/kept_group_fraction", "train/truncated_fraction"}
    assert keys <= set(rows[0]), keys - set(rows[0])
    assert all(1 <= r["train/sampling_rounds"] <= 2 for r in rows)
    assert (tmp_path / "modern" / "reference").is_dir()
    grpo.main([*_args(tiny, tmp_path, "masked", 1), "--mask-truncated", "--eval-every", "1"])
    rows = [r for r in read_metrics(tmp_path / "masked") if "train_step" in r]
    assert rows and all(0.0 <= r["train/truncated_fraction"] <= 1.0 for r in rows)


def test_gspo_cispo_rloo_overlong_and_entropy_flags_run_and_log_the_diagnostics(tmp_path):
    """--loss-type gspo / cispo, --advantage-estimator rloo, --overlong-buffer, --entropy-coef through the loop at
    --sampling.temperature 0.7: every step logs the clip ratios, the raw ratio, the mismatch and completion stats."""
    from shell import grpo

    tiny = save_tiny_policy(tmp_path / "tiny")
    common = {"train/ratio_mean", "train/ratio_max", "train/logprob_mismatch", "train/rollout_corr/k3_kl",
              "train/sampling/importance_sampling_ratio/mean", "train/sampling/importance_sampling_ratio/max",
              "train/completions/clipped_ratio", "train/completions/mean_terminated_length",
              "train/zero_variance_group_fraction", "train/truncated_fraction"}
    runs = {
        "gspo": (["--loss-type", "gspo", "--cliprange", "3e-4", "--cliprange-high", "4e-4"],
                 {"train/clip_ratio/low_mean", "train/clip_ratio/high_mean", "train/clip_ratio/region_mean"}),
        "cispo": (["--loss-type", "cispo", "--cliprange", "1.0", "--cliprange-high", "0.28", "--advantage-estimator",
                   "rloo", "--overlong-buffer", "3", "--entropy-coef", "0.01"],
                  {"train/clip_ratio/region_mean", "train/overlong_penalty", "train/entropy_bonus"}),
    }
    for name, (extra, keys) in runs.items():
        grpo.main([*_args(tiny, tmp_path, name, 1), "--eval-every", "1", "--sampling.temperature", "0.7",
                   "--optim.no-autocast-bf16", *extra])
        rows = [r for r in read_metrics(tmp_path / name) if "train_step" in r]
        assert rows and (common | keys) <= set(rows[0]), (common | keys) - set(rows[0])
        assert all(r["train/overlong_penalty"] <= 0 for r in rows if "train/overlong_penalty" in r)
        # on-policy at T = 0.7 against the sampler's own (float32, no copy) tempered log-probs: no mismatch
        assert rows[0]["train/logprob_mismatch"] < 1e-4, rows[0]["train/logprob_mismatch"]


def test_grpo_resume_equals_uninterrupted(tmp_path):
    from shell import grpo

    tiny = save_tiny_policy(tmp_path / "tiny")
    grpo.main(_args(tiny, tmp_path, "straight", 4))
    grpo.main(_args(tiny, tmp_path, "resumed", 2))  # stops after step 2 (its last checkpoint) ...
    grpo.main([*_args(tiny, tmp_path, "resumed", 4), "--resume"])  # ... and continues to 4
    drop = {"time/elapsed_s", "eval/seconds"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "straight")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed")]
    assert a == b
    assert [r["eval_step"] for r in a if "eval_step" in r] == [0, 2, 4]
    assert (tmp_path / "straight" / "warm_start_metrics.jsonl").exists()
    keys = {"train/loss", "train/grad_norm", "train/token_entropy", "train/clip_fraction", "train/reward",
            "train/format_reward", "train/answer_reward", "train/response_length", "train/zero_variance_group_fraction"}
    assert keys <= set(next(r for r in a if "train_step" in r))
    gens = (tmp_path / "resumed" / "generations.jsonl").read_text()
    assert gens == (tmp_path / "straight" / "generations.jsonl").read_text()
