"""shell.evaluation's k-sample summary (pass@j, avg@k, maj@k, ci95) and ``shell.evaluate --samples-per-problem``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from shell.config import GradingConfig
from shell.evaluation import evaluate, format_summary, summarize
from shell.prompts import load_prompt
from shell.sampling import Completion
from tests.doubles import save_tiny_policy

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _r1(answer: str) -> str:
    return f"2 + 2 is easy </think> <answer> {answer} </answer>"


class ScriptedSampler:
    """Returns fixed responses: ``script[i]`` are problem ``i``'s k samples."""

    def __init__(self, script: list[list[str]]):
        self.script = script
        self.params = None

    def generate(self, prompts, params, *, keys=None, progress=False):
        self.params = params
        assert len(prompts) == len(self.script) and all(len(s) == params.n for s in self.script)
        return [[Completion(text=t, token_ids=list(range(len(t.split()))), logprobs=None, entropies=[0.5],
                            finish_reason="stop") for t in samples] for samples in self.script]

    def load_weights(self, model):
        pass

    def close(self):
        pass


def _check_intervals(summary: dict) -> None:
    for key, interval in summary["ci95"].items():
        point = summary["counts"][key] if key in summary["counts"] else summary[key]
        if interval is None:
            assert point is None, key
            continue
        lo, hi = interval
        assert lo <= point <= hi, (key, lo, point, hi)


def test_k_sample_summary_hand_values():
    """Three problems (truths 4, 7, 10), four samples each, graded by the real r1_zero reward:

    problem 0: 4, 4, 5, unformatted     -> c=2: pass@1 .5, pass@2 1-C(2,2)/C(4,2) = 5/6, pass@4 1; vote 4 (right)
    problem 1: 3, 7, 3, 7               -> c=2; a 2-2 tie goes to 3, seen first: maj wrong
    problem 2: "10.0", "10", 9, 9       -> c=2 ("10.0" grades right); votes 10.0 / 10 / 9 x2 -> 9: maj wrong
    """
    script = [[_r1("4"), _r1("4"), _r1("5"), "I think it is 4"],
              [_r1("3"), _r1("7"), _r1("3"), _r1("7")],
              [_r1("10.0"), _r1("10"), _r1("9"), _r1("9")]]
    dataset = [SimpleNamespace(question=f"q{i}", answer=a) for i, a in enumerate(["4", "7", "10"])]
    sampler = ScriptedSampler(script)
    result = evaluate(sampler, dataset, template=load_prompt("r1_zero"), grading=GradingConfig(workers=0),
                      samples_per_problem=4)
    assert sampler.params.n == 4
    rows = result.records
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(4)]
    assert [r["extracted_answer"] for r in rows[:4]] == ["4", "4", "5", None]
    s = result.summary
    assert (s["num_examples"], s["num_samples"], s["samples_per_problem"]) == (3, 12, 4)
    assert s["counts"] == {"format1_answer1": 6, "format1_answer0": 5, "format0": 1}
    assert s["accuracy"] == s["answer_reward"] == s["avg@4"] == pytest.approx(0.5)
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["pass@2"] == pytest.approx(5 / 6)
    assert s["pass@4"] == pytest.approx(1.0)
    assert s["maj@4"] == pytest.approx(1 / 3)
    assert s["format_reward"] == pytest.approx(11 / 12)
    expected = {"accuracy", "format_reward", "answer_reward", "reward", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4",
                "format1_answer1", "format1_answer0", "format0", "mean_length", "mean_length_correct",
                "mean_length_incorrect", "mean_token_entropy"}
    assert set(s["ci95"]) == expected
    _check_intervals(s)
    assert s["ci95"]["pass@4"] == [1.0, 1.0]       # every problem solved at k = 4: no spread
    assert s["ci95"]["maj@4"][0] == 0.0 and s["ci95"]["maj@4"][1] == 1.0   # 3 problems: resamples of 0..3 wins
    text = format_summary(s)
    assert "pass@2" in text and "maj@4" in text and "x 4 samples = 12" in text


