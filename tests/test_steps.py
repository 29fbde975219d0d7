"""The microbatch step every loop runs (shell.steps.make_train_step): compiled and eager agree, and a loop
started with --optim.compile really trains through what torch.compile returned."""

from __future__ import annotations

import pytest
import torch

from doubles import save_tiny_policy, tiny_policy
from core import ObjectiveSettings
from shell.steps import PolicyGradientTensors, make_log_probs_fn, make_train_step, tokenize_batch

PROMPTS = ["Question: 12 + 30? Think.", "Question: 7 - 2? Think.", "Question: 9 + 9? Think."]
RESPONSES = [" 12 + 30 = 42 </think> <answer> 42 </answer>", " 5 </think> <answer> 5 </answer>",
             " 18 </think> <answer> 18 </answer>"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("objective", "share_prompt_prefix"), [("sft", False), ("grpo", True)])
def test_compiled_step_gives_the_same_loss_and_gradients_as_eager(objective, share_prompt_prefix, no_shape_checks):
    model, tok = tiny_policy(seed=5)
    model.train()
    old = None
    results = []
    for compile in (False, True):
        step = make_train_step(model, objective, compile=compile, share_prompt_prefix=share_prompt_prefix)
        logps = make_log_probs_fn(model, compile=compile, share_prompt_prefix=share_prompt_prefix)
        out = []
        for n in (3, 2):  # two batch shapes through the same compiled graph
            tb = tokenize_batch(PROMPTS[:n], RESPONSES[:n], tok, "cpu")
            with torch.inference_mode():
                old_lp = logps(tb["input_ids"], tb["labels"], prefix_len=tb["prefix_len"])["log_probs"].clone()
            old = old_lp if old is None else old
            kwargs = {"gradient_accumulation_steps": 2}
            if objective == "grpo":
                kwargs = {"settings": ObjectiveSettings(loss_type="grpo_clip", gradient_accumulation_steps=2, cliprange=0.2),
                          "tensors": PolicyGradientTensors(advantages=torch.linspace(-1, 1, n).unsqueeze(-1),
                                                           old_log_probs=old_lp - 0.05)}
            model.zero_grad(set_to_none=True)
            loss, meta = step(tb["input_ids"], tb["labels"], tb["response_mask"], prefix_len=tb["prefix_len"],
                              return_token_entropy=True, **kwargs)
            out.append((loss, meta["log_probs"], meta["token_entropy"], old_lp, _grads(model)))
        results.append(out)
    for (l0, lp0, h0, o0, g0), (l1, lp1, h1, o1, g1) in zip(*results):
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-5)
        assert g0.keys() == g1.keys() and g0
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5)


def test_sft_with_compile_trains_through_the_compiled_step(tmp_path, monkeypatch, no_shape_checks):
    """`--optim.compile`: every training microbatch goes through the callable torch.compile returned."""
    from shell import sft

    real_compile = torch.compile
    calls: dict[str, int] = {}

    def counting_compile(fn, *args, **kwargs):
        compiled = real_compile(fn, *args, **kwargs)
        assert fn.__name__ not in calls, f"{fn.__name__} compiled twice"
        calls[fn.__name__] = 0

        def counted(*a, **k):
            calls[fn.__name__] += 1
            return compiled(*a, **k)

        return counted

    monkeypatch.setattr(torch, "compile", counting_compile)
    tiny = save_tiny_policy(tmp_path / "tiny")
    sft.main([
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "16", "--eval-data.limit", "2",
        "--eval.max-tokens", "4", "--grading.workers", "0", "--sampler.generation-dtype", "None",
        "--run.logger", "none", "--run.runs-dir", str(tmp_path), "--run.name", "c", "--num-steps", "2",
        "--batch-size", "4", "--gradient-accumulation-steps", "2", "--eval-every", "2", "--optim.compile",
    ])
    # 2 steps × 2 microbatches, all through the compiled step; nothing else was compiled (the GRPO step and the
    # log-probs function are compiled on first use, and SFT never uses them)
    assert calls == {"forward_and_loss": 2 * 2}
    assert (tmp_path / "c" / "final").exists()
