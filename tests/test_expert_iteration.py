"""Expert iteration on a tiny random model: the correct-response filter, the SFT plan, the step loop
(metrics keys, eval steps, checkpoints, plots) and an exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from shell import expert_iteration as ei
from doubles import save_tiny_policy, tiny_loop_args
from shell.runlog import read_metrics


def test_select_correct_keeps_only_reward_one_each_with_its_own_prompt():
    prompts = ["P0", "P0", "P1", "P1", "P2", "P2"]
    responses = ["a0", "b0", "a1", "b1", "a2", "b2"]
    truths = ["0", "0", "1", "1", "2", "2"]
    # format-only (0.0 reward), a partial reward and a correct one per group; only exact 1.0 survives
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    kept = ei.select_correct(prompts, responses, truths, rewards)
    assert [(k.prompt, k.response, k.ground_truth) for k in kept] == [("P0", "a0", "0"), ("P1", "b1", "1")]
    assert ei.select_correct(prompts, responses, truths, [0.0] * 6) == []
    with pytest.raises(ValueError, match="lengths differ"):
        ei.select_correct(prompts, responses, truths, rewards[:-1])


def test_pass_at_g_counts_questions_with_a_correct_response():
    assert ei.pass_at_g([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], 2) == 0.5
    assert ei.pass_at_g([0.0] * 4, 4) == 0.0
    with pytest.raises(ValueError):
        ei.pass_at_g([1.0, 0.0, 0.0], 2)


def test_sft_plan_scales_down_to_the_kept_responses():
    cfg = ei.EIConfig(sft_batch_size=16, sft_gradient_accumulation_steps=2, sft_epochs=2.0)
    assert ei.sft_plan(0, cfg, 1).steps == 0
    full = ei.sft_plan(40, cfg, 1)
    assert (full.batch_size, full.gradient_accumulation_steps, full.steps) == (16, 2, 5)
    small = ei.sft_plan(11, cfg, 1)  # one microbatch of 8 (the configured microbatch size)
    assert (small.batch_size, small.gradient_accumulation_steps, small.steps) == (8, 1, 3)
    tiny = ei.sft_plan(3, cfg, 1)
    assert (tiny.batch_size, tiny.gradient_accumulation_steps, tiny.steps) == (3, 1, 2)
    assert ei.sft_plan(40, replace(cfg, sft_max_steps=2), 1).steps == 2
    assert ei.sft_plan(40, cfg, 1).seed != ei.sft_plan(40, cfg, 2).seed


def test_config_checks():
    with pytest.raises(ValueError, match="--sft-batch-size \\(10\\) must be divisible by --sft-gradient-accumulation-steps"):
        ei.check_config(ei.EIConfig(sft_batch_size=10, sft_gradient_accumulation_steps=3))
    with pytest.raises(ValueError, match="--group-size must be >= 1, got 0"):
        ei.check_config(ei.EIConfig(group_size=0))


def _fake_scores(rollouts, template, grading, progress=True):
    """A tiny random model never answers correctly: call every third response correct (deterministic)."""
    scores = [{"format_reward": float(i % 3 == 0), "answer_reward": float(i % 3 == 0), "reward": float(i % 3 == 0)}
              for i in range(len(rollouts.responses))]
    return scores, {"timeouts": 0.0}


def _args(tiny: Path, runs: Path, name: str, steps: int) -> list[str]:
    return [
        *tiny_loop_args(tiny, runs, name), "--n-ei-steps", str(steps), "--ei-batch-size", "4", "--group-size", "3",
        "--sampling.max-tokens", "6", "--sft-batch-size", "4", "--sft-gradient-accumulation-steps", "2",
        "--sft-epochs", "1", "--sft-max-steps", "None", "--warm-start.steps", "1", "--warm-start.batch-size", "8",
        "--optim.lr", "1e-3", "--keep-checkpoints", "2",  # the laptop preset keeps one; these tests look at two
    ]


def _comparable(rows):
    drop = {"time/elapsed_s", "eval/seconds", "train/ei_rollout_seconds", "train/ei_sft_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_ei_loop_writes_metrics_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(ei, "grade", _fake_scores)
    tiny = save_tiny_policy(tmp_path / "tiny")
    ei.main(_args(tiny, tmp_path, "straight", 2))
    run = tmp_path / "straight"
    rows = read_metrics(run)
    sft_rows = [r for r in rows if "train/loss" in r]
    ei_rows = [r for r in rows if "train/ei_pass_at_g" in r]
    evals = [r for r in rows if "eval_step" in r]
    assert [r["eval_step"] for r in evals] == [0, 1, 2]
    assert {"eval/answer_reward", "eval/format_reward", "eval/reward", "eval/sft_steps"} <= set(evals[0])
    # 4 questions × G=3 = 12 responses, every third kept: 4 kept → 1 SFT step of 4 per EI step
    assert [r["train/ei_step"] for r in ei_rows] == [1, 2]
    assert all(r["train/ei_questions"] == 4 and r["train/ei_responses"] == 12 and r["train/ei_kept"] == 4 for r in ei_rows)
    assert ei_rows[0]["train/ei_pass_at_g"] == 1.0
    assert ei_rows[0]["train/ei_rollout_entropy"] > 0
    assert {"train/ei_response_length", "train/ei_response_length_correct", "train/ei_sft_steps"} <= set(ei_rows[0])
    assert [(r["train_step"], r["train/ei_step"]) for r in sft_rows] == [(1, 1), (2, 2)]
    assert {"train/loss", "train/grad_norm", "train/token_entropy", "train/lr"} <= set(sft_rows[0])
    assert [r["train_step"] for r in ei_rows] == [1, 2] and [r["eval/sft_steps"] for r in evals] == [0, 1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001", "step_000002"]
    for f in ("curves.png", "entropy.png", "warm_start_metrics.jsonl", "final/config.json"):
        assert (run / f).exists(), f
    assert [json.loads(x)["step"] for x in (run / "generations.jsonl").read_text().splitlines()] == [0, 1, 2]

    # A run that completed EI step 1, then was killed in step 2 after logging part of it, resumes exactly.
    ei.main(_args(tiny, tmp_path, "resumed", 1))
    part = tmp_path / "resumed"
    with (part / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"train_step": 2, "train/ei_step": 2, "train/loss": 9.0}) + "\n")
        f.write(json.dumps({"train_step": 1, "train/ei_step": 2, "train/ei_pass_at_g": 0.0}) + "\n")
    with (part / "generations.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "stats": {}, "samples": []}) + "\n")
    ei.main([*_args(tiny, tmp_path, "resumed", 2), "--resume"])
    assert _comparable(read_metrics(part)) == _comparable(rows)
    assert (part / "generations.jsonl").read_text() == (run / "generations.jsonl").read_text()
