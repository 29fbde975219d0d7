"""LoRA (--lora.*, shell/lora.py) on a tiny random model: only the adapter trains, the merged final/ differs
from the base by rank <= r on the targeted projections and not at all elsewhere, kill + resume equals an
uninterrupted run, the sampler follows the adapter, the KL reference is the frozen base, the microbatch step's
options (shared prefix, activation checkpointing, compile) agree, and bad flags exit 2 before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from doubles import install_fake_vllm, sigkill_once, tiny_policy
from shell.config import OptimConfig
from shell.data import SFTExample
from shell.lora import LoraConfig, adapter_disabled, apply_lora, is_lora, merged_state_dict
from shell.runlog import read_metrics
from shell.safe_state import load_state
from shell.update import Learner, Reference, sft_update

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj", "up_proj")


def _examples(n: int = 8) -> list[SFTExample]:
    return [SFTExample(prompt=f"Q: {i}+{i}=", response=f" {2 * i} </answer>") for i in range(n)]


def _lora_policy(rank: int = 2, **kw):
    model, tok = tiny_policy()
    return apply_lora(model, LoraConfig(rank=rank, target_modules=TARGETS, **kw)), tok


def _randomize_adapter(model, seed: int = 0, scale: float = 0.05) -> None:
    """B starts at zero (the adapter is a no-op): give it values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------------------------- training


def test_only_adapter_parameters_get_gradients_and_optimizer_state():
    model, tok = _lora_policy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(TARGETS)  # A and B of each targeted projection of both layers
    probe = Learner(model, tok, OptimConfig(lr=1e-2))
    probe.optimizer.step = lambda: 1.0  # keep this step's gradients for inspection
    sft_update(probe, _examples(), gradient_accumulation_steps=2)
    graded = {n for n, p in model.named_parameters() if p.grad is not None}
    assert graded == trainable
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    model.zero_grad(set_to_none=True)
    learner = Learner(model, tok, OptimConfig(lr=1e-2))
    sft_update(learner, _examples(), gradient_accumulation_steps=2)
    state = learner.optimizer.optimizer.state
    assert {id(p) for p in state} == {id(p) for n, p in model.named_parameters() if n in trainable}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)  # no frozen weight moved
    assert any(".lora_B." in k for k in changed)  # B moved off zero: the adapter now changes the outputs


def test_rank_zero_is_full_fine_tuning():
    model, tok = tiny_policy()
    assert apply_lora(model, LoraConfig(rank=0)) is model and not is_lora(model)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_target_modules_name_the_flag():
    model, _ = tiny_policy()
    with pytest.raises(ValueError, match="--lora.target-modules nope"):
        apply_lora(model, LoraConfig(rank=2, target_modules=("nope",)))


