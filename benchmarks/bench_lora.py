"""Full fine-tuning vs LoRA on the laptop, and how the HF sampler should follow a LoRA policy.

    python benchmarks/bench_lora.py sampler                       # merged generation copy vs running the adapter
    python benchmarks/bench_lora.py loops [--sft-steps 16 --grpo-steps 10 --extra='--eval-data.limit 64']   # the four runs below
    python benchmarks/bench_lora.py --small sampler     # a tiny random model, 2 prompts × 2 of 4 tokens (seconds)
    python benchmarks/bench_lora.py --small loops       # the four runs on a tiny random model, 1 step each

``sampler``: SmolLM2-135M-Instruct with a rank-16 adapter on the attention and MLP projections (B drawn at
random, so the adapter changes the outputs). (a) ``merged``: the sampler's plain bf16 generation copy, refreshed
at each sync from the merged weights (what the loops do); (b) ``adapter``: a bf16 generation copy that keeps the
adapter layers and samples through them (a sync then copies only the adapter). Each samples the same rollouts
(``--prompts`` prompts × 8, exactly ``--tokens`` tokens each); sync and sampling times are medians.

``loops``: ``shell.sft`` and ``shell.grpo``, presets ``laptop`` (full) and ``laptop-lora``, each for the same
number of steps in its own process: the median time of a training step (between consecutive train records with
no evaluation between them), the process's peak RSS (``wait4``), the size of the last checkpoint and of
``final/``, and the held-out answer reward at each evaluation. Runs go to ``runs/bench_lora_*``.
Results: ``benchmarks/results/lora_{sampler,loops}.json`` (``lora_{sampler,loops}_small.json`` with ``--small``,
whose loop runs go to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import print_table, tiny_model_folder, write_json  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ sampler


def bench_sampler(args: argparse.Namespace) -> None:
    from shell.data import load_dataset
    from shell.data import DataConfig
    from shell.lora import LoraConfig, apply_lora
    from shell.models import load_policy
    from shell.prompts import load_prompt
    from shell.sampling import HFSampler, SamplingParams

    model, tokenizer = load_policy(args.model, device="cpu")
    merged = HFSampler(model, tokenizer, batch_size=64, generation_dtype="auto")  # plain bf16 copy (before LoRA)
    model = apply_lora(model, LoraConfig(rank=args.rank, alpha=32.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    adapter = HFSampler(model, tokenizer, batch_size=64, generation_dtype="auto")  # bf16 copy that keeps the adapter
    assert any("lora_A" in n for n, _ in adapter.model.named_parameters())
    template = load_prompt("r1_zero")
    prompts = [template.format(ex.question) for ex in load_dataset(DataConfig(split="validation", limit=args.prompts))]
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.tokens, min_tokens=args.tokens, seed=0)

    def sync_adapter() -> None:
        source = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in adapter.model.named_parameters():
                if "lora_" in name:
                    p.copy_(source[name])

    rows = []
    for name, sampler, sync in (("merged", merged, lambda: merged.load_weights(model)), ("adapter", adapter, sync_adapter)):
        sync_s, gen_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sync()
            sync_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = sampler.generate(prompts, params)
            gen_s.append(time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for group in out for c in group)
        rows.append({"sampler": name, "sync_s": statistics.median(sync_s), "generate_s": statistics.median(gen_s),
                     "tokens": tokens, "tokens_per_s": tokens / statistics.median(gen_s)})
    print_table(rows, ["sampler", "sync_s", "generate_s", "tokens", "tokens_per_s"])
    write_json("lora_sampler" + args.suffix, {"rank": args.rank, "prompts": len(prompts), "n": args.n, "tokens": args.tokens,
                                             "repeats": args.repeats, "rows": rows})


# ------------------------------------------------------------------------------------------------ loops


def step_seconds(metrics: list[dict]) -> float | None:
    """Median wall seconds between consecutive training-step records with no evaluation between them."""
    gaps, last = [], None
    for r in metrics:
        if "eval_step" in r:
            last = None
        elif "train/loss" in r and "time/elapsed_s" in r:
            if last is not None and r["train_step"] == last[0] + 1:
                gaps.append(r["time/elapsed_s"] - last[1])
            last = (r["train_step"], r["time/elapsed_s"])
    return statistics.median(gaps) if gaps else None


def run_loop(module: str, preset: str, steps_flag: str, steps: int, name: str, *, runs: Path = REPO / "runs",
             extra: tuple[str, ...] = ()) -> dict:
    from shell.runlog import read_metrics

    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", module, preset, steps_flag, str(steps), "--run.logger", "none", "--run.name", name,
           "--run.runs-dir", str(runs), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)})")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    evals = {r["eval_step"]: r["eval/answer_reward"] for r in metrics if "eval/answer_reward" in r}
    counts = next((r for r in metrics if "train/trainable_params" in r), {})
    return {"run": f"{module.split('.')[-1]} {preset}", "steps": steps, "wall_s": wall,
            "step_s": step_seconds(metrics), "peak_rss_gb": usage.ru_maxrss / 2**20,
            "checkpoint_mb": folder_bytes(ckpt) / 2**20, "final_mb": folder_bytes(run_dir / "final") / 2**20,
            "trainable_params": counts.get("train/trainable_params"), "answer_reward": evals,
            "final_answer_reward": evals.get(steps)}


# the small mode's flags: the tiny model on the CPU, small batches, at most 6 tokens, an evaluation at the end
SMALL_COMMON = ("--model.device", "cpu", "--grading.workers", "0", "--sampler.generation-dtype", "None",
                "--data.limit", "8", "--eval-data.limit", "4", "--eval.max-tokens", "6", "--eval-every", "1")
SMALL_LOOP = {
    "shell.sft": ("--batch-size", "4", "--gradient-accumulation-steps", "2"),
    "shell.grpo": ("--rollout-batch-size", "4", "--group-size", "2", "--train-batch-size", "4",
                   "--gradient-accumulation-steps", "2", "--sampling.max-tokens", "6", "--warm-start.steps", "0"),
}


def bench_loops(args: argparse.Namespace) -> None:
    rows = []
    for module, steps_flag, steps in (("shell.sft", "--num-steps", args.sft_steps), ("shell.grpo", "--n-grpo-steps", args.grpo_steps)):
        for preset in ("laptop", "laptop-lora"):
            name = f"bench_lora_{module.split('.')[-1]}_{preset.replace('-', '_')}"
            small = ("--model.name-or-path", args.model, *SMALL_COMMON, *SMALL_LOOP[module]) if args.suffix else ()
            rows.append(run_loop(module, preset, steps_flag, steps, name, runs=args.runs, extra=small))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows, ["run", "steps", "wall_s", "step_s", "peak_rss_gb", "checkpoint_mb", "final_mb", "trainable_params",
                       "final_answer_reward"])
    write_json("lora_loops" + args.suffix, {"rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny random model, seconds (CI)")
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("sampler")
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--tokens", type=int, default=48)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--prompts", type=int, default=8)
    s.add_argument("--n", type=int, default=8)
    loops = sub.add_parser("loops")
    loops.add_argument("--sft-steps", type=int, default=16)
    loops.add_argument("--grpo-steps", type=int, default=10)
    loops.add_argument("--extra", default="", help="flags for every run, e.g. --extra='--eval-data.limit 64'")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.model, args.runs, args.suffix = "smollm2", REPO / "runs", ""
    if not args.small:
        (bench_sampler if args.part == "sampler" else bench_loops)(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        args.model, args.runs, args.suffix = str(tiny_model_folder(Path(tmp) / "tiny")), Path(tmp) / "runs", "_small"
        if args.part == "sampler":
            args.rank, args.prompts, args.n, args.tokens, args.repeats = 4, 2, 2, 4, 1
            bench_sampler(args)
        else:
            args.sft_steps = args.grpo_steps = 1
            bench_loops(args)


if __name__ == "__main__":
    main()
