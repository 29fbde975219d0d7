"""GRPO pieces on a tiny random model: learning direction, on-policy ratio, the microbatch plan, the
prefix + checkpointing + off-policy combination, config checks, and an exact resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core import normalize_group_rewards
from doubles import save_tiny_policy, tiny_policy
from shell.config import OptimConfig
from shell.grpo import GRPOConfig, check_config, pg_settings
from shell.runlog import read_metrics
from shell.steps import make_log_probs_fn, tokenize_batch
from shell.update import Learner, PolicyGradientSettings, grpo_update, plan_microbatches


def _group(prompt="Q: 2+3=", good=" 5 </answer>", bad=" 7 </answer>", g=4):
    responses = [good if i % 2 == 0 else bad for i in range(g)]
    raw = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(g)])
    return [prompt] * g, responses, raw


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
        metrics = grpo_update(learner, prompts, responses, raw, adv, _settings(loss_type=loss_type), seed=0)
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
    metrics = grpo_update(learner, prompts, responses, raw, raw - raw.mean(), on, seed=0)
    assert metrics[0]["train/clip_fraction"] == 0.0
    # off-policy: the second epoch sees a moved policy against the stored old log-probs, so it clips
    metrics = grpo_update(learner, prompts, responses, raw, raw - raw.mean(), replace(on, epochs_per_rollout_batch=3), seed=0)
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
    metrics = grpo_update(learner, prompts, responses, raw, raw - raw.mean(), off, seed=0)
    assert len(metrics) == 4 and all(m["train/grad_norm"] > 0 for m in metrics)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rollout_batch_size": 10, "group_size": 4}, "divisible by group_size"),
        ({"train_batch_size": 256, "gradient_accumulation_steps": 100}, "divisible by gradient_accumulation_steps"),
        ({"rollout_batch_size": 8, "group_size": 8, "train_batch_size": 4, "gradient_accumulation_steps": 2}, ">= group_size"),
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
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32",
        "--eval-data.limit", "4", "--eval.max-tokens", "6", "--grading.workers", "0",
        "--sampler.generation-dtype", "None", "--run.logger", "none", "--run.runs-dir", str(runs),
        "--run.name", name, "--n-grpo-steps", str(steps), "--rollout-batch-size", "8", "--group-size", "4",
        "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--loss-type", "grpo_clip",
        "--sampling.max-tokens", "6", "--eval-every", "2", "--warm-start.steps", "1", "--warm-start.batch-size", "8",
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
    gens = (tmp_path / "resumed" / "generations.jsonl").read_text()
    assert gens == (tmp_path / "straight" / "generations.jsonl").read_text()