def _step_grads(model, tok, *, prefix: bool, checkpoint: bool, compile: bool, autocast: bool):
    from shell.steps import make_train_step, tokenize_batch

    prompts = ["Q: what is 2+3? think step by step", "Q: what is 2+3? think step by step", "Q: what is 2+3? think step by step"]
    responses = [" 5 </answer>", " it is 5 </answer>", " 6 </answer>"]
    tb = tokenize_batch(prompts, responses, tok, "cpu")
    assert tb["prefix_len"] >= 2
    step = make_train_step(model, "sft", compile=compile, share_prompt_prefix=prefix,
                           checkpoint_above_tokens=0 if checkpoint else None)
    model.zero_grad(set_to_none=True)
    model.train()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, _ = step(tb["input_ids"], tb["labels"], tb["response_mask"], prefix_len=tb["prefix_len"],
                       gradient_accumulation_steps=1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    return float(loss), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_prefix_checkpointing_and_compile_give_the_adapter_the_same_gradients(autocast, no_shape_checks):
    """With the adapter, the shared prompt prefix (steps.PrefixedModel) gives the same loss (its gradient drops
    only the paths through the prefix's keys and values, as without LoRA); activation checkpointing gives the plain
    step's adapter gradients, and torch.compile (with the prefix) the eager ones (under bf16 autocast to its
    rounding)."""
    model, tok = _lora_policy()
    _randomize_adapter(model)
    tol = dict(rtol=5e-2, atol=5e-3) if autocast else dict(rtol=1e-3, atol=1e-5)
    plain = _step_grads(model, tok, prefix=False, checkpoint=False, compile=False, autocast=autocast)
    prefixed = _step_grads(model, tok, prefix=True, checkpoint=False, compile=False, autocast=autocast)
    cases = [(plain, dict(prefix=False, checkpoint=True, compile=False)), (prefixed, dict(prefix=True, checkpoint=False, compile=True))]
    assert prefixed[0] == pytest.approx(plain[0], rel=tol["rtol"])
    for (loss0, ref), kw in cases:
        loss, grads = _step_grads(model, tok, autocast=autocast, **kw)
        assert loss == pytest.approx(loss0, rel=tol["rtol"]), kw
        assert grads.keys() == ref.keys(), kw
        for name in ref:
            if autocast and kw["compile"]:  # inductor rounds its fused bf16 kernels elsewhere: compare whole tensors
                assert float((grads[name] - ref[name]).norm() / ref[name].norm()) < 5e-2, (kw, name)
            else:
                torch.testing.assert_close(grads[name], ref[name], **tol, msg=lambda m, kw=kw, name=name: f"{kw} {name}: {m}")


# ---------------------------------------------------------------------------------------------- merged weights, reference


def test_merged_weights_equal_the_adapter_model_and_disabling_gives_the_base():
    base, _ = tiny_policy()
    model, _ = _lora_policy()
    _randomize_adapter(model)
    x = torch.randint(0, 200, (2, 9))
    merged, _ = tiny_policy()
    merged.load_state_dict(merged_state_dict(model))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
        with adapter_disabled(model):
            torch.testing.assert_close(model(x).logits, base(x).logits, rtol=0, atol=0)
        assert not torch.allclose(model(x).logits, base(x).logits)  # switched back on


def test_the_kl_reference_is_the_frozen_base_without_a_copy():
    from shell.steps import make_log_probs_fn, tokenize_batch

    base, tok = tiny_policy()
    model, _ = _lora_policy()
    _randomize_adapter(model)
    learner = Learner(model, tok, OptimConfig(autocast_bf16=False))
    ref = Reference.base(learner)
    assert ref.model is learner.model
    tb = tokenize_batch(["Q: 1+1="], [" 2 </answer>"], tok, "cpu")
    with torch.inference_mode():
        got = ref.log_probs(tb["input_ids"], tb["labels"])["log_probs"]
        want = make_log_probs_fn(base)(tb["input_ids"], tb["labels"])["log_probs"]
        policy = learner.log_probs(tb["input_ids"], tb["labels"])["log_probs"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(policy, want)  # the adapter is on again for the policy
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


# ---------------------------------------------------------------------------------------------- the sampler


def _greedy(sampler, prompts):
    from shell.sampling import SamplingParams

    return [c[0].token_ids for c in sampler.generate(prompts, SamplingParams(n=1, temperature=0.0, max_tokens=8, seed=0))]


def test_the_hf_sampler_follows_the_adapter_after_a_sync():
    """The loops build the sampler's generation copy before the adapter is added: a plain model that a sync fills
    with the merged weights. Its outputs change at the sync, to the adapter policy's own."""
    from shell.sampling import HFSampler

    model, tok = tiny_policy()
    sampler = HFSampler(model, tok, generation_dtype="float32", attn_implementation=None)  # a copy, as the loops build
    model = apply_lora(model, LoraConfig(rank=2, target_modules=TARGETS))
    prompts = ["Q: 1+1=", "Q: 7*3=", "hello"]
    before = _greedy(sampler, prompts)
    _randomize_adapter(model, scale=0.5)
    assert _greedy(sampler, prompts) == before  # not synced yet: still the base
    sampler.load_weights(model)
    after = _greedy(sampler, prompts)
    assert after != before
    assert not is_lora(sampler.model)  # a plain model: the merged weights, no adapter layers
    own = HFSampler(model, tok, generation_dtype=None)  # sampling with the policy itself runs the adapter
    assert _greedy(own, prompts) == after


def test_vllm_gets_the_merged_weights_under_their_plain_names(monkeypatch, tiny):
    from shell.sampling.vllm import VLLMSampler

    install_fake_vllm(monkeypatch)
    sampler = VLLMSampler(str(tiny), placement="colocate", device="cpu")
    from shell.models import load_policy

    model, _ = load_policy(str(tiny), device="cpu")
    model = apply_lora(model, LoraConfig(rank=2, target_modules=TARGETS))
    _randomize_adapter(model)
    sampler.load_weights(model)
    engine = sampler.llm.model.state_dict()
    merged = merged_state_dict(model)
    assert set(engine) <= set(merged) | {"lm_head.weight"}
    for name, tensor in engine.items():
        torch.testing.assert_close(tensor, merged[name] if name in merged else model.lm_head.weight)


# ---------------------------------------------------------------------------------------------- the loops


def _sft_args(tiny: Path, runs: Path, name: str, *extra: str, steps: int = 4) -> list[str]:
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32", "--eval-data.limit", "4",
        "--eval.max-tokens", "4", "--grading.workers", "0", "--run.logger", "none", "--run.runs-dir", str(runs),
        "--run.name", name, "--num-steps", str(steps), "--batch-size", "4", "--gradient-accumulation-steps", "2",
        "--eval-every", "2", "--checkpoint-every", "2", "--optim.lr", "1e-2", "--lora.rank", "2",
        "--lora.target-modules", *TARGETS, *extra,
    ]


def test_sft_with_lora_writes_an_adapter_checkpoint_and_a_merged_final_of_rank_at_most_r(tiny, tmp_path):
    from safetensors.torch import load_file

    from shell import evaluate, sft

    run = sft.main(_sft_args(tiny, tmp_path, "s"))
    rows = read_metrics(run)
    assert "train_step" not in rows[0] and 0 < rows[0]["train/trainable_params"] < rows[0]["train/total_params"]
    ckpt = run / "checkpoints" / "step_000004"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and not list(ckpt.glob("model*.safetensors"))
    state = load_state(ckpt)["optimizer"]["state"]
    assert len(state) == 2 * 2 * len(TARGETS)  # AdamW state for A and B of each targeted projection of 2 layers, only
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    final = load_file(str(run / "final" / "model.safetensors"))
    base = load_file(str(tiny / "model.safetensors"))
    assert set(final) == set(base)
    targeted = [k for k in base if k.endswith(tuple(f"{t}.weight" for t in TARGETS))]
    assert len(targeted) == 2 * len(TARGETS)
    for key in base:
        if key in targeted:
            delta = final[key].double() - base[key].double()
            assert 0 < torch.linalg.matrix_rank(delta, atol=1e-6).item() <= 2, key
        else:
            assert torch.equal(final[key], base[key]), key  # untargeted: exactly the base
    result = evaluate.main(["--model.name-or-path", str(run / "final"), "--model.device", "cpu", "--data.limit", "4",
                         "--eval.max-tokens", "4", "--grading.workers", "0", "--run.logger", "none",
                         "--run.runs-dir", str(tmp_path), "--run.name", "e"])
    assert result.summary["num_examples"] == 4


def _comparable(rows):
    return [{k: v for k, v in r.items() if k not in ("time/elapsed_s", "eval/seconds")} for r in rows]


def test_lora_sft_killed_then_resumed_equals_uninterrupted(tiny, tmp_path):
    """With adapter dropout too (its noise comes from the restored RNG)."""
    from shell import sft

    sft.main(_sft_args(tiny, tmp_path, "straight", "--lora.dropout", "0.1", steps=6))
    args = _sft_args(tiny, tmp_path, "killed", "--lora.dropout", "0.1", steps=6)
    first = tmp_path / "killed" / "checkpoints" / "step_000002"
    sigkill_once("shell.sft", args, first, cwd=REPO)
    assert first.exists()
    sft.main([*args, "--resume"])
    assert _comparable(read_metrics(tmp_path / "killed")) == _comparable(read_metrics(tmp_path / "straight"))
    a, b = (tmp_path / "straight" / "final" / "model.safetensors"), (tmp_path / "killed" / "final" / "model.safetensors")
    assert a.read_bytes() == b.read_bytes()


def _grpo_args(tiny: Path, runs: Path, name: str, steps: int) -> list[str]:
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32",
        "--eval-data.limit", "4", "--eval.max-tokens", "6", "--grading.workers", "0",
        "--run.logger", "none", "--run.runs-dir", str(runs),
        "--run.name", name, "--n-grpo-steps", str(steps), "--rollout-batch-size", "8", "--group-size", "4",
        "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--loss-type", "grpo_clip",
        "--sampling.max-tokens", "6", "--eval-every", "2", "--warm-start.steps", "1", "--warm-start.batch-size", "8",
        "--optim.lr", "1e-2", "--kl-coef", "0.1", "--lora.rank", "2",
    ]


