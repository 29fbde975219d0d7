"""SFT on MATH traces: fixed microbatches (--gradient-accumulation-steps) vs token-budget microbatches
(--optim.max-tokens-per-microbatch), tokens/s and peak memory, on SmolLM2-135M-Instruct.

    python benchmarks/bench_microbatches.py [--batch 16 --steps 3 --configs fixed-4 fixed-16 budget-2048 budget-4096]
    python benchmarks/bench_microbatches.py --small      # a tiny random model on the embedded task, seconds

Every configuration runs in its own subprocess (so that the process's peak RSS is its own) and takes the same
``--steps`` optimizer steps of ``--batch`` r1_zero traces of MATH train (``../shared/data/math/train.jsonl``,
shuffled with seed 0; the batches of ``shell.seeds.batch_indices``) through ``shell.update.sft_update``, the
function the SFT, expert-iteration and warm-start loops call. ``fixed-K``: K equal microbatches of the batch
sorted by length (today's split); ``budget-N``: rows packed into microbatches of at most N padded tokens.
Settings otherwise ``OptimConfig``'s defaults: bf16 autocast over float32 weights, activation checkpointing of a
microbatch above 4,096 padded tokens, no shared prompt prefix (MATH prompts share only the template).

Reported per configuration (the first step is a warm-up and is dropped; medians over the rest): seconds per
step, tokens/s (real tokens: every row's prompt and response, without padding), padded tokens/s (what the
model actually ran), the microbatches per step, the largest microbatch in padded tokens, and the peak RSS of
the process above its RSS once the model and optimizer were built (``peak_extra_gib``: activations,
gradients, AdamW state). Results go to benchmarks/results/microbatches.json (``microbatches_small.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MATH_TRAIN = ROOT / ".." / "shared" / "data" / "math" / "train.jsonl"


def _rss_bytes() -> int:
    """The process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: str, *, model: str, data: str | None, batch: int, steps: int, limit: int) -> dict:
    """``steps`` SFT optimizer steps of ``config`` in this process; per-step times and the peak memory."""
    from dataclasses import replace

    import torch

    from shell.config import OptimConfig
    from shell.data import DataConfig
    from shell.data.traces import sft_examples_for
    from shell.models import load_policy
    from shell.packing import pack_by_tokens, padded_tokens
    from shell.seeds import batch_indices
    from shell.update import Learner, padded_lengths, sft_update

    kind, value = config.split("-")
    examples = sft_examples_for(DataConfig(path=data, limit=limit, shuffle=True, seed=0), "r1_zero")
    torch.manual_seed(0)
    policy, tokenizer = load_policy(model, device="cpu", training=True)
    optim = OptimConfig(lr=2e-5)
    if kind == "budget":
        optim = replace(optim, max_tokens_per_microbatch=int(value))
    learner = Learner(policy, tokenizer, optim)
    k = int(value) if kind == "fixed" else 1
    rss_built = _rss_bytes()
    rows = []
    for step in range(steps):
        part = [examples[i] for i in batch_indices(len(examples), batch, step, seed=0)]
        lengths = padded_lengths(tokenizer, [e.prompt for e in part], [e.response for e in part])
        if kind == "fixed":  # sft_update's split: sorted by characters, k equal parts
            order = sorted(range(batch), key=lambda i: len(part[i].prompt) + len(part[i].response))
            micro = [order[j * (batch // k) : (j + 1) * (batch // k)] for j in range(k)]
        else:
            micro = pack_by_tokens(lengths, int(value))
        t0 = time.perf_counter()
        m = sft_update(learner, part, gradient_accumulation_steps=k)
        seconds = time.perf_counter() - t0
        rows.append({"step_s": seconds, "tokens": sum(lengths), "padded_tokens": sum(padded_tokens(lengths, mb) for mb in micro),
                     "microbatches": len(micro), "largest_microbatch": max(padded_tokens(lengths, mb) for mb in micro),
                     "loss": m["train/loss"]})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": config, "threads": torch.get_num_threads(), "steps": rows, "rss_built_gib": rss_built / 2**30,
            "peak_rss_gib": peak / 2**30, "peak_extra_gib": (peak - rss_built) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="traces per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first is dropped)")
    p.add_argument("--configs", nargs="+", default=["fixed-4", "fixed-16", "budget-2048", "budget-4096"],
                   help="fixed-K (K equal microbatches) or budget-N (at most N padded tokens each)")
    p.add_argument("--limit", type=int, default=2000, help="MATH problems loaded (shuffled, seed 0)")
    p.add_argument("--small", action="store_true", help="a tiny random model on the embedded task (CI, seconds)")
    p.add_argument("--out", default="microbatches")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.small and not a.child:
        a.batch, a.steps, a.configs, a.limit = 4, 2, ["fixed-2", "budget-600"], 64
    for c in [a.child] if a.child else a.configs:
        kind, _, value = c.partition("-")
        if kind not in ("fixed", "budget") or not value.isdigit() or int(value) < 1:
            p.error(f"--configs: {c!r} is neither fixed-K nor budget-N")
        if kind == "fixed" and a.batch % int(value):
            p.error(f"--configs: {c}: --batch {a.batch} does not split into {value} equal microbatches")
    if a.child:
        res = measure(a.child, model=a.model, data=a.data, batch=a.batch, steps=a.steps, limit=a.limit)
        print("RESULT " + json.dumps(res), flush=True)
        return

    from benchmarks.common import print_table, tiny_model_folder, write_json

    with tempfile.TemporaryDirectory(prefix="bench-microbatches-") as work:
        if a.small:
            model, data, out = str(tiny_model_folder(Path(work) / "tiny")), None, a.out + "_small"
        else:
            if not MATH_TRAIN.is_file():
                sys.exit(f"{MATH_TRAIN} not found (MATH train); --small runs on the embedded task")
            model, data, out = a.model, str(MATH_TRAIN.resolve()), a.out
        results = []
        for config in a.configs:
            cmd = [sys.executable, __file__, "--child", config, "--model", model, "--batch", str(a.batch),
                   "--steps", str(a.steps), "--limit", str(a.limit), *(["--data", data] if data else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{config} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(f"{config}: " + ", ".join(f"{s['step_s']:.1f}s" for s in results[-1]["steps"]), flush=True)
    table = []
    for res in results:
        kept = res["steps"][1:] or res["steps"]
        step_s = statistics.median(s["step_s"] for s in kept)
        tokens = statistics.median(s["tokens"] for s in kept)
        padded = statistics.median(s["padded_tokens"] for s in kept)
        table.append({"config": res["config"], "step_s": step_s, "tokens_per_s": tokens / step_s,
                      "padded_tokens_per_s": padded / step_s, "pad_fraction": 1 - tokens / padded,
                      "microbatches": statistics.median(s["microbatches"] for s in kept),
                      "largest_microbatch": max(s["largest_microbatch"] for s in kept),
                      "peak_extra_gib": res["peak_extra_gib"], "peak_rss_gib": res["peak_rss_gib"]})
    print_table(table, list(table[0]))
    write_json(out, {"settings": {"batch": a.batch, "steps": a.steps, "limit": a.limit, "small": a.small,
                                  "data": "embedded arithmetic" if a.small else "MATH train"},
                     "rows": table, "runs": results})


if __name__ == "__main__":
    main()
