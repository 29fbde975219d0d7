"""SFT and evaluation entry points on a tiny random model: outputs, bad input, kill + exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doubles import sigkill_once
from shell.runlog import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _common(tiny: Path, runs: Path) -> list[str]:
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu",
        "--data.limit", "32", "--eval-data.limit", "6",
        "--eval.max-tokens", "6", "--grading.workers", "0",
        "--sampler.generation-dtype", "None",
        "--run.logger", "none", "--run.runs-dir", str(runs),
    ]


def _sft_args(tiny: Path, runs: Path, name: str) -> list[str]:
    return _common(tiny, runs) + [
        "--run.name", name, "--num-steps", "6", "--batch-size", "4", "--gradient-accumulation-steps", "2",
        "--eval-every", "3", "--checkpoint-every", "2", "--optim.lr", "1e-3",
    ]


def _comparable(rows):
    drop = {"time/elapsed_s", "eval/seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_evaluate_writes_results_and_summary(tiny, tmp_path, capsys):
    from shell import evaluate

    result = evaluate.main([*_common(tiny, tmp_path)[:2], "--data.limit", "5", "--eval.max-tokens", "5",
                            "--grading.workers", "0", "--sampler.generation-dtype", "None", "--run.runs-dir", str(tmp_path),
                            "--run.name", "zero_shot"])
    run_dir = tmp_path / "zero_shot"
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 == len(result.records)
    assert {"prompt", "response", "ground_truth", "format_reward", "answer_reward", "reward", "num_tokens",
            "mean_token_entropy"} <= set(rows[0])
    assert all(r["mean_token_entropy"] is not None for r in rows)  # the HF sampler reports entropies
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(summary["counts"].values()) == 5
    assert "format 1, answer 1" in capsys.readouterr().out


def test_sft_run_writes_metrics_curves_checkpoints(tiny, tmp_path):
    from shell import sft

    sft.main(_sft_args(tiny, tmp_path, "a"))
    run = tmp_path / "a"
    rows = read_metrics(run)
    train = [r for r in rows if "train_step" in r]
    evals = [r for r in rows if "eval_step" in r]
    assert [r["train_step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["eval_step"] for r in evals] == [0, 3, 6]
    assert {"eval/answer_reward", "eval/format_reward", "eval/reward"} <= set(evals[0])
    assert all(r["train/grad_norm"] >= 0 for r in train)
    assert (run / "curves.png").stat().st_size > 0
    assert (run / "final" / "config.json").exists()
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_000006"]  # the laptop preset keeps one
    gens = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [0, 3, 6]


def test_sft_killed_then_resumed_equals_uninterrupted(tiny, tmp_path):
    from shell import sft

    sft.main(_sft_args(tiny, tmp_path, "straight"))
    args = _sft_args(tiny, tmp_path, "killed")
    first = tmp_path / "killed" / "checkpoints" / "step_000002"
    killed_mid_run = sigkill_once("shell.sft", args, first, cwd=REPO)
    assert first.exists()
    if killed_mid_run:
        assert not (tmp_path / "killed" / "final").exists()
    sft.main([*args, "--resume"])
    assert _comparable(read_metrics(tmp_path / "killed")) == _comparable(read_metrics(tmp_path / "straight"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ('{"prompt": "p", "response": " x </think> <answer> 1 </answer>"}\n{"prompt": 3}\n', ":2: field 'prompt'"),
        ("", "no usable examples"),
        ('{"prompt": "p", "response": "no template here"}\n', ":1: field 'response' does not follow the r1_zero template"),
    ],
)
def test_sft_bad_input_is_a_clear_error_and_keeps_earlier_output(tiny, tmp_path, capsys, content, message):
    from shell import sft

    run = tmp_path / "bad"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"train_step": 1}\n')
    data = tmp_path / "sft.jsonl"
    if content is not None:
        _write(data, content)
    with pytest.raises(SystemExit) as exc:
        sft.main([*_sft_args(tiny, tmp_path, "bad"), "--data.path", str(data)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(data) in err
    assert (run / "metrics.jsonl").read_text() == '{"train_step": 1}\n'


def test_config_checks():
    from shell.sft import SFTConfig, check_config

    with pytest.raises(ValueError, match="divisible"):
        check_config(SFTConfig(batch_size=10, gradient_accumulation_steps=3))


def test_data_num_examples_and_filter_correct_flags(tmp_path, capsys):
    """`--data.num-examples N` takes a seeded subset of N pairs; `--data.filter-correct` keeps only the
    pairs whose response earns reward 1 and prints the kept size."""
    from shell.config import cli
    from shell.sft import PRESETS, SFTConfig, load_sft_data

    good = " 2 + 2 = 4 </think> <answer> 4 </answer>"
    bad = " 2 + 2 = 5 </think> <answer> 5 </answer>"
    rows = [{"prompt": f"p{i}", "response": good if i % 3 else bad, "ground_truth": "4"} for i in range(30)]
    data = _write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    cfg = cli(SFTConfig, PRESETS, description="", args=["--data.path", str(data), "--data.num-examples", "12"])
    subset = load_sft_data(cfg)
    assert len(subset) == 12 and len({e.prompt for e in subset}) == 12
    assert [e.prompt for e in load_sft_data(cfg)] == [e.prompt for e in subset]  # seeded

    cfg = cli(SFTConfig, PRESETS, description="", args=["--data.path", str(data), "--data.filter-correct",
                                                        "--grading.workers", "0"])
    kept = load_sft_data(cfg)
    assert sorted(e.prompt for e in kept) == sorted(f"p{i}" for i in range(30) if i % 3)
    assert "kept 20 of 30 pairs" in capsys.readouterr().out


@pytest.mark.parametrize("share_prompt_prefix", [False, True])
def test_activation_checkpointing_gives_the_same_log_probs_and_gradients(share_prompt_prefix):
    """A microbatch over ``checkpoint_above_tokens`` is recomputed in backward (and skips prefix
    sharing): same log-probs, same gradient as keeping the activations; the model is left as it was."""
    import torch

    from doubles import tiny_policy
    from shell.steps import make_train_step, tokenize_batch

    model, tok = tiny_policy(seed=3)
    model.train()
    prompts = ["Question: 12 + 30? Think.", "Question: 7 - 2? Think."]
    responses = [" 12 + 30 = 42 </think> <answer> 42 </answer>", " 5 </think> <answer> 5 </answer>"]
    tb = tokenize_batch(prompts, responses, tok, "cpu")
    assert tb["prefix_len"] >= 2

    def run(limit):
        model.zero_grad(set_to_none=True)
        step = make_train_step(model, "sft", share_prompt_prefix=share_prompt_prefix, checkpoint_above_tokens=limit)
        _, meta = step(tb["input_ids"], tb["labels"], tb["response_mask"], prefix_len=tb["prefix_len"],
                       gradient_accumulation_steps=1)
        return meta["log_probs"] * tb["response_mask"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    kept_lp, kept_grad = run(None)
    ckpt_lp, ckpt_grad = run(0)
    assert not getattr(model, "is_activation_checkpointing", None) and not model.model.gradient_checkpointing
    torch.testing.assert_close(ckpt_lp, kept_lp, rtol=1e-6, atol=1e-6)  # float32 maths: same to rounding
    if not share_prompt_prefix:  # with sharing on, the un-checkpointed run drops the prefix's gradient paths
        assert kept_grad.keys() == ckpt_grad.keys()
        for name in kept_grad:
            torch.testing.assert_close(ckpt_grad[name], kept_grad[name], rtol=1e-5, atol=1e-7)
    else:
        assert ckpt_grad.keys()