def test_one_sample_summary_is_todays_plus_the_intervals():
    records = [{"index": i, "sample": 0, "format_reward": f, "answer_reward": a, "reward": a, "num_tokens": t,
                "mean_token_entropy": None, "finish_reason": "stop", "extracted_answer": "1" if f else None}
               for i, (f, a, t) in enumerate([(1.0, 1.0, 10), (1.0, 0.0, 20), (0.0, 0.0, 30), (1.0, 1.0, 40)])]
    s = summarize(records)
    assert s["num_examples"] == 4 and s["samples_per_problem"] == 1
    assert s["accuracy"] == s["avg@1"] == s["pass@1"] == s["maj@1"] == 0.5
    assert "pass@2" not in s
    assert s["mean_length_correct"] == 25 and s["mean_token_entropy"] is None and s["ci95"]["mean_token_entropy"] is None
    _check_intervals(s)
    assert summarize(records)["ci95"] == s["ci95"]   # seeded
    empty = summarize([])
    assert empty["num_examples"] == 0 and empty["ci95"] == {} and empty["accuracy"] == 0.0


def test_evaluate_cli_samples_per_problem(tmp_path):
    """The path users run: ``python -m shell.evaluate --samples-per-problem 4`` (a tiny random policy)."""
    tiny = save_tiny_policy(tmp_path / "policy")
    args = ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "3", "--eval.max-tokens", "4",
            "--grading.workers", "0", "--sampler.generation-dtype", "None", "--run.runs-dir", str(tmp_path / "runs"),
            "--run.name", "k4", "--samples-per-problem", "4"]
    import os
    done = subprocess.run([sys.executable, "-m", "shell.evaluate", *args], cwd=REPO, env={**os.environ, **ENV_KEYS},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "k4"
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(4)]
    assert len({r["response"] for r in rows if r["index"] == 0}) > 1   # four different draws, not one repeated
    s = json.loads((run / "summary.json").read_text())
    assert {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "ci95"} <= set(s)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    assert {"accuracy", "pass@1", "pass@4", "maj@4", "format1_answer1", "format1_answer0", "format0"} <= set(s["ci95"])
    _check_intervals(s)
    bad = subprocess.run([sys.executable, "-m", "shell.evaluate", *args[:-1], "0"], cwd=REPO,
                         env={**os.environ, **ENV_KEYS}, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--samples-per-problem must be >= 1" in bad.stderr


def test_training_evaluations_log_intervals_and_the_final_evaluation_writes_the_evaluate_summary(tmp_path):
    from shell import grpo
    from shell.runlog import read_metrics

    tiny = save_tiny_policy(tmp_path / "policy")
    grpo.main(["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "16", "--eval-data.limit", "4",
               "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
               "--run.logger", "none", "--run.runs-dir", str(tmp_path), "--run.name", "g", "--n-grpo-steps", "1",
               "--rollout-batch-size", "8", "--group-size", "4", "--train-batch-size", "8",
               "--gradient-accumulation-steps", "2", "--sampling.max-tokens", "4", "--eval-every", "1",
               "--warm-start.steps", "0", "--final-eval.enabled", "--final-eval.data.limit", "3",
               "--final-eval.sampling.max-tokens", "4", "--final-eval.samples-per-problem", "2"])
    evals = [r for r in read_metrics(tmp_path / "g") if "eval/answer_reward" in r]
    assert [r["eval_step"] for r in evals] == [0, 1]
    for r in evals:
        for name in ("answer_reward", "format_reward"):
            assert r[f"eval/{name}_ci_low"] <= r[f"eval/{name}"] <= r[f"eval/{name}_ci_high"]
    summary = json.loads((tmp_path / "g" / "final_eval" / "summary.json").read_text())
    assert summary["samples_per_problem"] == 2 and {"avg@2", "pass@1", "pass@2", "maj@2", "ci95"} <= set(summary)
    _check_intervals(summary)
    final = next(r for r in read_metrics(tmp_path / "g") if "final/answer_reward" in r)
    assert final["final/pass@2"] == summary["pass@2"] and "final/answer_reward_ci_low" in final
