"""Faults, bad input and planted files (issue 28's numbered cases): run names that escape the runs folder and
symbolic links in a run folder (2), a grading worker's death (3), a full disk (12), unencodable text and over-deep JSON (13)."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from doubles import tiny_sft_args


def sft_args(tiny: Path, runs: Path, name: str, *extra: str, steps: int = 2) -> list[str]:
    return tiny_sft_args(tiny, runs, name, *extra, steps=steps, data_limit=16, eval_limit=2)


# 2. run names are single folder names; nothing is written through a link ----------------------------------


@pytest.mark.parametrize("module", ["shell.sft", "shell.grpo", "shell.expert_iteration", "shell.evaluate"])
@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", ".", "", "  "])
def test_a_run_name_that_is_not_one_folder_name_exits_2_before_anything_is_written(tmp_path, capsys, module, name):
    import importlib

    entry = importlib.import_module(module)
    runs = tmp_path / "runs"
    name = name.replace("/abs", str(tmp_path / "abs"))
    with pytest.raises(SystemExit) as exc:
        entry.main(["--model.name-or-path", str(tmp_path / "no-model"), "--run.runs-dir", str(runs),
                    "--run.logger", "none", "--run.name", name])
    assert exc.value.code == 2
    assert f"--run.name must be a single folder name inside --run.runs-dir" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # neither the runs folder nor ../escape nor /abs/path


def test_appending_refuses_a_link_and_atomic_writes_replace_it(tmp_path):
    from shell.files import LinkRefused, append_text, atomic_write_text

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(victim)
    with pytest.raises(LinkRefused, match="metrics.jsonl is a symbolic link"):
        append_text(link, "{}\n")
    atomic_write_text(link, "")
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == ""
    append_text(link, "a\n")
    append_text(link, "b\n")
    assert link.read_text() == "a\nb\n"


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tiny, tmp_path, capsys):
    from shell import sft

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / ".lock").symlink_to(victim)
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path / "runs", "r"))
    assert exc.value.code == 2
    assert ".lock is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


def test_a_planted_metrics_link_is_replaced_on_a_new_run_and_refused_on_resume(tiny, tmp_path, capsys):
    from shell import sft

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").symlink_to(victim)
    (run / "generations.jsonl").symlink_to(victim)
    sft.main(sft_args(tiny, tmp_path / "runs", "r", steps=2))
    assert victim.read_text() == "precious\n"
    assert not (run / "metrics.jsonl").is_symlink() and not (run / "generations.jsonl").is_symlink()
    assert [json.loads(x)["train_step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "train_step" in json.loads(x)] == [1, 2]
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path / "runs", "r", "--resume", steps=3))
    assert exc.value.code == 2 and "metrics.jsonl is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious\n"


# 3. the grading pool survives any worker's death ------------------------------------------------------------


def dying_reward(response: str, ground_truth: object, fast: bool = True) -> dict[str, float]:
    """Test reward function (module level, so workers can load it): ``"die"`` kills its worker, as the
    out-of-memory killer would."""
    if response == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


def kill_and_reap(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("killed", [1, 2])
def test_idle_grading_workers_killed_between_batches_are_replaced_and_nothing_is_lost(capsys, killed):
    from shell import grading
    from shell.grading import close_pool, grade_batch

    responses = ["a", "b", "c", "d", "e", "f"]
    close_pool()
    try:
        grade_batch(responses, ["1"] * 6, reward_fn=dying_reward, num_workers=2)
        victims = [w.process for w in grading._POOL.workers[:killed]]
        for process in victims:  # idle: between batches
            kill_and_reap(process)
        capsys.readouterr()
        rewards, meta = grade_batch(responses, ["1"] * 6, reward_fn=dying_reward, num_workers=2)
        assert [r["reward"] for r in rewards] == [1.0] * 6  # the items went to the replacements
        assert meta["errors"] == 0.0 and meta["timeouts"] == 0.0
        out = capsys.readouterr().out
        for process in victims:
            assert f"grading: worker {process.pid} died (killed by SIGKILL" in out
        assert out.count("replaced; it held no item") == killed
        assert all(w.process.is_alive() for w in grading._POOL.workers)
    finally:
        close_pool()


def test_a_busy_grading_worker_killed_mid_item_counts_that_item_wrong_and_the_pool_goes_on(capsys):
    from shell.grading import close_pool, grade_batch

    close_pool()
    try:
        rewards, meta = grade_batch(["a", "die", "b", "c"], ["1"] * 4, reward_fn=dying_reward, num_workers=1)
        assert [r["reward"] for r in rewards] == [1.0, 0.0, 1.0, 1.0]
        assert meta["errors"] == 1.0
        assert "died (killed by SIGKILL" in capsys.readouterr().out
        t0 = time.monotonic()
        again, meta = grade_batch(["a", "b"], ["1"] * 2, reward_fn=dying_reward, num_workers=1)
        assert [r["reward"] for r in again] == [1.0, 1.0] and meta["errors"] == 0.0
        assert time.monotonic() - t0 < 60
    finally:
        close_pool()


# 12. a full disk ---------------------------------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_an_atomic_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from shell.files import WriteError, atomic_write_text

    target = atomic_write_text(tmp_path / "config.json", "old\n")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", enospc)
        with pytest.raises(WriteError) as exc:
            atomic_write_text(target, "new\n")
    assert str(exc.value) == f"could not write {target}: no space left on device (the disk is full)"
    assert exc.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_full_disk_while_appending_names_the_file(tmp_path, monkeypatch):
    from shell.files import WriteError, append_text

    log = tmp_path / "metrics.jsonl"
    with monkeypatch.context() as m:
        m.setattr(os, "write", enospc)
        with pytest.raises(WriteError) as exc:
            append_text(log, "{}\n")
    assert str(exc.value) == f"could not write {log}: no space left on device (the disk is full)"


@pytest.mark.parametrize("raised", [
    Exception("No space left on device (os error 28)"),  # the tokenizers library's save
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 19712 vs 19604"),  # torch.save
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_while_publishing_a_folder_says_so_and_leaves_no_temporary(tmp_path, monkeypatch, raised):
    import shutil

    from shell.files import WriteError, publish_dir

    target = tmp_path / "checkpoints" / "step_000002"
    real_usage = shutil.disk_usage

    def usage(path):  # what a disk that just filled up reports: nothing free
        return real_usage(path)._replace(free=0)

    if isinstance(raised, RuntimeError):  # no word of disk space in the error: the file system is asked
        monkeypatch.setattr(shutil, "disk_usage", usage)

    def fill(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"0" * 100)
        raise raised

    with pytest.raises(WriteError) as exc:
        publish_dir(target, fill)
    assert str(exc.value) == f"could not write {target}: no space left on device (the disk is full)"
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_failed_publish_that_is_not_a_full_disk_says_what_it_was(tmp_path):
    from shell.files import WriteError, publish_dir

    def fill(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(WriteError, match=f"could not write {tmp_path / 'final'}: Permission denied"):
        publish_dir(tmp_path / "final", fill)

    def bug(tmp: Path) -> None:
        raise TypeError("a bug, not the disk")

    with pytest.raises(TypeError):  # not an I/O error: raised as it is
        publish_dir(tmp_path / "final", bug)


def test_a_full_disk_during_a_run_is_one_error_line_naming_the_path_exit_1(tiny, tmp_path, monkeypatch, capsys):
    import transformers

    from shell import sft

    def full(self, *args, **kwargs):  # what the tokenizers library raises on ENOSPC
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full)
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path, "full", steps=1))
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err.strip().splitlines()[-1] == (f"error: could not write {tmp_path / 'full' / 'checkpoints' / 'step_000001'}: "
                                             f"no space left on device (the disk is full)")
    assert "Traceback" not in err


# 13. data: unencodable text and over-deep JSON are file:line errors -----------------------------------------


LONE_SURROGATE = '{"problem": "What is 2 + \\ud800 2?", "answer": "4"}'  # the JSON text \ud800, as a file holds it
DEEP = '{"problem": "What is 2 + 2?", "answer": "4", "level": ' + "[" * 5000 + "]" * 5000 + "}"


@pytest.mark.parametrize(("line", "message"), [
    (LONE_SURROGATE, "field 'problem' holds text that is not valid Unicode (a lone surrogate '\\ud800' at character 12)"),
    (DEEP, "nested more than 64 levels deep"),
    ('{"problem": "x", "answer": "4", "level": ' + "[" * 65 + "]" * 65 + "}", "field 'level' is nested more than 64 levels deep"),
    ('{"problem": "x", "\\udfff": 1, "answer": "4"}', "field '\\udfff' holds text that is not valid Unicode"),
], ids=["lone-surrogate", "5000-deep", "65-deep", "surrogate-key"])
def test_unusable_values_are_file_line_errors(tmp_path, line, message):
    from shell.data import DataError, load_jsonl_dataset

    data = tmp_path / "math.jsonl"
    data.write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        load_jsonl_dataset(data)
    assert str(exc.value).startswith(f"{data}:2: ") and message in str(exc.value)


def test_a_lone_surrogate_in_an_sft_file_is_a_file_line_error(tmp_path):
    from shell.data import DataError
    from shell.data.jsonl import load_sft_examples

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "Q", "response": "A \\ud83d"}\n')
    with pytest.raises(DataError, match=f"{data}:1: field 'response' holds text that is not valid Unicode"):
        load_sft_examples(data)


def test_a_nesting_just_within_the_limit_loads(tmp_path):
    from shell.data import load_jsonl_dataset

    data = tmp_path / "math.jsonl"
    data.write_text('{"problem": "x", "answer": "4", "level": ' + "[" * 63 + "]" * 63 + "}\n")  # 64 levels with the record
    assert load_jsonl_dataset(data).answers == ["4"]


@pytest.mark.parametrize("line", [LONE_SURROGATE, DEEP], ids=["lone-surrogate", "5000-deep"])
def test_unusable_data_exits_2_naming_file_and_line_without_a_traceback(tiny, tmp_path, capsys, line):
    from shell import evaluate

    data = tmp_path / "math.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.path", str(data),
                       "--eval.max-tokens", "4", "--grading.workers", "0", "--run.runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"error: {data}:1: " in err


# 14. absurd sizes and missing solutions, refused before the model loads -------------------------------------


def test_sft_refuses_a_batch_larger_than_the_data_before_loading(tiny, tmp_path, capsys, monkeypatch):
    from shell import sft

    monkeypatch.setattr(sft, "build_sampler", lambda *a, **k: pytest.fail("the policy was loaded"))
    with pytest.raises(SystemExit) as exc:
        sft.main(["--model.name-or-path", str(tiny), "--run.runs-dir", str(tmp_path / "runs"),
                  "--run.logger", "none", "--data.limit", "16", "--batch-size", "100000", "--gradient-accumulation-steps", "1"])
    assert exc.value.code == 2
    assert "--batch-size (100000) is larger than the training data (16 pairs)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_sft_on_math_records_without_solutions_says_so(tiny, tmp_path, capsys, monkeypatch):
    from shell import sft

    monkeypatch.setattr(sft, "build_sampler", lambda *a, **k: pytest.fail("the policy was loaded"))
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit) as exc:
        sft.main(["--model.name-or-path", str(tiny), "--run.runs-dir", str(tmp_path / "runs"),
                  "--run.logger", "none", "--data.path", str(data), "--batch-size", "2", "--gradient-accumulation-steps", "1",
                  "--eval-data.path", str(data)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"error: {data}: none of its 3 problems has a solution, so no SFT trace can be made" in err
    assert "tokens" not in err and not (tmp_path / "runs").exists()


def test_traces_leave_out_and_count_problems_without_a_solution(tmp_path, capsys):
    from shell.data import make_sft_examples, sft_examples_for
    from shell.data.loading import DataConfig

    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"problem": "1 + 1?", "solution": "1 + 1 = $\\boxed{2}$."}) + "\n"
                    + json.dumps({"problem": "2 + 2?", "answer": "4"}) + "\n")
    pairs = sft_examples_for(DataConfig(path=str(data)))
    assert [p.ground_truth for p in pairs] == ["2"] and pairs[0].where == f"{data}:1"
    assert "left out 1 of 2 problems without a solution" in capsys.readouterr().out
    assert make_sft_examples([], "r1_zero") == []  # GRPO without a warm start: no traces needed, none made


GLOO_PEER_DIED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:7302. This is typically caused by a remote worker crashing. Check the logs of the remote "
                  "worker before reporting an error. GLHF!")  # what rank 0 of a 2-rank gloo job raised when rank 1 died


def test_a_dead_torchrun_rank_is_one_error_line_on_the_others(capsys):
    from shell.config import run_cli
    from shell.sft import PRESETS, SFTConfig

    def train(cfg):
        raise RuntimeError(GLOO_PEER_DIED)

    with pytest.raises(SystemExit) as exc:
        run_cli(SFTConfig, PRESETS, train, description="x", args=[])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert err.strip() == ("error: another process of this torchrun job died (Connection closed by peer [127.0.0.1]:7302); "
                           "its own log says why. Rerun the job with --resume to continue from its last checkpoint")

    def bug(cfg):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        run_cli(SFTConfig, PRESETS, bug, description="x", args=[])


# 11. each final record once, however often a finished run is resumed ----------------------------------------


def test_resuming_a_finished_run_redoes_the_final_evaluation_and_logs_it_once(tiny, tmp_path):
    from shell import grpo
    from shell.runlog import read_metrics

    args = ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "16", "--eval-data.limit", "2",
            "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
            "--run.logger", "none", "--run.runs-dir", str(tmp_path), "--run.name", "f", "--n-grpo-steps", "1",
            "--rollout-batch-size", "4", "--group-size", "2", "--train-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--sampling.max-tokens", "4", "--eval-every", "10", "--warm-start.steps", "0",
            "--final-eval.enabled", "--final-eval.data.limit", "2", "--final-eval.sampling.max-tokens", "4",
            "--final-eval.greedy"]
    grpo.main(args)
    grpo.main([*args, "--resume"])  # as after a kill -9 during the final evaluation: it is redone
    grpo.main([*args, "--resume"])
    rows = read_metrics(tmp_path / "f")
    assert sum("final/answer_reward" in r for r in rows) == 1
    assert sum("final_greedy/answer_reward" in r for r in rows) == 1
    assert [r["train_step"] for r in rows if "train/loss" in r] == [1]


def test_a_resumed_logger_drops_the_final_records_it_will_write_again(tmp_path):
    from shell.runlog import RunLogger, read_metrics

    rows = [{"train_step": 1, "train/loss": 1.0}, {"eval_step": 1, "eval/answer_reward": 0.5},
            {"eval_step": 1, "final/answer_reward": 0.5}, {"eval_step": 1, "final_greedy/answer_reward": 0.4},
            {"train_step": 2, "train/loss": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    RunLogger(tmp_path, resume_step=1, save_config=False)
    assert read_metrics(tmp_path) == rows[:2]


# 6. under torchrun, the world-size check falls back from a damaged newest checkpoint ----------------------


def test_the_resume_world_check_falls_back_from_a_damaged_newest_checkpoint(tiny, tmp_path):
    from shell import sft
    from shell.checkpoint import CheckpointError, check_resume_world

    sft.main(sft_args(tiny, tmp_path, "w", "--checkpoint-every", "1", "--keep-checkpoints", "2", steps=2))
    folder = tmp_path / "w" / "checkpoints" / "step_000002"
    newest = next(folder / name for name in ("trainer_state.safetensors", "trainer_state.pt") if (folder / name).exists())
    newest.write_bytes(newest.read_bytes()[:100])  # what a torchrun rank killed mid-copy leaves
    with pytest.warns(UserWarning, match="step_000002 is damaged"):
        check_resume_world(tmp_path / "w")  # the previous checkpoint, written by one rank like this run: no error
    older = tmp_path / "w" / "checkpoints" / "step_000001" / "model.safetensors"
    older.write_bytes(b"x")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint"):
        check_resume_world(tmp_path / "w")


# 9. and 10. a resume checks the config and the data it resumes ---------------------------------------------


def test_a_missing_or_unreadable_config_is_refused_naming_it_unless_allowed_then_recorded(tiny, tmp_path, capsys):
    from shell import sft
    from shell.runlog import read_metrics

    sft.main(sft_args(tiny, tmp_path, "c", "--optim.lr", "1e-3", steps=2))
    config = tmp_path / "c" / "config.json"
    config.unlink()
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path, "c", "--resume", "--optim.lr", "0.5", steps=3))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{config} is missing" in err and "--allow-config-change" in err
    config.write_text('{"optim":\n')
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path, "c", "--resume", "--optim.lr", "0.5", steps=3))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{config} is unreadable" in err and "line 2" in err
    sft.main(sft_args(tiny, tmp_path, "c", "--resume", "--optim.lr", "0.5", "--allow-config-change", steps=3))
    rows = [r for r in read_metrics(tmp_path / "c") if "train/lr" in r]
    assert rows[-1]["train_step"] == 3 and rows[-1]["train/lr"] == pytest.approx(0.5)  # applied, not the old 1e-3
    [entry] = [json.loads(x) for x in (tmp_path / "c" / "config_history.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and f"{config} is unreadable" in entry["config_replaced"]
    assert json.loads(config.read_text())["optim"]["lr"] == 0.5  # the flags it trains with now
    sft.main(sft_args(tiny, tmp_path, "c", "--resume", "--optim.lr", "0.5", steps=4))  # and compared from now on


def _sft_file(path: Path, n: int) -> Path:
    from shell.data import DataConfig, sft_examples_for

    examples = sft_examples_for(DataConfig(limit=n), "r1_zero")
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response, "ground_truth": e.ground_truth}) + "\n"
                            for e in examples[:n]))
    return path


def test_the_data_is_fingerprinted_and_a_change_refused_on_resume_unless_allowed(tiny, tmp_path, capsys):
    from shell import sft
    from shell.runlog import read_metrics

    data = _sft_file(tmp_path / "train.jsonl", 16)
    args = [*sft_args(tiny, tmp_path, "d"), "--data.path", str(data)]
    sft.main(args)
    saved = json.loads((tmp_path / "d" / "data_fingerprint.json").read_text())
    assert saved["train"]["records"] == 16 and set(saved) == {"train", "held_out"}
    _sft_file(data, 5)  # replaced between the run and its resume
    with pytest.raises(SystemExit) as exc:
        sft.main([*args, "--num-steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "data fingerprint: train: 16 records" in err and "-> 5 records" in err
    assert "--allow-config-change" in err
    sft.main([*args, "--num-steps", "3", "--resume", "--allow-config-change"])
    assert [r["train_step"] for r in read_metrics(tmp_path / "d") if "train/loss" in r] == [1, 2, 3]
    [entry] = [json.loads(x) for x in (tmp_path / "d" / "config_history.jsonl").read_text().splitlines()]
    assert "data fingerprint: train" in entry["data"]
    assert json.loads((tmp_path / "d" / "data_fingerprint.json").read_text())["train"]["records"] == 5
    (tmp_path / "d" / "data_fingerprint.json").unlink()
    with pytest.raises(SystemExit) as exc:
        sft.main([*args, "--num-steps", "4", "--resume"])
    assert exc.value.code == 2 and "data_fingerprint.json missing" in capsys.readouterr().err


# 7. a finished run's folder is protected --------------------------------------------------------------------


@pytest.mark.parametrize("left", ["final", "metrics"])
def test_a_new_run_over_a_finished_one_is_refused_unless_resume_or_overwrite(tiny, tmp_path, capsys, left):
    import shutil

    from shell import sft

    sft.main(sft_args(tiny, tmp_path, "done", steps=1))
    run = tmp_path / "done"
    shutil.rmtree(run / "checkpoints")  # to free disk
    if left == "metrics":
        shutil.rmtree(run / "final")
    kept = (run / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as exc:
        sft.main(sft_args(tiny, tmp_path, "done", steps=1))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds a run that trained" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == kept and (left == "metrics" or (run / "final").is_dir())
    sft.main(sft_args(tiny, tmp_path, "done", "--overwrite", steps=2))
    assert [json.loads(x)["train_step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in json.loads(x)] == [1, 2]


# 4. and 5. the warm start and the final evaluation are inside the run's lifecycle ---------------------------


def _grpo_args(tiny: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "16", "--eval-data.limit", "2",
            "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
            "--run.logger", "none", "--run.runs-dir", str(runs), "--run.name", name, "--n-grpo-steps", "1",
            "--rollout-batch-size", "4", "--group-size", "2", "--train-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--sampling.max-tokens", "4", "--eval-every", "10", "--warm-start.batch-size", "4", *extra]


def _popen(args: list[str]):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "shell.grpo", *args], cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_warm_start_checkpoints_it_and_resume_continues_from_that_step(tiny, tmp_path, sig, code):
    from shell import grpo
    from shell.runlog import read_metrics

    grpo.main(_grpo_args(tiny, tmp_path, "straight", "--warm-start.steps", "12"))
    args = _grpo_args(tiny, tmp_path, "sig", "--warm-start.steps", "12")
    proc = _popen(args)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("[warm start 3/12]"):
            proc.send_signal(sig)
            break
    out += proc.stdout.readlines()
    text = "".join(out)
    assert proc.wait(timeout=300) == code, text
    reached = int(text.split("(warm-start step ")[1].split(")")[0])
    assert 3 <= reached < 12 and "Continue with:" in text and "[warm start 12/12]" not in text
    assert (tmp_path / "sig" / "checkpoints" / "step_000000").is_dir() and not (tmp_path / "sig" / "final").exists()
    grpo.main([*args, "--resume"])
    warm = read_metrics(tmp_path / "sig" / "warm_start_metrics.jsonl")
    assert [r["train_step"] for r in warm] == list(range(1, 13))  # each warm-start step once
    straight = read_metrics(tmp_path / "straight" / "warm_start_metrics.jsonl")
    assert [r["train/loss"] for r in warm] == pytest.approx([r["train/loss"] for r in straight], rel=1e-4)  # exact resume
    rows = read_metrics(tmp_path / "sig")
    assert sum(r.get("eval_step") == 0 for r in rows if "eval/answer_reward" in r) == 1
    assert sum("train/total_params" in r for r in rows) == 1
    assert [r["train_step"] for r in rows if "train/loss" in r] == [1]


def test_the_budget_governs_the_warm_start(tiny, tmp_path, capsys):
    from shell import grpo
    from shell.runlog import read_metrics

    started = time.monotonic()
    grpo.main(_grpo_args(tiny, tmp_path, "b", "--warm-start.steps", "100000", "--budget-hours", "0.001",
                         "--warm-start.budget-share", "0.5"))
    took = time.monotonic() - started
    warm = read_metrics(tmp_path / "b" / "warm_start_metrics.jsonl")
    assert 1 <= len(warm) < 100000 and "warm start ends after step" in capsys.readouterr().out
    assert took < 120  # the warm start stopped at its share (1.8 s), not after 100,000 steps
    assert [r["train_step"] for r in read_metrics(tmp_path / "b") if "train/loss" in r] == [1]


def test_the_budget_skips_a_greedy_final_pass_that_would_not_fit(tiny, tmp_path, capsys):
    from shell import grpo
    from shell.runlog import read_metrics

    final = ("--warm-start.steps", "0", "--final-eval.enabled", "--final-eval.data.limit", "4", "--final-eval.greedy")
    grpo.main(_grpo_args(tiny, tmp_path, "fits", *final, "--budget-hours", "10"))
    assert (tmp_path / "fits" / "final_eval" / "greedy" / "summary.json").is_file()
    capsys.readouterr()
    grpo.main(_grpo_args(tiny, tmp_path, "over", *final, "--budget-hours", "1e-6"))  # spent before the final pass
    out = capsys.readouterr().out
    assert (tmp_path / "over" / "final_eval" / "summary.json").is_file()  # the sampled pass: the run's score
    assert not (tmp_path / "over" / "final_eval" / "greedy").exists()
    assert "the greedy pass" in out and "would end past the budget: skipped" in out
    assert [r for r in read_metrics(tmp_path / "over") if "final_greedy/skipped" in r][0]["final_greedy/skipped"] == 1


def test_sigterm_during_the_final_evaluation_stops_at_once_and_resume_redoes_it(tiny, tmp_path):
    from shell import grpo
    from shell.runlog import read_metrics

    args = _grpo_args(tiny, tmp_path, "f", "--warm-start.steps", "0", "--final-eval.enabled", "--final-eval.data.limit",
                      "500", "--final-eval.sampling.max-tokens", "96", "--final-eval.greedy")
    proc = _popen(args)
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("done: "):  # the last checkpoint and final/ are written: the final evaluation begins
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out += proc.stdout.readlines()
    text = "".join(out)
    assert proc.wait(timeout=120) == 143, text
    assert time.monotonic() - sent < 30
    assert "SIGTERM during the final evaluation: stopping now" in text and "finishing the set-up" not in text
    assert "--resume" in text.split("Continue with:")[1]
    assert not (tmp_path / "f" / "final_eval" / "greedy" / "summary.json").exists()
    grpo.main([*args, "--resume"])
    rows = read_metrics(tmp_path / "f")
    assert sum("final/answer_reward" in r for r in rows) == 1 and sum("final_greedy/answer_reward" in r for r in rows) == 1
    assert json.loads((tmp_path / "f" / "final_eval" / "summary.json").read_text())["num_examples"] == 500
