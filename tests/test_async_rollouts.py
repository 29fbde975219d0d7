"""Asynchronous rollouts (``--async-staleness K``): the producer's bound with a fake sampler much faster and much
slower than training, the version bookkeeping, weights that never change during a batch, the off-policy correction
on by default, the refusals before anything loads, the curriculum state of each checkpoint, K = 0 as the synchronous
loop, and a kill + ``--resume`` and a SIGTERM + ``--resume`` under async."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from doubles import install_fake_vllm, sigkill_once, tiny_grpo_args
from shell.async_rollouts import Produced, RolloutProducer
from shell.checkpoint import list_checkpoints
from shell.grpo import ASYNC_TIS_CAP, GRPOConfig, check_config, pg_settings
from shell.runlog import read_metrics
from shell.safe_state import load_state

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _drive(producer: RolloutProducer, steps: int, train_s: float) -> list[tuple[Produced, float, float]]:
    """The trainer's side: take each step's batch, 'train' for ``train_s``, push version ``step``; each step's batch,
    its wait for it and the push's seconds."""
    out = []
    for step in range(producer.first_step, producer.first_step + steps):
        batch, waited = producer.take(step)
        time.sleep(train_s)
        out.append((batch, waited, producer.publish(step, lambda: None)))
    return out


# ------------------------------------------------------------------------------------------ the producer alone


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_fast_sampler_is_held_k_batches_ahead(k):
    """Sampling takes nothing, training 100 ms: the producer runs ahead until the bound stops it, so every batch is
    exactly min(t - 1, K) versions old, never more, and the producer waits for weights."""
    produced_while: list[tuple[int, int]] = []
    trainer_done = [0]

    def produce(step: int) -> int:
        produced_while.append((step, trainer_done[0]))
        return step

    n = 8
    with RolloutProducer(produce, staleness=k, first_step=1, last_step=n, version=0) as producer:
        results = []
        for step in range(1, n + 1):
            batch, waited = producer.take(step)
            results.append(batch)
            time.sleep(0.1)
            trainer_done[0] = step
            producer.publish(step, lambda: None)
    assert [b.step for b in results] == list(range(1, n + 1)) and [b.value for b in results] == list(range(1, n + 1))
    staleness = [(b.step - 1) - b.version for b in results]
    assert staleness == [min(t - 1, k) for t in range(1, n + 1)]
    assert all(s - 1 - k <= done for s, done in produced_while)  # never more than K ahead of the trainer
    assert sum(b.wait_for_weights for b in results[k + 1:]) > 0.05 * (n - k - 1)  # it waited at the bound


@pytest.mark.parametrize("k", [1, 3])
def test_a_slow_sampler_keeps_the_trainer_waiting_and_the_bound(k):
    """Sampling takes 60 ms, training nothing: the trainer is idle about a batch's time a step (blocked on the
    hand-over, or pushing its weights after the batch in flight), and no batch is more than K versions old."""
    def produce(step: int) -> int:
        time.sleep(0.06)
        return step

    with RolloutProducer(produce, staleness=k, first_step=1, last_step=6, version=0) as producer:
        results = _drive(producer, 6, train_s=0.0)
    staleness = [(b.step - 1) - b.version for b, _, _ in results]
    assert all(0 <= s <= k for s in staleness)
    assert results[0][1] > 0.04  # the first batch: blocked on the hand-over
    assert sum(waited + sync for _, waited, sync in results) > 0.8 * 6 * 0.06  # idle about each batch's time
    assert all(b.seconds >= 0.05 for b, _, _ in results)