def test_lora_grpo_with_kl_resume_equals_uninterrupted(tiny, tmp_path):
    """GRPO with the frozen base as KL reference (no reference/ folder written) through a stop and --resume; the
    sampler's generation copy (bf16, the default) follows the adapter, so rollouts change from step to step."""
    from shell import grpo

    grpo.main(_grpo_args(tiny, tmp_path, "straight", 4))
    grpo.main(_grpo_args(tiny, tmp_path, "resumed", 2))
    grpo.main([*_grpo_args(tiny, tmp_path, "resumed", 4), "--resume"])
    a = _comparable(read_metrics(tmp_path / "straight"))
    assert a == _comparable(read_metrics(tmp_path / "resumed"))
    assert not (tmp_path / "straight" / "reference").exists()
    train = [r for r in a if "train/loss" in r]
    assert len(train) == 8 and any(r["train/kl"] > 0 for r in train)


def test_expert_iteration_takes_lora(tiny, tmp_path):
    from shell import expert_iteration

    run = expert_iteration.main([
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "16", "--eval-data.limit", "4",
        "--eval.max-tokens", "4", "--grading.workers", "0", "--run.logger", "none", "--run.runs-dir", str(tmp_path),
        "--run.name", "ei", "--n-ei-steps", "1", "--ei-batch-size", "4", "--group-size", "2",
        "--sampling.max-tokens", "4", "--lora.rank", "2", "--warm-start.steps", "1", "--warm-start.batch-size", "4",
    ])
    assert read_metrics(run)[0]["train/trainable_params"] < read_metrics(run)[0]["train/total_params"]
    assert (run / "final" / "adapter").is_dir() and (run / "checkpoints" / "step_000001" / "adapter").is_dir()


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(("module", "flags", "env", "message"), [
    ("shell.sft", ["--lora.rank", "-1"], {}, "--lora.rank must be >= 0"),
    ("shell.grpo", ["--lora.rank", "4", "--lora.alpha", "0"], {}, "--lora.alpha must be > 0"),
    ("shell.grpo", ["--lora.rank", "4", "--lora.dropout", "1"], {}, "--lora.dropout must be in [0, 1)"),
    ("shell.expert_iteration", ["--lora.rank", "4", "--lora.target-modules", "lm_head"], {}, "--lora.target-modules: lm_head"),
    ("shell.grpo", ["--lora.rank", "4"], {"WORLD_SIZE": "2"}, "--lora.rank 4: LoRA is not supported under torchrun"),
])
def test_bad_lora_flags_exit_2_naming_the_flag_before_anything_loads(tmp_path, monkeypatch, capsys, module, flags, env, message):
    import importlib

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    entry = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--model.name-or-path", str(tmp_path / "absent"), "--run.runs-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())  # nothing written


def test_lora_presets_are_the_full_presets_with_an_adapter_and_a_larger_learning_rate():
    from dataclasses import replace

    from shell import grpo, sft

    for module in (sft, grpo):
        full, lora = module.PRESETS["laptop"][1], module.PRESETS["laptop-lora"][1]
        assert full.lora.rank == 0 and lora.lora.rank == 16 and lora.optim.lr == pytest.approx(10 * full.optim.lr)
        same = replace(lora, lora=full.lora, optim=full.optim, run=full.run)
        if module is grpo:
            # the warm start's 3 steps: 10x (3e-4) left no correct answer on the laptop, so GRPO got zero-variance groups
            assert lora.warm_start.lr == pytest.approx(1e-3) and full.warm_start.lr == pytest.approx(3e-5)
            same = replace(same, warm_start=full.warm_start)
        assert same == full
    h100, lora = grpo.PRESETS["h100"][1], grpo.PRESETS["h100-lora"][1]
    assert (lora.lora.rank, lora.lora.alpha, lora.optim.lr, lora.model.dtype) == (32, 32.0, 1e-4, "bfloat16")
    assert replace(lora, lora=h100.lora, optim=h100.optim, model=h100.model, run=h100.run) == h100
