"""The parts a :class:`shell.loop.Run` is composed of, each alone: the schedule (steps, budget, signals), the
run folder (lock, config guard), the checkpointer (save, resume, one trainer-state schema) and the run logger
(the one owner of cutting the logs back on resume)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from doubles import tiny_policy
from shell.checkpoint import (
    SHARDED, TRAINER_STATE, CheckpointError, Checkpointer, TrainerState, check_resume_world, convert_legacy_checkpoint,
    list_checkpoints, load_shards, rng_state, write_manifest,
)
from shell.config import LoopConfig, RunConfig, asdict
from shell.run_folder import RunFolder, RunLocked
from shell.runlog import RunLogger, read_jsonl_records, read_metrics
from shell.safe_state import LEGACY_STATE
from shell.schedule import Schedule

# ------------------------------------------------------------------------------------------------ the schedule


def test_schedule_evaluates_and_checkpoints_every_so_many_steps_and_at_the_end():
    s = Schedule(LoopConfig(eval_every=3, checkpoint_every=2), total=6)
    assert [k for k in range(1, 7) if s.eval_due(k)] == [3, 6]
    assert [k for k in range(1, 7) if s.checkpoint_due(k)] == [2, 4]  # not 6: the finish checkpoints the last
    assert list(s.steps(on_signal=pytest.fail)) == [1, 2, 3, 4, 5, 6] and s.completed == 6


def test_schedule_resumes_after_the_checkpoint_step_and_carries_the_elapsed_time():
    s = Schedule(LoopConfig(), total=5)
    s.resume(3, elapsed=100.0)
    assert list(s.steps(on_signal=pytest.fail)) == [4, 5]
    assert s.elapsed >= 100.0


def test_a_budget_stop_makes_the_step_that_reaches_it_the_last():
    s = Schedule(LoopConfig(budget_hours=1.0), total=10)
    s.resume(2, elapsed=3600.0 - 10.0)  # 10 s left
    s.reserve_s = 60.0  # the final evaluation needs a minute
    seen = []
    for step in s.steps(on_signal=pytest.fail):
        seen.append((step, s.is_last(step), s.eval_due(step), s.checkpoint_due(step)))
    assert seen == [(3, True, True, False)] and s.stopped_by_budget


def test_a_signal_finishes_the_step_then_hands_it_to_on_signal():
    s = Schedule(LoopConfig(), total=5)
    stopped = []

    def on_signal(step: int) -> None:
        stopped.append(step)
        with pytest.raises(SystemExit) as exit_:
            s.exit_for_signal(step, "checkpoint X", module="shell.sft")
        raise exit_.value

    s.install_signal_handlers()
    try:
        with pytest.raises(SystemExit) as done:
            for step in s.steps(on_signal=on_signal):
                if step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2, which still completes
    finally:
        s.restore_signal_handlers()
    assert stopped == [2] and s.completed == 2 and done.value.code == 128 + signal.SIGTERM


# ------------------------------------------------------------------------------------------------ the run folder


@dataclass(frozen=True)
class _Config:
    lr: float = 1e-5
    loop: LoopConfig = field(default_factory=LoopConfig)
    run: RunConfig = field(default_factory=RunConfig)


def test_one_process_holds_a_run_folder(tmp_path):
    first, second = RunFolder(tmp_path / "r", _Config()), RunFolder(tmp_path / "r", _Config())
    first.open()
    try:
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            second.open()
    finally:
        first.release()
    second.open()  # free again
    second.release()


def test_the_folder_guard_refuses_a_start_over_checkpoints_and_changed_flags_on_resume(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(asdict(_Config())))  # what the run started with
    with pytest.raises(ValueError, match="already holds checkpoints"):
        RunFolder(run, _Config()).open()
    with pytest.raises(ValueError, match=r"lr: 1e-05 -> 0\.001"):
        RunFolder(run, _Config(lr=1e-3, loop=LoopConfig(resume=True))).open()
    allowed = RunFolder(run, _Config(lr=1e-3, loop=LoopConfig(resume=True, allow_config_change=True)))
    assert allowed.open() == {"lr": (1e-5, 1e-3)}
    allowed.record_changes(1)
    allowed.release()
    assert read_jsonl_records(run / "config_history.jsonl")[0]["changes"] == {"lr": [1e-5, 1e-3]}
    assert allowed.saved_config()["lr"] == 1e-3  # the config the run trains with now


# ------------------------------------------------------------------------------------------------ the checkpointer


def _parts(seed: int):
    model, tok = tiny_policy(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, tok, optimizer, scheduler


def test_a_checkpoint_restores_weights_optimizer_schedule_rng_and_the_loop_state(tmp_path):
    model, tok, optimizer, scheduler = _parts(0)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    saver = Checkpointer(tmp_path, model=model, tokenizer=tok, optimizer=optimizer, scheduler=scheduler, keep_last=1)
    path = saver.save(3, elapsed=12.5, loop={"train_step": 7})
    expected_rng = (random.random(), torch.rand(2))
    assert saver.save_unless_newest(3, elapsed=99.0, loop={}) == path  # already that step's
    state = TrainerState.read(path)
    assert (state.step, state.world_size, state.elapsed, state.loop, len(state.rng)) == (3, 1, 12.5, {"train_step": 7}, 1)

    other, tok2, optimizer2, scheduler2 = _parts(1)
    loaded = Checkpointer(tmp_path, model=other, tokenizer=tok2, optimizer=optimizer2, scheduler=scheduler2,
                          keep_last=1).resume()
    assert loaded is not None and loaded.path == path and loaded.step == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert scheduler2.last_epoch == 1 and optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert (random.random(), torch.rand(2))[0] == expected_rng[0]  # the RNG as it was at the save
    saver.save(4, elapsed=13.0, loop={})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004"]  # keep_last=1


def test_a_checkpoint_of_the_old_format_is_refused_by_name_and_converts_once_explicitly(tmp_path):
    folder = tmp_path / "checkpoints" / "step_000002"
    folder.mkdir(parents=True)
    rng = rng_state()
    torch.save({"step": 2, "rng": rng, "elapsed": 5.0, "loop": {"a": 1},
                "optimizer": {"optimizer": {"state": {}}, "scheduler": {"last_epoch": 2}}}, folder / LEGACY_STATE)
    write_manifest(folder)
    assert list_checkpoints(tmp_path) == [folder]  # seen, so a resume refuses it instead of starting afresh
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: a trainer state of the previous format"):
        TrainerState.read(folder)
    assert convert_legacy_checkpoint(folder) == folder / TRAINER_STATE
    assert not (folder / LEGACY_STATE).exists()
    state = TrainerState.read(folder)  # the rewritten manifest holds
    assert (state.step, state.world_size, state.optimizer, state.scheduler, state.loop) == (
        2, 1, {"state": {}}, {"last_epoch": 2}, {"a": 1})
    assert torch.equal(state.rng[0]["torch"], rng["torch"])


class Payload:
    """A pickle that runs a shell command when it is unpickled (what an attacker plants in a checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted_checkpoint(tmp_path: Path, marker: Path, file: str, manifest: str) -> Path:
    """A real checkpoint whose ``file`` is replaced by a pickled payload; its manifest then ``refreshed`` (the payload
    listed as if it belonged), ``deleted`` or ``stale`` (left as it was)."""
    model, tok, optimizer, scheduler = _parts(0)
    path = Checkpointer(tmp_path, model=model, tokenizer=tok, optimizer=optimizer, scheduler=scheduler,
                        keep_last=1).save(1, elapsed=1.0, loop={})
    if file == LEGACY_STATE:
        (path / TRAINER_STATE).unlink()
    torch.save({"step": 1, "x": Payload(marker)}, path / file)
    if manifest == "refreshed":
        write_manifest(path)
    elif manifest == "deleted":
        (path / "manifest.json").unlink()
    return path


_REFUSALS = {
    (TRAINER_STATE, "refreshed"): "not a safetensors file", (LEGACY_STATE, "refreshed"): "of the previous format",
    ("model.safetensors", "refreshed"): "deserializing header|weights do not match", ("rng_rank0.pt", "stale"): "not in the manifest",
    **{(f, "deleted"): "a checkpoint without a manifest is not trusted"
       for f in (TRAINER_STATE, LEGACY_STATE, "model.safetensors", "rng_rank0.pt")},
    **{(f, "stale"): "checksum differs|bytes, the manifest says|missing"
       for f in (TRAINER_STATE, LEGACY_STATE, "model.safetensors")},
}


@pytest.mark.parametrize(("file", "manifest"), sorted(_REFUSALS))
def test_a_pickled_payload_in_any_checkpoint_file_never_runs_on_resume(tmp_path, file, manifest):
    marker = tmp_path / "ran"
    path = _planted_checkpoint(tmp_path / "run", marker, file, manifest)
    other, tok2, optimizer2, scheduler2 = _parts(1)
    resumer = Checkpointer(tmp_path / "run", model=other, tokenizer=tok2, optimizer=optimizer2, scheduler=scheduler2,
                           keep_last=1)
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        with pytest.raises(CheckpointError, match="no intact checkpoint") as refused:
            resumer.resume()  # check_resume_world first: it reads nothing of a checkpoint before its manifest
    assert not marker.exists()
    assert re.search(_REFUSALS[file, manifest], str(refused.value)), str(refused.value)


def test_an_extra_pickle_listed_in_a_refreshed_manifest_is_never_read(tmp_path):
    marker = tmp_path / "ran"
    path = _planted_checkpoint(tmp_path / "run", marker, "rng_rank0.pt", "refreshed")
    other, tok2, optimizer2, scheduler2 = _parts(1)
    loaded = Checkpointer(tmp_path / "run", model=other, tokenizer=tok2, optimizer=optimizer2, scheduler=scheduler2,
                          keep_last=1).resume()
    assert loaded is not None and loaded.path == path and not marker.exists()


@pytest.mark.parametrize("manifest", ["refreshed", "deleted", "stale"])
def test_a_payload_in_the_world_size_check_never_runs(tmp_path, manifest):  # what torchrun's resume asks first
    marker = tmp_path / "ran"
    _planted_checkpoint(tmp_path / "run", marker, LEGACY_STATE, manifest)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError):
        check_resume_world(tmp_path / "run")
    with pytest.raises(CheckpointError):
        convert_legacy_checkpoint(tmp_path / "run" / "checkpoints" / "step_000001")  # the explicit conversion too
    assert not marker.exists()