def test_versions_are_the_weights_the_sampler_held_and_never_change_during_a_batch():
    """A fake sampler whose weights are a version number: each batch's tag is the version loaded when it was made,
    the weights are never loaded while a batch is being made, and a resumed start begins at its own version."""
    state = {"weights": 3, "making": False}
    lock = threading.Lock()

    def produce(step: int) -> int:
        with lock:
            state["making"] = True
        seen = state["weights"]
        time.sleep(0.01)
        assert state["weights"] == seen, "the weights changed during a batch"
        with lock:
            state["making"] = False
        return seen

    def load(version: int) -> None:
        assert not state["making"], "weights loaded during a batch"
        state["weights"] = version

    with RolloutProducer(produce, staleness=2, first_step=4, last_step=10, version=3) as producer:  # resumed after 3
        seen = []
        for step in range(4, 11):
            batch, _ = producer.take(step)
            assert batch.value == batch.version  # the tag is the weights it was drawn with
            seen.append(batch.version)
            time.sleep(0.02)
            producer.publish(step, lambda v=step: load(v))
    assert seen[0] == 3 and seen == sorted(seen)  # starts at the resumed version; versions only grow
    assert all(3 <= v <= s - 1 for v, s in zip(seen, range(4, 11)))


def test_a_producer_error_is_raised_by_the_trainer_and_a_bound_breach_is_a_bug():
    def produce(step: int) -> int:
        if step == 2:
            raise ValueError("grader broke")
        return step

    with RolloutProducer(produce, staleness=1, first_step=1, last_step=4, version=0) as producer:
        producer.take(1)
        producer.publish(1, lambda: None)
        with pytest.raises(ValueError, match="grader broke"):
            producer.take(2)
    never_started = RolloutProducer(lambda s: s, staleness=1, first_step=1, last_step=9, version=0)
    never_started.handover.put(Produced(step=5, version=1, value=5, wait_for_weights=0.0, seconds=0.0))
    with pytest.raises(RuntimeError, match="3 versions before the trainer's 4"):
        never_started.take(5)
    never_started.handover.put(Produced(step=6, version=5, value=6, wait_for_weights=0.0, seconds=0.0))
    with pytest.raises(RuntimeError, match="wants step 7's batch"):
        never_started.take(7)
    with pytest.raises(ValueError, match="staleness >= 1"):
        RolloutProducer(lambda s: s, staleness=0, first_step=1, last_step=2, version=0)


def test_closing_drops_the_batches_made_ahead_and_joins():
    with RolloutProducer(lambda s: s, staleness=2, first_step=1, last_step=100, version=0) as producer:
        producer.take(1)
        time.sleep(0.05)
    assert not producer.thread.is_alive()


# ------------------------------------------------------------------------------------------ flags


def test_the_correction_is_on_by_default_with_k_and_off_without():
    assert pg_settings(GRPOConfig()).tis_cap == 0.0
    assert pg_settings(GRPOConfig(async_staleness=1)).tis_cap == ASYNC_TIS_CAP == 2.0
    assert pg_settings(GRPOConfig(async_staleness=2, tis_cap=1.5)).tis_cap == 1.5
    assert pg_settings(GRPOConfig(async_staleness=1, tis_cap=0.0)).tis_cap == 0.0  # explicit: off (with a warning)
    assert pg_settings(GRPOConfig(tis_cap=2.0)).tis_cap == 2.0


@pytest.mark.parametrize(("changes", "env", "message"), [
    ({"async_staleness": -1}, {}, "--async-staleness must be >= 0"),
    ({"async_staleness": 1}, {"WORLD_SIZE": "2"}, "--async-staleness 1 runs in one training process; under torchrun"),
    ({"async_staleness": 1, "sampler_generation_dtype": None}, {}, "--sampler.generation-dtype bfloat16"),
    ({"async_staleness": 2, "model_dtype": "bfloat16"}, {}, "samples with the policy itself"),
])
def test_refusals_name_the_flag(changes, env, message, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg, changes = GRPOConfig(), dict(changes)
    if "sampler_generation_dtype" in changes:
        cfg = replace(cfg, sampler=replace(cfg.sampler, generation_dtype=changes.pop("sampler_generation_dtype")))
    if "model_dtype" in changes:
        cfg = replace(cfg, model=replace(cfg.model, dtype=changes.pop("model_dtype")))
    with pytest.raises(ValueError, match=message):
        check_config(replace(cfg, **changes))


def test_a_refusal_exits_2_before_anything_loads(tmp_path, capsys, monkeypatch):
    from shell import grpo

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        grpo.main(["--async-staleness", "1", "--run.runs-dir", str(tmp_path / "runs"), "--run.logger", "none"])
    assert exc.value.code == 2 and "--async-staleness" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ the GRPO loop


def _args(tiny: Path, runs: Path, name: str, steps: int, *extra: str) -> list[str]:
    return tiny_grpo_args(tiny, runs, name, steps, *extra, generation_dtype="float32")


def _train_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "train_step" in r]


