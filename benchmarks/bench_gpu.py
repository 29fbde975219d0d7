"""The GPU path end to end on random weights of Qwen2.5-Math-1.5B's exact shape (built from its config: no download).

    python benchmarks/bench_gpu.py                 # a GPU: the h100 shapes, then 2 GRPO steps of the h100 preset
    python benchmarks/bench_gpu.py --tiny          # a CPU: the same code paths at toy size (< 2 minutes)
    python benchmarks/bench_gpu.py --tiny --no-compile   # the same without torch.compile (CI, seconds)
    python benchmarks/bench_gpu.py --async-only    # only part 3: sync vs --async-staleness 1

Part 1, the train phase of the project's GRPO microbatch step (:class:`shell.update.Learner`'s ``grpo_step``,
the h100 preset's objective and optimizer settings: forward, chunked log-probs, loss, backward), eager vs
``torch.compile``'d, with bf16 weights vs float32 master weights + bf16 autocast, at the h100 microbatch shapes
(2 × 1024 and 8 × 1024 tokens). One AdamW step runs first, so its state is allocated as in training; then the
median of ``--repeats`` microbatch steps gives tokens/s, and one more optimizer step is timed apart. MFU counts
6 × N FLOPs per token, N = every parameter that is a matmul weight (the tied embedding counted once, as the LM
head; 1.54 B for this shape), against 989 TFLOP/s (an H100 SXM's dense bf16 peak); attention's own FLOPs
(~6 × layers × seq × hidden per token, +~6% at 1,024 tokens) are not counted. Peak memory is
``torch.cuda.max_memory_allocated`` over the microbatch steps, AdamW state included.

Part 1b, fixed vs token-budget microbatches (``--optim.max-tokens-per-microbatch``) on one optimizer step's rows at
a MATH-like length distribution: ``--rows`` (prompt, response) lengths of r1_zero MATH train traces
(``../shared/data/math/train.jsonl``, shuffled with seed 0; characters over 3.66 for the prompt and 2.31 for the
solution, SmolLM2's tokens per character on these traces, the response capped at 1,024), in rollout order (as
a GRPO train batch's fixed split keeps it) and on random token ids. ``fixed-2`` is the h100 preset's 2 rows per
microbatch; ``budget-N`` packs the rows into microbatches of at most N padded tokens. The train phase of all the
step's microbatches (forward, loss, backward; eager; float32 masters + bf16 autocast; after one AdamW step) is
timed: tokens/s counts real tokens (no padding), peak memory is over the step. ``--tiny`` divides the lengths
by 16 (and uses the embedded task's lengths where MATH is missing).

Part 2, 2 GRPO steps of the h100 preset (``shell.grpo``, its flags but the rollout batch and lengths of
``--rollouts``/``--max-tokens``) on the same random model saved to a temporary folder with a byte-level
tokenizer padded to the model's vocabulary (prompts are therefore ~4× longer in tokens than Qwen's): vLLM
when installed (``h100x2``, vLLM on its own GPU, when two GPUs are visible), else the HF sampler. MATH train
when ``../shared/data/math`` exists (and not ``--tiny``), else the embedded arithmetic task; 64 held-out
problems (4 with ``--tiny``), evaluated before the first step and after the last. A random model never writes
``</answer>``, so every response runs to ``--max-tokens``.

Part 3, the synchronous loop vs ``--async-staleness 1`` (``--async-steps`` GRPO steps each, the part 2 set-up):
on one device with the HF sampler beside the policy (on a GPU both share it: the producer's generation copy
samples while the policy trains) and, with two GPUs and vLLM, ``h100x2`` (vLLM on a GPU of its own: the two
overlap). Per run: the median step time over steps 2 … n (between consecutive steps' log records), the largest
``train/staleness``, and the async runs' mean ``time/wait_for_rollouts``, ``time/wait_for_weights`` and
``time/weight_sync`` over those steps (the synchronous loop logs no waits: its trainer waits for the whole
sampling, its sampler for the whole training). ``--async-only`` runs part 3 alone.

Writes ``benchmarks/results/gpu.json`` (``gpu_tiny.json`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.common import free_memory, print_table, timeit, write_json  # noqa: E402

# Qwen2.5-Math-1.5B's published config.json (huggingface.co/Qwen/Qwen2.5-Math-1.5B; the same values in the
# verbatim mirror huggingface.co/mlx-community/Qwen2.5-Math-1.5B-bf16, config.json at c4eab3af): Qwen2ForCausalLM.
QWEN25_MATH_15B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
)
TINY: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)
PEAK_FLOPS = 989e12
"""An H100 SXM's dense bf16 tensor-core peak (FLOP/s)."""