def test_a_payload_in_a_sharded_checkpoints_files_never_runs_through_the_loaders_reader(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    model = torch.nn.Linear(3, 2)
    dcp.save({"model": model.state_dict(), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "ckpt" / SHARDED))
    target = {"model": torch.nn.Linear(3, 2).state_dict(), "extra": 0}
    with pytest.raises(BaseException, match="refused"):  # dcp's CheckpointException wraps the item's StateError
        load_shards(tmp_path / "ckpt", target)
    (tmp_path / "ckpt" / SHARDED / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(BaseException, match="CheckpointException|refused"):
        load_shards(tmp_path / "ckpt", target)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ the logger


def test_the_run_logger_cuts_metrics_and_generations_back_to_the_resumed_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in
                                                    [{"train_step": 1}, {"eval_step": 2}, {"train_step": 3}]))
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 2, 3)))
    RunLogger(tmp_path, resume_step=2, generations_name="generations.jsonl", save_config=False).close()
    assert read_metrics(tmp_path) == [{"train_step": 1}, {"eval_step": 2}]
    assert [r["step"] for r in read_jsonl_records(tmp_path / "generations.jsonl")] == [0, 2]
    RunLogger(tmp_path, generations_name="generations.jsonl", save_config=False).close()  # a fresh start
    assert read_metrics(tmp_path) == [] and not (tmp_path / "generations.jsonl").exists()
    (tmp_path / "generations.jsonl").write_text("{}\n")
    RunLogger(tmp_path, metrics_name="warm_start_metrics.jsonl", save_config=False).close()  # a logger without one
    assert (tmp_path / "generations.jsonl").exists()
