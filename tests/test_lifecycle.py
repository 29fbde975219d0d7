"""The run lifecycle on a tiny model: one writer per run, honest resume, signals, divergence, corrupt
checkpoints, torn logs, full disks, early flag checks and over-long prompts (issue 17's numbered cases)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doubles import tiny_sft_args
from shell.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def sft_args(tiny: Path, runs: Path, name: str, *extra: str, steps: int = 4) -> list[str]:
    # the laptop preset keeps one checkpoint; these tests resume from the one before
    return tiny_sft_args(tiny, runs, name, "--optim.lr", "1e-3", "--keep-checkpoints", "2", *extra, steps=steps,
                         data_limit=32, eval_limit=4)


def sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shell.sft", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("time/elapsed_s", "eval/seconds")} for r in rows]


def assert_same_records(a, b):
    """``comparable`` records equal, one by one, floats to 1e-6 relative; a mismatch names the record and the keys.

    Why not bit for bit: two processes doing the same float32 work on this CPU can differ in the last bits (CI on
    an Intel Xeon host, once in two runs: the step-0 evaluation record of a run and of its twin, before either had
    trained; its only non-zero float is the mean token entropy). A resume that lost or repeated anything moves
    the losses and evaluations by many orders more."""
    a, b = comparable(a), comparable(b)
    assert len(a) == len(b), (len(a), len(b))

    def same(u, v) -> bool:
        if isinstance(u, float) and isinstance(v, float):
            return math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-9)
        return u == v

    for i, (x, y) in enumerate(zip(a, b)):
        differ = {k: (x.get(k, "<absent>"), y.get(k, "<absent>")) for k in {*x, *y}
                  if k not in x or k not in y or not same(x[k], y[k])}
        assert not differ, (i, differ)


# 1. one writer per run ------------------------------------------------------------------------------------


def test_a_second_process_on_the_same_run_exits_at_once_naming_the_holder(tiny, tmp_path):
    from shell.config import cli
    from shell.loop import Run
    from shell.sft import PRESETS, SFTConfig

    cfg = cli(SFTConfig, PRESETS, description="", args=sft_args(tiny, tmp_path, "busy"))
    with Run(cfg, total_steps=4):  # this process holds the run folder
        t0 = time.monotonic()
        other = sft(*sft_args(tiny, tmp_path, "busy"))
        took = time.monotonic() - t0
    assert other.returncode == 2
    assert f"pid {os.getpid()}" in other.stderr and socket.gethostname() in other.stderr
    assert took < 60 and "Loading" not in other.stderr  # refused before the model loaded
    assert not (tmp_path / "busy" / "metrics.jsonl").exists()
    # the lock goes with its holder: the folder is free again
    assert sft(*sft_args(tiny, tmp_path, "busy", steps=1)).returncode == 0


# 2. honest resume ------------------------------------------------------------------------------------------


def test_resume_refuses_changed_training_flags_and_applies_them_when_allowed(tiny, tmp_path):
    from shell import sft as sft_module

    sft_module.main(sft_args(tiny, tmp_path, "r", steps=2))
    refused = sft(*sft_args(tiny, tmp_path, "r", "--resume", "--optim.lr", "2e-3", "--batch-size", "8", steps=3))
    assert refused.returncode == 2
    assert "optim.lr: 0.001 -> 0.002" in refused.stderr and "batch_size: 4 -> 8" in refused.stderr
    assert "--allow-config-change" in refused.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["optim"]["lr"] == 1e-3  # the original config is not rewritten

    sft_module.main(sft_args(tiny, tmp_path, "r", "--resume", "--optim.lr", "2e-3", "--allow-config-change", steps=3))
    rows = [r for r in read_metrics(tmp_path / "r") if "train_step" in r]
    assert [r["train_step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/lr"] == pytest.approx(1e-3) and rows[2]["train/lr"] == pytest.approx(2e-3)  # applied for real
    [entry] = [json.loads(x) for x in (tmp_path / "r" / "config_history.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and entry["changes"] == {"optim.lr": [1e-3, 2e-3]}
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["lr"] == 1e-3
    # extending the run needs no permission, and the recorded change counts as the run's own flag now
    sft_module.main(sft_args(tiny, tmp_path, "r", "--resume", "--optim.lr", "2e-3", steps=4))
    assert [r["train_step"] for r in read_metrics(tmp_path / "r") if "train_step" in r] == [1, 2, 3, 4]


# 3. divergence ---------------------------------------------------------------------------------------------


def test_divergence_stops_with_exit_2_and_writes_no_final(tiny, tmp_path):
    done = sft(*sft_args(tiny, tmp_path, "boom", "--optim.lr", "1e6", "--checkpoint-every", "1", steps=3))
    assert done.returncode == 2 and "diverged" in done.stderr
    assert not (tmp_path / "boom" / "final").exists()


def test_divergence_guard_thresholds():
    import torch

    from shell.update import DivergenceGuard

    w = torch.nn.Parameter(torch.ones(3))
    guard = DivergenceGuard([w])
    for loss in (25.0, 20.0, 18.0):
        guard.check(loss, 1.0)
    with pytest.raises(FloatingPointError, match="loss"):
        guard.check(265.0, 1.0)
    with pytest.raises(FloatingPointError, match="gradient norm"):
        guard.check(18.0, 1e4)
    with pytest.raises(FloatingPointError, match="nan"):
        guard.check(float("nan"), 1.0)
    with torch.no_grad():
        w.mul_(1e3)
    with pytest.raises(FloatingPointError, match="weight"):
        guard.check(18.0, 1.0)
    calm = DivergenceGuard([torch.nn.Parameter(torch.ones(3))])
    for loss, norm in ((-0.1, 0.0), (0.2, 0.0), (0.05, 0.5), (-0.3, 2.0), (0.1, 0.3)):  # RL: signs and zero norms
        calm.check(loss, norm)


# 4. and 8. logs on resume ----------------------------------------------------------------------------------


def test_resume_truncates_logs_and_drops_a_torn_last_line(tiny, tmp_path):
    from shell import sft as sft_module

    sft_module.main(sft_args(tiny, tmp_path, "straight", steps=4))
    sft_module.main(sft_args(tiny, tmp_path, "cut", "--checkpoint-every", "2", steps=4))
    run = tmp_path / "cut"
    # as if killed after step 3 was logged and while a line was being written; step 4's checkpoint lost
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000004")
    shutil.rmtree(run / "final")
    rows = read_metrics(run)
    keep = [r for r in rows if r.get("train_step", r.get("eval_step", -1)) <= 3]  # -1: the start's parameter record
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep) + '{"train_step": 4, "train/lo')
    with pytest.warns(UserWarning, match="torn last line"):
        sft_module.main(sft_args(tiny, tmp_path, "cut", "--resume", "--checkpoint-every", "2", steps=4))
    assert_same_records(read_metrics(run), read_metrics(tmp_path / "straight"))
    steps = [json.loads(x)["step"] for x in (run / "generations.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]


def test_resume_without_a_checkpoint_starts_over_cleanly(tiny, tmp_path):
    from shell import sft as sft_module

    run = tmp_path / "early"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"eval_step": 0, "eval/answer_reward": 0.0}\n')
    (run / "generations.jsonl").write_text('{"step": 0, "stats": {}, "samples": []}\n')
    sft_module.main(sft_args(tiny, tmp_path, "early", "--resume", steps=2))
    evals = [r["eval_step"] for r in read_metrics(run) if "eval_step" in r]
    assert evals == [0, 2]
    assert [json.loads(x)["step"] for x in (run / "generations.jsonl").read_text().splitlines()] == [0, 2]


# 5. signals ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_reached_step_and_resume_continues(tiny, tmp_path, sig, code):
    from shell import sft as sft_module

    sft_module.main(sft_args(tiny, tmp_path, "straight", steps=6))
    args = sft_args(tiny, tmp_path, "sig", "--checkpoint-every", "0", steps=6)
    proc = subprocess.Popen([sys.executable, "-m", "shell.sft", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:  # wait until a step has been trained
        out.append(line)
        if line.startswith("[train step 2/6]"):
            proc.send_signal(sig)
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == code, "".join(out)
    text = "".join(out)
    reached = int(text.split(f"stopped by {sig.name} after step ")[1].split(":")[0])
    assert reached >= 2 and "--resume" in text.split("Continue with:")[1]
    assert "python -m shell.sft " in text.split("Continue with:")[1]
    assert (tmp_path / "sig" / "checkpoints" / f"step_{reached:06d}").is_dir()
    assert not (tmp_path / "sig" / "final").exists()
    sft_module.main([*args, "--resume"])
    assert_same_records(read_metrics(tmp_path / "sig"), read_metrics(tmp_path / "straight"))


# 6. and 12. flags checked before the model loads -------------------------------------------------------------


@pytest.mark.parametrize(("module", "flags", "message"), [
    ("shell.sft", ["--data.num-examples", "-15"], "--data.num-examples must be >= 1"),
    ("shell.sft", ["--data.num-examples", "0"], "--data.num-examples must be >= 1"),
    ("shell.sft", ["--num-steps", "-3"], "--num-steps must be >= 1"),
    ("shell.sft", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("shell.sft", ["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1"),
    ("shell.sft", ["--eval-every", "0"], "--eval-every must be >= 1"),
    ("shell.grpo", ["--rollout-batch-size", "0"], "--rollout-batch-size must be >= 1"),
    ("shell.grpo", ["--group-size", "0"], "--group-size must be >= 1"),
    ("shell.grpo", ["--n-grpo-steps", "0"], "--n-grpo-steps must be >= 1"),
    ("shell.grpo", ["--sampling.max-tokens", "0"], "--sampling.max-tokens must be >= 1"),
    ("shell.grpo", ["--sampling.temperature", "0"], "--sampling.temperature must be > 0 for rollouts that train"),
    ("shell.grpo", ["--eval-every", "0"], "--eval-every must be >= 1"),
    ("shell.expert_iteration", ["--group-size", "0"], "--group-size must be >= 1"),
    ("shell.expert_iteration", ["--sft-batch-size", "0"], "--sft-batch-size must be >= 1"),
    ("shell.evaluate", ["--eval.max-tokens", "0"], "--eval.max-tokens must be >= 1"),
    ("shell.evaluate", ["--data.limit", "-1"], "--data.limit must be >= 1"),
])
def test_nonsense_values_exit_2_naming_the_flag_before_anything_loads(tmp_path, capsys, module, flags, message):
    # A model path that does not exist proves that nothing was loaded before the check.
    import importlib

    entry = importlib.import_module(module)
    with pytest.raises(SystemExit) as exc:
        entry.main(["--model.name-or-path", str(tmp_path / "no-model"), "--run.runs-dir", str(tmp_path),
                    "--run.logger", "none", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


# 7. damaged checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, damage):
    from shell import sft as sft_module

    sft_module.main(sft_args(tiny, tmp_path, "straight", steps=4))
    sft_module.main(sft_args(tiny, tmp_path, "hurt", "--checkpoint-every", "1", "--keep-checkpoints", "2", steps=3))
    weights = tmp_path / "hurt" / "checkpoints" / "step_000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        data[len(data) // 2 + 1] ^= 0xFF
        weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=str(weights.parent)):
        sft_module.main(sft_args(tiny, tmp_path, "hurt", "--resume", "--checkpoint-every", "1", "--keep-checkpoints", "2",
                                 steps=4))
    assert_same_records(read_metrics(tmp_path / "hurt"), read_metrics(tmp_path / "straight"))


def test_no_intact_checkpoint_is_a_clear_error(tiny, tmp_path):
    from shell import sft as sft_module

    sft_module.main(sft_args(tiny, tmp_path, "gone", steps=1))
    weights = tmp_path / "gone" / "checkpoints" / "step_000001" / "model.safetensors"
    weights.write_bytes(b"x")
    done = sft(*sft_args(tiny, tmp_path, "gone", "--resume", steps=2))
    assert done.returncode == 2 and "no intact checkpoint" in done.stderr and "model.safetensors" in done.stderr


# 9. a full disk --------------------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_names_the_path_and_leaves_no_temporary(tiny, tmp_path, monkeypatch):
    import torch

    from doubles import tiny_policy
    from shell.checkpoint import list_checkpoints, save_checkpoint

    model, tok = tiny_policy()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    parts = dict(model=model, tokenizer=tok, optimizer=optimizer, scheduler=scheduler)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_disk(*a, **k):  # what the trainer state's writer (shell.safe_state, safetensors) raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 512")

    save_checkpoint(tmp_path, 1, **parts)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="could not write .*step_000002"):
        save_checkpoint(tmp_path, 2, **parts)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]  # no hidden .tmp left
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]


def test_stale_temporaries_of_a_killed_run_are_removed_on_start(tiny, tmp_path):
    from shell import sft as sft_module

    stale = tmp_path / "s" / "checkpoints" / ".step_000002.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    sft_module.main(sft_args(tiny, tmp_path, "s", steps=1))
    assert not stale.exists()


# 10. evaluate ----------------------------------------------------------------------------------------------


def test_evaluate_refuses_an_unwritable_output_before_sampling(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "shell.evaluate", "--model.name-or-path", str(tiny), "--model.device", "cpu",
                           "--run.runs-dir", str(blocker), "--data.limit", "2"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and f"--run.runs-dir {blocker}: {blocker} is not a folder" in done.stderr
    assert "evaluating" not in done.stdout  # nothing was sampled


def test_evaluate_data_errors_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "shell.evaluate", "--data.path", str(tmp_path / "missing.jsonl"),
                           "--run.runs-dir", str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing.jsonl" in done.stderr and "Traceback" not in done.stderr


# 11. over-long prompts -------------------------------------------------------------------------------------


def test_over_long_prompts_are_skipped_and_counted_before_tokenising(tiny, tmp_path, monkeypatch):
    from shell.data import within_token_limit
    from shell.evaluate import main

    rows = [{"problem": "What is 2 + 2?", "answer": "4"}, {"problem": "x" * 5_000_000, "answer": "1"},
            {"problem": "What is 3 + 4?", "answer": "7"}]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = main(["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.path", str(data),
                   "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
                   "--run.runs-dir", str(tmp_path / "runs")])
    assert result.summary["num_examples"] == 2

    class Exploding:  # a batch in, as Hugging Face tokenizers take it
        def __call__(self, texts, **kw):
            if any(len(text) > 1000 for text in texts):
                raise AssertionError("a huge text reached the tokenizer")
            return {"input_ids": [list(range(len(text.split()))) for text in texts]}

    assert within_token_limit(["a b c", "y" * 10**6, "a " * 20], Exploding(), limit=10) == [True, False, False]


# the wall-clock budget (issues 13 and 16) ------------------------------------------------------------------


def test_budget_stop_checkpoints_evaluates_and_resume_continues(tiny, tmp_path):
    from shell import grpo

    args = ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32", "--eval-data.limit", "4",
            "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
            "--run.logger", "none", "--run.runs-dir", str(tmp_path), "--run.name", "b", "--n-grpo-steps", "4",
            "--rollout-batch-size", "8", "--group-size", "4", "--train-batch-size", "8", "--gradient-accumulation-steps", "2",
            "--sampling.max-tokens", "4", "--eval-every", "10", "--warm-start.steps", "0", "--optim.lr", "1e-3",
            "--final-eval.enabled", "--final-eval.data.limit", "3", "--final-eval.sampling.max-tokens", "4",
            "--final-eval.greedy"]
    grpo.main([*args, "--budget-hours", "1e-6"])  # every step is over budget: step 1 is the last
    run = tmp_path / "b"
    rows = read_metrics(run)
    assert [r["train_step"] for r in rows if "train/loss" in r] == [1]
    assert [r["eval_step"] for r in rows if "eval/answer_reward" in r] == [0, 1]  # evaluated at the stop
    assert (run / "checkpoints" / "step_000001").is_dir() and (run / "final").is_dir()
    summary = json.loads((run / "final_eval" / "summary.json").read_text())
    assert summary["num_examples"] == 3 and sum(summary["counts"].values()) == 3
    # the budget is spent: the greedy pass is skipped, not run past it
    assert not (run / "final_eval" / "greedy").exists() and any(r.get("final_greedy/skipped") == 1 for r in rows)
    grpo.main([*args, "--budget-hours", "10", "--resume"])  # a larger budget: the run continues to the end
    rows = read_metrics(run)
    assert [r["train_step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    for folder in (run / "final_eval", run / "final_eval" / "greedy"):  # both passes now fit
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["num_examples"] == 3 and sum(summary["counts"].values()) == 3
    assert any("final_greedy/answer_reward" in r for r in rows)