def build_model(shape: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random ``Qwen2ForCausalLM`` of ``shape``, built on ``device`` in ``dtype`` (seed 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that are matmul weights: all but the norms (a tied embedding is counted once, as the LM head)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)


def train_phase(shape: dict[str, Any], *, weights: str, compile: bool, sizes: list[tuple[int, int]], device: str,
                repeats: int) -> list[dict[str, Any]]:
    """Rows of tokens/s, MFU and peak memory of the GRPO microbatch step for each (batch, seq) of ``sizes``."""
    from core import ObjectiveSettings
    from shell.grpo import PRESETS
    from shell.steps import PolicyGradientTensors
    from shell.update import Learner

    optim = dataclasses.replace(PRESETS["h100"][1].optim, compile=compile)
    model = build_model(shape, torch.float32 if weights == "float32 masters" else torch.bfloat16, device)
    learner = Learner(model, None, optim)
    n_params = matmul_params(model)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b, s in sizes:
        ids = torch.randint(0, shape["vocab_size"], (b, s), generator=g).to(device)
        labels = torch.randint(0, shape["vocab_size"], (b, s), generator=g).to(device)
        mask = torch.zeros(b, s, dtype=torch.bool, device=device)
        mask[:, s // 4 :] = True  # a prompt quarter, as r1_zero prompts with ~1k-token responses
        kwargs = dict(settings=ObjectiveSettings(loss_type="reinforce_with_baseline"),
                      tensors=PolicyGradientTensors(advantages=torch.randn(b, 1, generator=g).to(device)))

        def step() -> None:
            with learner.autocast():
                learner.grpo_step(ids, labels, mask, **kwargs)

        t0 = time.perf_counter()
        step()  # compiles the compiled step
        first_s = time.perf_counter() - t0
        learner.optimizer.step()  # AdamW state exists from here on
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        median_s = timeit(step, warmup=1, repeats=repeats)["median_s"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        optimizer_s = timeit(learner.optimizer.step, warmup=0, repeats=1)["median_s"]
        tokens_s = b * s / median_s
        rows.append({"weights": weights, "compiled": compile, "microbatch": f"{b}x{s}", "step_s": median_s,
                     "tokens_per_s": tokens_s, "mfu": 6 * n_params * tokens_s / PEAK_FLOPS if device == "cuda" else None,
                     "peak_gib": peak, "first_call_s": first_s, "adamw_step_s": optimizer_s,
                     "checkpointed": optim.checkpoint_above_tokens is not None and b * s > optim.checkpoint_above_tokens,
                     "matmul_params": n_params})
        print_table(rows[-1:], list(rows[-1]))
    del learner, model
    free_memory(device)
    return rows


def math_like_lengths(rows: int, *, scale: int = 1, max_response: int = 1024) -> list[tuple[int, int]]:
    """``rows`` (prompt, response) token lengths of r1_zero MATH train traces (see the module docstring), each
    divided by ``scale``; random ones from a fixed seed when MATH train is missing (the tiny mode on a bare CPU)."""
    import random

    path = (ROOT / ".." / "shared" / "data" / "math" / "train.jsonl").resolve()
    if not path.is_file():
        rng = random.Random(0)
        return [(max(2, rng.randint(100, 300) // scale), max(2, rng.randint(50, max_response) // scale)) for _ in range(rows)]
    from shell.data import DataConfig
    from shell.data.traces import sft_examples_for

    traces = sft_examples_for(DataConfig(path=str(path), limit=rows, shuffle=True, seed=0), "r1_zero")
    return [(max(2, round(len(t.prompt) / 3.66) // scale), max(2, min(max_response, round(len(t.response) / 2.31)) // scale))
            for t in traces]


def microbatch_phase(shape: dict[str, Any], *, lengths: list[tuple[int, int]], configs: list[str], device: str,
                     repeats: int) -> list[dict[str, Any]]:
    """Rows of tokens/s and peak memory of one step's train phase, fixed vs token-budget microbatches."""
    from core import ObjectiveSettings
    from shell.grpo import PRESETS
    from shell.packing import pack_by_tokens, padded_tokens
    from shell.steps import PolicyGradientTensors
    from shell.update import Learner

    optim = dataclasses.replace(PRESETS["h100"][1].optim, compile=False)
    model = build_model(shape, torch.float32, device)
    learner = Learner(model, None, optim)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, shape["vocab_size"], (p + r,), generator=g) for p, r in lengths]
    widths = [p + r - 1 for p, r in lengths]
    n = len(lengths)
    advantages = torch.randn(n, 1, generator=g)

    def tensors(mb: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = max(widths[i] for i in mb)
        ids = torch.zeros(len(mb), w + 1, dtype=torch.long)
        mask = torch.zeros(len(mb), w, dtype=torch.bool)
        for j, i in enumerate(mb):
            ids[j, : len(seqs[i])] = seqs[i]
            mask[j, lengths[i][0] - 1 : widths[i]] = True
        return ids[:, :-1].to(device), ids[:, 1:].to(device), mask.to(device)

    rows = []
    for config in configs:
        kind, value = config.split("-")
        if kind == "fixed":
            micro = [list(range(m, min(n, m + int(value)))) for m in range(0, n, int(value))]
        else:
            micro = pack_by_tokens(widths, int(value))
        batches = [(tensors(mb), mb) for mb in micro]

        settings = ObjectiveSettings(loss_type="reinforce_with_baseline",
                                     gradient_accumulation_steps=len(micro) if kind == "fixed" else 1)

        def step() -> None:
            for (ids, labels, mask), mb in batches:
                tensors = PolicyGradientTensors(advantages=advantages[mb].to(device),
                                                accumulation_divisor=None if kind == "fixed" else n / len(mb))
                with learner.autocast():
                    learner.grpo_step(ids, labels, mask, settings=settings, tensors=tensors)

        step()
        learner.optimizer.step()  # AdamW state exists from here on
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        median_s = timeit(step, warmup=0, repeats=repeats)["median_s"]
        learner.optimizer.optimizer.zero_grad(set_to_none=True)
        real = sum(p + r - 1 for p, r in lengths)
        padded = sum(padded_tokens(widths, mb) for mb in micro)
        rows.append({"microbatches": config, "rows": n, "count": len(micro), "largest": max(padded_tokens(widths, mb) for mb in micro),
                     "pad_fraction": 1 - real / padded, "step_s": median_s, "tokens_per_s": real / median_s,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None})
        print_table(rows[-1:], list(rows[-1]))
    del learner, model
    free_memory(device)
    return rows


def grpo_smoke(shape: dict[str, Any], *, device: str, rollouts: int, max_tokens: int, sampler: str, tiny: bool,
               work: Path, steps: int = 2, extra: tuple[str, ...] = (), name: str = "grpo",
               preset: str | None = None) -> dict[str, Any]:
    """``steps`` GRPO steps of the h100 preset (h100x2 for vLLM on two GPUs; ``preset`` when given) on the random
    model, with the flags ``extra``; wall time and metrics."""
    from doubles import tiny_tokenizer
    from shell import grpo
    from shell.models import save_policy
    from shell.runlog import read_metrics

    backend = sampler if sampler != "auto" else (
        "vllm" if device == "cuda" and importlib.util.find_spec("vllm") is not None else "hf")
    if preset is None:
        preset = "h100x2" if backend == "vllm" and device == "cuda" and torch.cuda.device_count() >= 2 else "h100"
    tokenizer = tiny_tokenizer(vocab_size=shape["vocab_size"])
    model = build_model({**shape, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
                        torch.bfloat16, "cpu")
    folder = work / "model"
    if not (folder / "config.json").is_file():
        save_policy(model, tokenizer, folder)
    del model
    math = (ROOT / ".." / "shared" / "data" / "math" / "train.jsonl").resolve()
    data = [] if math.is_file() and not tiny else ["--data.path", "None", "--eval-data.path", "None"]
    args = [preset, "--model.name-or-path", str(folder), "--model.device", device, *data,
            "--n-grpo-steps", str(steps), "--rollout-batch-size", str(rollouts), "--group-size", "8",
            "--train-batch-size", str(rollouts), "--gradient-accumulation-steps", str(rollouts // 2),
            "--sampling.max-tokens", str(max_tokens), "--eval.max-tokens", str(max_tokens),
            "--eval-data.limit", "4" if tiny else "64",
            # the smoke is the 2 steps: no final evaluation (the preset's is the whole validation set at 1,024
            # tokens, more than the random model's context holds, which is checked even when it is off)
            "--eval-every", "100", "--final-eval.no-enabled", "--final-eval.sampling.max-tokens", str(max_tokens),
            "--sampler.backend", backend, "--run.logger", "none",
            "--run.runs-dir", str(work / "runs"), "--run.name", name, "--grading.workers", "0", *extra]
    if tiny:
        args += ["--optim.no-compile"]  # on a CPU compiling costs minutes; part 1 runs the compiled step
    t0 = time.perf_counter()
    grpo.main(args)
    wall = time.perf_counter() - t0
    rows = read_metrics(work / "runs" / name)
    train = list({r["train_step"]: r for r in rows if "train/loss" in r}.values())  # a step's last optimizer step
    return {"preset": preset, "sampler": backend, "data": "MATH train" if not data else "embedded arithmetic",
            "rollouts": rollouts, "max_tokens": max_tokens, "wall_s": wall, "steps": len(train),
            "response_length": [r["train/response_length"] for r in train],
            "rollout_entropy": [r["train/rollout_entropy"] for r in train],
            "elapsed_s": [r["time/elapsed_s"] for r in train],
            **{key: [r.get(key) for r in train] for key in ASYNC_KEYS}}


ASYNC_KEYS = ("train/staleness", "time/wait_for_rollouts", "time/wait_for_weights", "time/weight_sync")


def async_phase(shape: dict[str, Any], *, device: str, rollouts: int, max_tokens: int, steps: int, tiny: bool,
                work: Path) -> list[dict[str, Any]]:
    """Part 3: the synchronous loop vs ``--async-staleness 1``, ``steps`` GRPO steps each: on one device with the
    HF sampler beside the policy and, with two GPUs and vLLM, with vLLM on a GPU of its own (h100x2). Per run:
    the median step time over steps 2 … n (the time between consecutive steps' log records; step 1 has nothing to
    overlap with) and the async runs' mean waits over the same steps."""
    import statistics

    setups = [("one device, HF sampler", "hf", "h100")]
    if device == "cuda" and torch.cuda.device_count() >= 2 and importlib.util.find_spec("vllm") is not None:
        setups.append(("two GPUs, dedicated vLLM", "vllm", "h100x2"))
    out = []
    for label, backend, preset in setups:
        for k in (0, 1):
            run = grpo_smoke(shape, device=device, rollouts=rollouts, max_tokens=max_tokens, sampler=backend, tiny=tiny,
                             work=work, steps=steps, extra=("--async-staleness", str(k)), preset=preset,
                             name=f"async_{backend}_{k}")
            elapsed = run["elapsed_s"]
            periods = [b - a for a, b in zip(elapsed, elapsed[1:])]
            row = {"setup": label, "async_staleness": k, "steps": run["steps"],
                   "step_s": statistics.median(periods) if periods else None,
                   "max_staleness": max(run["train/staleness"]), "wall_s": run["wall_s"]}
            for key in ASYNC_KEYS[1:]:
                values = [v for v in run[key][1:] if v is not None]
                row[key.split("/")[1] + "_s"] = statistics.fmean(values) if values else None
            out.append(row)
            print_table(out[-1:], list(out[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy widths and a handful of tokens (a CPU, < 2 minutes)")
    p.add_argument("--sizes", nargs="+", default=None, help="BATCHxSEQ microbatches (default 2x1024 8x1024; tiny 2x32)")
    p.add_argument("--repeats", type=int, default=None, help="timed microbatch steps per row (default 5; tiny 2)")
    p.add_argument("--rollouts", type=int, default=None, help="GRPO rollouts per step (default 64; tiny 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="GRPO response tokens (default 192; tiny 8)")
    p.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM on a GPU when installed")
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--async-only", action="store_true", help="only part 3 (sync vs --async-staleness 1)")
    p.add_argument("--async-steps", type=int, default=4, help="part 3: GRPO steps per run (default 4)")
    p.add_argument("--no-compile", action="store_true", help="part 1 eager only (compiling takes minutes on a CPU)")
    p.add_argument("--rows", type=int, default=None, help="part 1b: rows of the step (default 64; tiny 16)")
    p.add_argument("--microbatches", nargs="+", default=None,
                   help="part 1b: fixed-R (R rows each) / budget-N (default fixed-2 budget-2048 budget-4096 budget-8192; "
                        "tiny fixed-2 budget-128 budget-256)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    if device == "cpu" and not a.tiny:
        p.error("no GPU: run with --tiny")
    shape = TINY if a.tiny else QWEN25_MATH_15B
    sizes = [tuple(int(x) for x in s.split("x")) for s in (a.sizes or (["2x32"] if a.tiny else ["2x1024", "8x1024"]))]
    repeats = a.repeats or (2 if a.tiny else 5)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    micro_rows: list[dict[str, Any]] = []
    if not a.async_only:
        for weights in ("bf16", "float32 masters"):
            for compile in (False,) if a.no_compile else (False, True):
                rows += train_phase(shape, weights=weights, compile=compile, sizes=sizes, device=device, repeats=repeats)
        print()
        print_table(rows, ["weights", "compiled", "microbatch", "tokens_per_s", "mfu", "peak_gib", "step_s",
                           "first_call_s", "adamw_step_s", "checkpointed"])
        lengths = math_like_lengths(a.rows or (16 if a.tiny else 64), scale=16 if a.tiny else 1)
        micro_rows = microbatch_phase(shape, lengths=lengths, device=device, repeats=repeats, configs=a.microbatches or (
            ["fixed-2", "budget-128", "budget-256"] if a.tiny else ["fixed-2", "budget-2048", "budget-4096", "budget-8192"]))
        print()
        print_table(micro_rows, list(micro_rows[0]))
    smoke, async_rows = None, []
    rollouts, max_tokens = a.rollouts or (8 if a.tiny else 64), a.max_tokens or (8 if a.tiny else 192)
    if not a.skip_grpo:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
            if not a.async_only:
                smoke = grpo_smoke(shape, device=device, rollouts=rollouts, max_tokens=max_tokens, sampler=a.sampler,
                                   tiny=a.tiny, work=Path(work))
                print(f"\nGRPO, {smoke['steps']} steps of the {smoke['preset']} preset ({smoke['sampler']} sampler, "
                      f"{smoke['data']}, {smoke['rollouts']} rollouts of {smoke['max_tokens']} tokens): "
                      f"{smoke['wall_s']:.1f} s")
            async_rows = async_phase(shape, device=device, rollouts=rollouts, max_tokens=max_tokens,
                                     steps=a.async_steps, tiny=a.tiny, work=Path(work))
        print()
        print_table(async_rows, list(async_rows[0]))
    total = time.perf_counter() - t0
    print(f"total {total:.1f} s")
    write_json("gpu_tiny" if a.tiny else "gpu", {"shape": shape, "device": device, "sizes": [f"{b}x{s}" for b, s in sizes],
                                                  "rows": rows, "microbatches": micro_rows, "grpo": smoke,
                                                  "async": async_rows, "total_s": total})


if __name__ == "__main__":
    main()