def test_k0_is_the_synchronous_loop(tiny, tmp_path, monkeypatch):
    """--async-staleness 0 (the default) never builds a producer; it logs staleness 0 and the version of the step
    before, and no async timing key (so its metrics are the synchronous loop's, key for key, plus those two)."""
    from shell import grpo

    def no_producer(*args, **kwargs):
        raise AssertionError("K = 0 built a producer")

    monkeypatch.setattr(grpo, "RolloutProducer", no_producer)
    grpo.main(_args(tiny, tmp_path, "sync", 3))
    rows = _train_rows(tmp_path / "sync")
    assert [r["train/staleness"] for r in rows] == [0] * len(rows)
    assert [r["train/policy_version"] for r in rows] == [r["train_step"] - 1 for r in rows]
    assert not any(k.startswith(("time/wait", "time/weight_sync", "time/rollout_s")) for r in rows for k in r)
    assert "train/tis_weight_mean" not in rows[0]  # no correction without K


def test_async_applies_the_correction_and_keeps_each_checkpoints_curriculum(tiny, tmp_path, monkeypatch):
    """K = 2 with training slowed by 0.6 s a step: the producer is always as far ahead as the bound lets it, so
    step t's batch is min(t - 1, 2) versions old; every microbatch's objective gets the sampler's log-probs and the
    TIS cap 2; and each checkpoint's curriculum state is the one after its own step's questions (the online
    walk's cursor: 2 a step), not the producer's, which is ahead. On a CPU the trainer trains with its share of
    the torch threads and gets them all back after."""
    from shell import grpo, update

    seen = []
    original_step, original_learn = update.accumulate_and_step, grpo.learn

    def spy(learner, step_fn, microbatches, **kw):
        seen.extend(kwargs for _, kwargs in microbatches if "settings" in kwargs)  # GRPO's, not the warm start's
        return original_step(learner, step_fn, microbatches, **kw)

    threads, trainer_threads = torch.get_num_threads(), []

    def slow_learn(*args, **kwargs):
        trainer_threads.append(torch.get_num_threads())
        time.sleep(0.6)
        return original_learn(*args, **kwargs)

    monkeypatch.setattr(update, "accumulate_and_step", spy)
    monkeypatch.setattr(grpo, "learn", slow_learn)
    grpo.main(_args(tiny, tmp_path, "k2", 5, "--async-staleness", "2", "--data.curriculum", "online",
                    "--checkpoint-every", "1", "--keep-checkpoints", "5"))
    rows = _train_rows(tmp_path / "k2")
    assert [r["train/staleness"] for r in rows] == [min(r["train_step"] - 1, 2) for r in rows]
    assert all(r["train/policy_version"] == r["train_step"] - 1 - r["train/staleness"] for r in rows)
    assert {"time/wait_for_rollouts", "time/wait_for_weights", "time/weight_sync", "train/tis_weight_mean"} <= set(rows[-1])
    assert sum(r["time/wait_for_weights"] for r in rows if r["train_step"] > 3) > 0.6  # held at the bound
    assert seen and all(kw["settings"].tis_cap == 2.0 and kw["tensors"].sampler_log_probs is not None for kw in seen)
    assert set(trainer_threads) == {max(1, threads - threads // 2)} and torch.get_num_threads() == threads  # a CPU
    cursors = {c.name: load_state(c)["loop"]["curriculum"]["cursor"] for c in list_checkpoints(tmp_path / "k2")}
    assert cursors == {f"step_{s:06d}": 2 * s for s in range(1, 6)}


def test_a_slow_sampler_keeps_the_bound_in_the_loop(tiny, tmp_path, monkeypatch):
    """Sampling slowed by 1 s a batch (far more than a tiny model's training step, even on a loaded machine): the
    trainer is idle about that long a step (blocked on the hand-over, or pushing its weights after the batch in
    flight), and the bound holds."""
    from shell import grpo

    original, producer_threads = grpo.sample_batch, []

    def slow_sample(*args, **kwargs):
        producer_threads.append(torch.get_num_threads())
        time.sleep(1.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(grpo, "sample_batch", slow_sample)
    grpo.main(_args(tiny, tmp_path, "slow", 4, "--async-staleness", "1"))
    rows = _train_rows(tmp_path / "slow")
    assert sorted({r["train_step"] for r in rows}) == [1, 2, 3, 4]
    assert all(0 <= r["train/staleness"] <= 1 for r in rows)
    assert rows[0]["time/wait_for_rollouts"] > 0.9
    assert set(producer_threads) == {max(1, torch.get_num_threads() // 2)}  # a CPU: the threads are split
    once = {r["train_step"]: r for r in rows}.values()
    assert sum(r["time/wait_for_rollouts"] + r["time/weight_sync"] for r in once) > 0.5 * 4 * 1.0  # less training


def test_async_under_colocated_vllm_never_sleeps_pushes_every_version_and_scores_entropy(tiny, tmp_path, monkeypatch):
    """The vLLM path (a fake engine sampling with the HF backend): the producer's thread generates, the trainer
    pushes the weights after every step (once at the start, then each version), the engine never sleeps (it
    samples while the policy trains), and the rollout entropy is scored by the policy."""
    from shell import grpo

    calls = install_fake_vllm(monkeypatch)
    grpo.main(_args(tiny, tmp_path, "vllm", 3, "--async-staleness", "1", "--sampler.backend", "vllm"))
    names = [c[0] for c in calls]
    assert "sleep" not in names and names.count("reload_weights") == 1 + 3
    rows = _train_rows(tmp_path / "vllm")
    assert all(0 <= r["train/staleness"] <= 1 and r["train/rollout_entropy"] is not None for r in rows)
    assert max(r["train/staleness"] for r in rows) == 1


def _check_resumed(run: Path, steps: int, k: int, resumed_from: int) -> None:
    rows = _train_rows(run)
    assert [r["train_step"] for r in rows if r["train/optimizer_step"] % 2 == 0] == list(range(1, steps + 1))
    assert all(0 <= r["train/staleness"] <= k for r in rows)
    first = next(r for r in rows if r["train_step"] == resumed_from + 1)
    assert first["train/policy_version"] == resumed_from  # regenerated from the resumed weights
    assert (run / "final").is_dir()
    assert [r["eval_step"] for r in read_metrics(run) if "eval_step" in r] == sorted({*range(0, steps + 1, 2), steps})


def test_async_killed_then_resumed_completes(tiny, tmp_path):
    """SIGKILL right after the step-2 checkpoint of a K = 1 run; --resume drops what was in flight, regenerates it
    from the resumed weights and runs to the end, each step logged once, the bound held throughout."""
    from shell import grpo

    args = _args(tiny, tmp_path, "killed", 5, "--async-staleness", "1", "--checkpoint-every", "1",
                 "--keep-checkpoints", "5")
    marker = tmp_path / "killed" / "checkpoints" / "step_000002"
    sigkill_once("shell.grpo", args, marker, cwd=REPO)
    assert marker.exists()
    newest = int(list_checkpoints(tmp_path / "killed")[-1].name.split("_")[1])
    grpo.main([*args, "--resume"])
    _check_resumed(tmp_path / "killed", 5, 1, newest)


@pytest.mark.slow
def test_async_sigterm_checkpoints_stops_the_producer_and_resumes(tiny, tmp_path):
    """SIGTERM after step 2 is logged: the run finishes its step, stops the producer (the batch in flight ends,
    the ones made ahead are dropped), checkpoints, exits 143; --resume runs to the end within the bound."""
    from shell import grpo

    args = _args(tiny, tmp_path, "term", 5, "--async-staleness", "1")
    proc = subprocess.Popen([sys.executable, "-m", "shell.grpo", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("[grpo step 2/5]"):
            proc.send_signal(signal.SIGTERM)
            break
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 143, "".join(out)
    text = "".join(out)
    reached = int(text.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert (tmp_path / "term" / "checkpoints" / f"step_{reached:06d}").is_dir()
    grpo.main([*args, "--resume"])
    _check_resumed(tmp_path / "term", 5, 1, reached)
