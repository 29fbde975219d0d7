"""One GRPO optimizer step (rollout, grading, training) of this project beside TRL's GRPOTrainer.

    python benchmarks/bench_vs_trl.py --trl-python /path/to/venv-with-trl/bin/python [--rounds 3 --steps 2]
    python benchmarks/bench_vs_trl.py --small      # a tiny random model, 1 round, seconds (TRL too if importable)

Both sides use the same model (SmolLM2-135M-Instruct, float32 master weights), the same r1_zero prompts
of the embedded arithmetic task, 8 prompts × G=8 = 64 completions per optimizer step, at most 48 new
tokens, T=1, one optimizer step per rollout batch (on-policy), no KL term (TRL beta=0), AdamW lr 2e-5,
gradient accumulation 8 (microbatches of 8 completions), clipping 1.0.

Each round runs every configuration in its own subprocess, in turn (ours, then TRL, then the next
round: alternating, so slow drift of the machine hits both); a subprocess loads the model, runs
``--steps`` optimizer steps and reports the wall time of each. The first step of a subprocess is a
warm-up and is dropped. The table gives the median seconds per step over all rounds and, for each
configuration, its ratio to TRL's default configuration.

Configurations:
- ``ours``: this project's laptop settings (bf16 autocast with float32 master weights, a bf16 eager copy
  for generation, the shared prompt prefix computed once, stop after ``</answer>``, min_tokens 4).
- ``ours-fp32``: the same with float32 everywhere (no autocast, float32 generation copy).
- ``ours-nostop``: ``ours`` without the ``</answer>`` stop string (generates until eos or 48 tokens, as TRL).
- ``ours-fp32-noprefix``: ``ours-fp32`` with every sequence run whole (no shared prompt prefix), as TRL.
- ``trl``: TRL GRPOTrainer with its defaults apart from the shared settings above (gradient
  checkpointing on, bf16 as TRL resolves it on this machine, "dapo" loss aggregation, no stop strings).
- ``trl-nogc``: ``trl`` with gradient checkpointing off.

TRL is not a dependency of this project: pass the interpreter of an environment that has it
(``python -m venv --system-site-packages v && v/bin/pip install trl==1.16.0``). Results go to
benchmarks/results/vs_trl.json (``vs_trl_small.json`` with ``--small``, which runs ``ours`` and ``ours-nostop``, and
``trl`` when ``--trl-python`` imports trl, on a tiny random model with 2 prompts × G 4 and 8 new tokens).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP = 8
GROUP = 8
MAX_TOKENS = 48
LR = 2e-5
GAS = 8
CONFIGS = ("ours", "ours-fp32", "ours-nostop", "ours-fp32-noprefix", "trl", "trl-nogc")


@functools.cache
def _train_set():
    from shell.data import DataConfig, load_dataset

    return load_dataset(DataConfig(split="train"))


def _questions(step: int, prompts: int) -> list:
    from shell.seeds import batch_indices

    train = _train_set()
    return [train[i] for i in batch_indices(len(train), prompts, step, seed=0)]


def run_ours(config: str, steps: int, *, model_path: str = "smollm2", prompts: int = PROMPTS_PER_STEP, group: int = GROUP,
             max_tokens: int = MAX_TOKENS) -> list[dict[str, float]]:
    """``steps`` GRPO steps through the project's own phase functions; seconds per phase and in all."""
    import torch

    from core import group_normalized_advantages
    from shell import grpo
    from shell.config import ModelConfig, OptimConfig, SamplerConfig, SamplingConfig, WarmStartConfig
    from shell.prompts import load_prompt
    from shell.rollout import grade, rollout
    from shell.sampling import build_sampler
    from shell.update import Learner, grpo_update

    fp32 = config.startswith("ours-fp32")
    base = grpo.PRESETS["laptop"][1]
    cfg = replace(
        base,
        model=ModelConfig(name_or_path=model_path),
        optim=OptimConfig(lr=LR, weight_decay=0.0, beta1=0.9, beta2=0.95,
                          share_prompt_prefix=config != "ours-fp32-noprefix",
                          autocast_bf16=not fp32),
        sampler=SamplerConfig(generation_dtype="float32" if fp32 else "auto"),
        rollout_batch_size=prompts * group, group_size=group, train_batch_size=prompts * group,
        gradient_accumulation_steps=prompts, sampling=SamplingConfig(min_tokens=4, max_tokens=max_tokens),
        warm_start=WarmStartConfig(steps=0),
    )
    torch.manual_seed(0)
    template = load_prompt("r1_zero")
    model, tokenizer, sampler = build_sampler(cfg.model, cfg.sampler, seed=0, training=True)
    learner = Learner(model, tokenizer, cfg.optim)
    settings = grpo.pg_settings(cfg)
    nostop = config == "ours-nostop"
    if nostop:
        generate = sampler.generate

        def generate_without_stop(prompts, params, **kw):  # as TRL: eos or max tokens
            return generate(prompts, replace(params, stop=()), **kw)

        sampler.generate = generate_without_stop
    out = []
    try:
        for step in range(steps):
            questions = _questions(step, prompts)  # the embedded task is generated once, outside the clock
            t0 = time.perf_counter()
            model.eval()
            rollouts = rollout(sampler, questions, template, cfg.sampling, group_size=group, seed=step, progress=False)
            t1 = time.perf_counter()
            scores, _ = grade(rollouts, template, cfg.grading, progress=False)
            adv, raw, _ = group_normalized_advantages(scores, group_size=group, advantage_eps=cfg.advantage_eps,
                                                      normalize_by_std=cfg.use_std_normalization)
            t2 = time.perf_counter()
            grpo_update(learner, rollouts, raw, adv, settings, seed=step)
            sampler.load_weights(model)
            t3 = time.perf_counter()
            out.append({"step_s": t3 - t0, "generate_s": t1 - t0, "grade_s": t2 - t1, "train_s": t3 - t2,
                        "completion_tokens": sum(rollouts.num_tokens)})
    finally:
        sampler.close()
    return out


