"""GRPO loop pieces on a tiny random model: learning direction, on-policy ratio, resume, config checks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shell._train import OptimConfig, make_optimizer, policy_log_probs, tokenize_batch
from shell.grpo import GRPOConfig, Rollouts, check_config, train_on_rollouts
from shell.models import save_tiny_policy, tiny_policy
from shell.runlog import read_metrics


def _group(prompt="Q: 2+3=", good=" 5 </answer>", bad=" 7 </answer>", g=4):
    responses = [good if i % 2 == 0 else bad for i in range(g)]
    raw = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(g)])
    return Rollouts([prompt] * g, responses, ["5"] * g, [len(r) for r in responses], [None] * g), raw


def _seq_log_prob(model, tok, prompt, response):
    tb = tokenize_batch([prompt], [response], tok, torch.device("cpu"))
    with torch.no_grad():
        out, mask, _ = policy_log_probs(model, tb, share_prompt_prefix=False)
    return float((out["log_probs"] * mask).sum())


@pytest.mark.parametrize("loss_type", ["reinforce_with_baseline", "grpo_clip", "no_baseline"])
def test_grpo_update_raises_log_prob_of_higher_reward_response(loss_type):
    model, tok = tiny_policy(seed=1)
    rollouts, raw = _group()
    cfg = GRPOConfig(rollout_batch_size=4, group_size=4, train_batch_size=4, gradient_accumulation_steps=2,
                     loss_type=loss_type, optim=OptimConfig(lr=3e-3, autocast_bf16=False))
    from core import normalize_group_rewards

    adv = normalize_group_rewards(raw, group_size=4, advantage_eps=1e-6, normalize_by_std=True)
    before_good = _seq_log_prob(model, tok, rollouts.prompts[0], rollouts.responses[0])
    before_bad = _seq_log_prob(model, tok, rollouts.prompts[1], rollouts.responses[1])
    opt, sched = make_optimizer(model, cfg.optim)
    for _ in range(3):
        metrics = train_on_rollouts(model, tok, opt, sched, rollouts, raw, adv, cfg, seed=0)
    after_good = _seq_log_prob(model, tok, rollouts.prompts[0], rollouts.responses[0])
    after_bad = _seq_log_prob(model, tok, rollouts.prompts[1], rollouts.responses[1])
    assert after_good > before_good
    if loss_type != "no_baseline":
        assert after_bad < before_bad
    assert all(m["train/grad_norm"] > 0 for m in metrics)


def test_on_policy_single_epoch_has_ratio_one_and_no_clipping():
    model, tok = tiny_policy(seed=2)
    rollouts, raw = _group()
    cfg = GRPOConfig(rollout_batch_size=4, group_size=4, train_batch_size=4, gradient_accumulation_steps=1,
                     loss_type="grpo_clip", cliprange=0.01, optim=OptimConfig(lr=1e-2, autocast_bf16=False))
    opt, sched = make_optimizer(model, cfg.optim)
    metrics = train_on_rollouts(model, tok, opt, sched, rollouts, raw, raw - raw.mean(), cfg, seed=0)
    assert metrics[0]["train/clip_fraction"] == 0.0
    # off-policy: the second epoch sees a moved policy against the stored old log-probs, so it clips
    off = replace(cfg, epochs_per_rollout_batch=3)
    metrics = train_on_rollouts(model, tok, opt, sched, rollouts, raw, raw - raw.mean(), off, seed=0)
    assert metrics[0]["train/clip_fraction"] == 0.0
    assert metrics[-1]["train/clip_fraction"] > 0.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rollout_batch_size": 10, "group_size": 4}, "divisible by group_size"),
        ({"train_batch_size": 256, "gradient_accumulation_steps": 100}, "divisible by gradient_accumulation_steps"),
        ({"rollout_batch_size": 8, "group_size": 8, "train_batch_size": 4, "gradient_accumulation_steps": 2}, ">= group_size"),
        ({"loss_type": "ppo"}, "loss_type"),
    ],
)
def test_config_checks(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(replace(GRPOConfig(), **changes))


def _args(tiny: Path, runs: Path, name: str, steps: int) -> list[str]:
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32",
        "--eval-data.limit", "4", "--eval.max-tokens", "6", "--eval.grading-workers", "0",
        "--sampler.generation-dtype", "None", "--run.logger", "none", "--run.runs-dir", str(runs),
        "--run.name", name, "--n-grpo-steps", str(steps), "--rollout-batch-size", "8", "--group-size", "4",
        "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--loss-type", "grpo_clip",
        "--sampling-max-tokens", "6", "--eval-every", "2", "--warm-start-steps", "1", "--warm-start-batch-size", "8",
        "--optim.lr", "1e-3",
    ]


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