def run_trl(config: str, steps: int, *, model_path: str = "smollm2", prompts: int = PROMPTS_PER_STEP, group: int = GROUP,
            max_tokens: int = MAX_TOKENS) -> list[dict[str, float]]:
    """``steps`` optimizer steps of TRL's GRPOTrainer; seconds per step and in generation."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from core import r1_zero_reward_fn
    from shell.models import resolve_model_path
    from shell.prompts import load_prompt

    template = load_prompt("r1_zero")
    rows = [{"prompt": template.format(q.question), "answer": q.answer}
            for s in range(steps) for q in _questions(s, prompts)]

    def reward(prompts, completions, answer, **_):
        return [r1_zero_reward_fn(c, a)["reward"] for c, a in zip(completions, answer)]

    path = str(resolve_model_path(model_path))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=group, gradient_accumulation_steps=prompts, num_generations=group,
        max_completion_length=max_tokens, temperature=1.0, top_p=1.0, beta=0.0, learning_rate=LR,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=steps, logging_steps=1, seed=0, shuffle_dataset=False, dataloader_num_workers=0,
        gradient_checkpointing=config != "trl-nogc",
    )
    times: list[dict[str, float]] = []
    gen_time = [0.0]
    tokens = [0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            gen_time[0] = 0.0
            tokens[0] = 0
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step = time.perf_counter() - self.t0
            times.append({"step_s": step, "generate_s": gen_time[0], "train_s": step - gen_time[0],
                          "completion_tokens": tokens[0]})

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        result = generate(prompts)
        gen_time[0] += time.perf_counter() - t0
        try:
            tokens[0] += sum(len(c) for c in result[1])  # (prompt_ids, completion_ids, ...)
        except Exception:
            pass
        return result

    trainer._generate = timed_generate
    trainer.train()
    for t in times:
        t["bf16"] = bool(args.bf16)
        t["gradient_checkpointing"] = bool(args.gradient_checkpointing)
    return times


def child(config: str, steps: int, sizes: dict) -> None:
    import torch

    rows = (run_ours if config.startswith("ours") else run_trl)(config, steps, **sizes)
    print("RESULT " + json.dumps({"config": config, "threads": torch.get_num_threads(), "steps": rows}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl-python", default=sys.executable, help="interpreter of an environment with trl installed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per subprocess (the first is dropped)")
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if c != "ours-fp32-noprefix"], choices=CONFIGS)
    p.add_argument("--out", default="vs_trl", help="results/<OUT>.json")
    p.add_argument("--small", action="store_true", help="a tiny random model, 1 round, seconds (CI)")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.steps, json.loads(a.sizes) if a.sizes else {})
        return

    import tempfile

    from benchmarks.common import print_table, tiny_model_folder, write_json

    sizes: dict = {}
    if a.small:
        work = tempfile.mkdtemp(prefix="bench-vs-trl-")
        sizes = {"model_path": str(tiny_model_folder(Path(work) / "tiny")), "prompts": 2, "group": 4, "max_tokens": 8}
        has_trl = subprocess.run([a.trl_python, "-c", "import trl"], capture_output=True).returncode == 0
        a.rounds, a.out = 1, a.out + "_small"
        a.configs = ["ours", "ours-nostop", *(["trl"] if has_trl else [])]

    samples: dict[str, list[dict[str, float]]] = {c: [] for c in a.configs}
    meta: dict[str, dict] = {}
    for r in range(a.rounds):
        for config in a.configs:
            python = a.trl_python if config.startswith("trl") else sys.executable
            t0 = time.perf_counter()
            proc = subprocess.run([python, __file__, "--child", config, "--steps", str(a.steps),
                                   *(["--sizes", json.dumps(sizes)] if sizes else [])],
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads(line[len("RESULT "):])
            steps = res["steps"][1:] if len(res["steps"]) > 1 else res["steps"]
            samples[config].extend(steps)
            meta[config] = {k: v for k, v in res["steps"][-1].items() if k in ("bf16", "gradient_checkpointing")}
            print(f"round {r + 1}/{a.rounds} {config}: " + ", ".join(f"{s['step_s']:.1f}s" for s in res["steps"])
                  + f"  (subprocess {time.perf_counter() - t0:.0f}s)", flush=True)

    def med(rows: list[dict[str, float]], key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    ref = med(samples["trl"], "step_s") if "trl" in samples else None
    table = []
    for config, rows in samples.items():
        step = med(rows, "step_s")
        table.append({
            "config": config, "steps": len(rows), "step_s": step, "generate_s": med(rows, "generate_s"),
            "train_s": med(rows, "train_s"), "grade_s": med(rows, "grade_s") or "",
            "tokens": med(rows, "completion_tokens"),
            "speedup_vs_trl": (ref / step) if ref and step else "",
            **meta.get(config, {}),
        })
    print_table(table, ["config", "steps", "step_s", "generate_s", "grade_s", "train_s", "tokens", "speedup_vs_trl"])
    write_json(a.out, {"settings": {"prompts": PROMPTS_PER_STEP, "group": GROUP, "max_tokens": MAX_TOKENS, **sizes,
                                       "lr": LR, "gradient_accumulation_steps": sizes.get("prompts", GAS), "rounds": a.rounds,
                                       "steps_per_subprocess": a.steps},
                          "rows": table, "samples": samples})


if __name__ == "__main__":
    main()
