"""Full fine-tuning vs LoRA on the laptop, and how the HF sampler should follow a LoRA policy.

    python benchmarks/bench_lora.py sampler                       # merged generation copy vs running the adapter
    python benchmarks/bench_lora.py step [--sizes 4x420 8x160]     # one training step, full vs LoRA, same tensors
    python benchmarks/bench_lora.py loops [--sft-steps 16 --grpo-steps 10 --extra='--eval-data.limit 64']   # the four runs below
    python benchmarks/bench_lora.py --small sampler     # a tiny random model, 2 prompts × 2 of 4 tokens (seconds)
    python benchmarks/bench_lora.py --small loops       # the four runs on a tiny random model, 1 step each
    python benchmarks/bench_lora.py --small step        # a tiny random model, one 2x8 size (seconds)
    python benchmarks/bench_lora.py delta RUN/final [--base smollm2 --out lora_delta]   # what a LoRA run's final/ changed
    python benchmarks/bench_lora.py --small delta       # a tiny random model merged with a random adapter (seconds)

``sampler``: SmolLM2-135M-Instruct with a rank-16 adapter on the attention and MLP projections (B drawn at
random, so the adapter changes the outputs). (a) ``merged``: the sampler's plain bf16 generation copy, refreshed
at each sync from the merged weights (what the loops do); (b) ``adapter``: a bf16 generation copy that keeps the
adapter layers and samples through them (a sync then copies only the adapter). Each samples the same rollouts
(``--prompts`` prompts × 8, exactly ``--tokens`` tokens each); sync and sampling times are medians.

``step``: one optimizer step of SFT on SmolLM2 at each ``--sizes`` (rows × tokens, one microbatch, random
tokens, a quarter prompt), first with every weight training, then with the laptop presets' rank-16 adapter on the
same model: the microbatch forward + backward (the loops' ``make_train_step``, eager, bf16 autocast over float32
weights as the laptop presets) and the clip + AdamW step apart, medians of ``--repeats``. It isolates what LoRA
changes in the training phase from what a loop's other phases (sampling, evaluation) add.

``loops``: ``shell.sft`` and ``shell.grpo``, presets ``laptop`` (full) and ``laptop-lora``, each for the same
number of steps in its own process: the median time of a training step (between consecutive train records with
no evaluation between them), the process's peak RSS (``wait4``), the size of the last checkpoint and of
``final/``, and the held-out answer reward at each evaluation. Runs go to ``runs/bench_lora_*``.
``delta``: a LoRA run's merged ``final/`` against the base it trained from (the adapter's
``adapter_config.json`` names the rank and the targets): for each tensor, in float64, whether it is targeted, the
largest absolute change, and for a targeted one the singular values of merged - base and its rank: the number of
singular values above the merge's rounding bound, eps(dtype) * ||merged||_F. Why that bound: the merge stores
fl(W + dW), each element off by at most eps/2 of itself, so the stored difference is dW + E with
||E||_2 <= ||E||_F <= eps/2 * ||merged||_F, and by Weyl's inequality every singular value beyond dW's rank is
at most that; one above it is real. It also checks that every untargeted tensor equals the base's exactly, and
fails (exit 1) when a targeted change has rank above r or an untargeted one changed.

Results: ``benchmarks/results/lora_{sampler,step,loops,delta}.json`` (``lora_{sampler,step,loops,delta}_small.json``
with ``--small``, whose loop runs go to a temporary folder).
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


# ------------------------------------------------------------------------------------------------ step


def bench_step(args: argparse.Namespace) -> None:
    from benchmarks.common import timeit
    from shell import make_train_step
    from shell.config import OptimConfig
    from shell.lora import LoraConfig, apply_lora, parameter_counts
    from shell.models import load_policy
    from shell.update import Optimizer

    model, _ = load_policy(args.model, device="cpu")
    vocab = model.config.vocab_size
    rows = []
    for variant in ("full", "lora"):
        if variant == "lora":
            model = apply_lora(model, LoraConfig(rank=args.rank, alpha=32.0))
        optimizer = Optimizer(model, OptimConfig(lr=1e-7))
        step = make_train_step(model, "sft")
        for size in args.sizes:
            b, t = (int(x) for x in size.split("x"))
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (b, t), generator=g)
            labels = torch.randint(0, vocab, (b, t), generator=g)
            mask = torch.zeros(b, t, dtype=torch.bool)
            mask[:, t // 4:] = True

            def backward() -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    step(ids, labels, mask, gradient_accumulation_steps=1)

            def whole() -> None:
                backward()
                optimizer.step()

            backward()
            # the optimizer step alone: gradients made once, kept (clip_grad_norm_ and AdamW do not free them)
            grads = [p.grad for p in optimizer.params]
            def adamw() -> None:
                for p, g_ in zip(optimizer.params, grads):
                    p.grad = g_
                optimizer.step()

            fwd_bwd = timeit(lambda: (backward(), model.zero_grad(set_to_none=True)), warmup=1, repeats=args.repeats)["median_s"]
            opt = timeit(adamw, warmup=1, repeats=args.repeats)["median_s"]
            total = timeit(whole, warmup=1, repeats=args.repeats)["median_s"]
            rows.append({"variant": variant, "size": size, "trainable_params": parameter_counts(model)["train/trainable_params"],
                         "forward_backward_s": fwd_bwd, "clip_adamw_s": opt, "step_s": total})
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, ["variant", "size", "trainable_params", "forward_backward_s", "clip_adamw_s", "step_s"])
    write_json("lora_step" + args.suffix, {"rank": args.rank, "repeats": args.repeats, "rows": rows})


# ------------------------------------------------------------------------------------------------ delta


def bench_delta(args: argparse.Namespace) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors.torch import load_file

    from shell.models import load_policy

    final = Path(args.final)
    config = PeftLoraConfig.from_pretrained(str(final / "adapter"))  # peft's own rule for which modules it targets
    rank = config.r
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    merged = load_file(str(final / "model.safetensors"))
    base_model, _ = load_policy(args.base, device="cpu", dtype="float32")
    base = {k: v.detach() for k, v in base_model.state_dict().items()}
    if set(merged) != set(base):
        raise SystemExit(f"{final}: tensors {sorted(set(merged) ^ set(base))[:4]} are in one of it and {args.base} only")
    rows, bad = [], []
    for key in sorted(merged):
        targeted = key.endswith(".weight") and bool(check_target_module_exists(config, key.removesuffix(".weight")))
        delta = merged[key].double() - base[key].to(merged[key].dtype).double()
        row = {"tensor": key, "targeted": targeted, "max_abs_change": delta.abs().max().item()}
        if targeted:
            sv = torch.linalg.svdvals(delta)
            bound = torch.finfo(merged[key].dtype).eps * merged[key].double().norm().item()
            row["rank"] = int((sv > bound).sum().item())
            row["rounding_bound"] = bound
            row["singular_values"] = [float(x) for x in sv[: rank + 2]]
            row["sv_r/bound"] = sv[rank - 1].item() / bound if sv.numel() >= rank else 0.0
            row["sv_r+1/bound"] = sv[rank].item() / bound if sv.numel() > rank else 0.0
            if row["rank"] > rank:
                bad.append(f"{key}: rank {row['rank']} > r = {rank}")
        elif row["max_abs_change"] != 0.0:
            bad.append(f"{key}: not targeted, changed by up to {row['max_abs_change']:.3g}")
        rows.append(row)
    shown = [r for r in rows if r["targeted"]]
    columns = ["tensor", "rank", "max_abs_change", "sv_r/bound", "sv_r+1/bound"]
    print_table([{k: r.get(k) for k in columns} for r in shown], columns)
    summary = {"final": str(final), "base": args.base, "r": rank, "target_modules": targets,
               "targeted_tensors": len(shown), "max_targeted_rank": max((r["rank"] for r in shown), default=0),
               "min_targeted_rank": min((r["rank"] for r in shown), default=0),
               "min_sv_r_over_bound": min((r["sv_r/bound"] for r in shown), default=0.0),
               "max_sv_r+1_over_bound": max((r["sv_r+1/bound"] for r in shown), default=0.0),
               "untargeted_tensors": len(rows) - len(shown),
               "untargeted_changed": sum(1 for r in rows if not r["targeted"] and r["max_abs_change"] != 0.0),
               "ok": not bad, "problems": bad}
    print(json.dumps({k: v for k, v in summary.items() if k != "problems"}))
    write_json(args.out + args.suffix, {**summary, "rows": rows})
    if bad:
        raise SystemExit("\n".join(bad))


def small_final(tmp: Path, model_folder: str) -> Path:
    """A merged final/ of the tiny model with a rank-4 adapter whose B is random (a trained adapter's shape)."""
    from shell.lora import LoraConfig, apply_lora, save_merged
    from shell.models import load_policy

    model, tokenizer = load_policy(model_folder, device="cpu", dtype="float32")
    model = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return save_merged(model, tokenizer, tmp / "final")


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
    st = sub.add_parser("step")
    st.add_argument("--rank", type=int, default=16)
    st.add_argument("--sizes", nargs="+", default=["4x420", "8x160"], help="ROWSxTOKENS of the one microbatch")
    st.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("delta")
    d.add_argument("final", nargs="?", help="a LoRA run's final/ folder (not with --small)")
    d.add_argument("--base", default="smollm2", help="the model the run trained from")
    d.add_argument("--out", default="lora_delta", help="the result's name in benchmarks/results/")
    loops = sub.add_parser("loops")
    loops.add_argument("--sft-steps", type=int, default=16)
    loops.add_argument("--grpo-steps", type=int, default=10)
    loops.add_argument("--extra", default="", help="flags for every run, e.g. --extra='--eval-data.limit 64'")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.model, args.runs, args.suffix = "smollm2", REPO / "runs", ""
    if not args.small:
        if args.part == "delta" and not args.final:
            parser.error("delta: give a LoRA run's final/ folder")
        {"sampler": bench_sampler, "step": bench_step, "delta": bench_delta, "loops": bench_loops}[args.part](args)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        args.model, args.runs, args.suffix = str(tiny_model_folder(Path(tmp) / "tiny")), Path(tmp) / "runs", "_small"
        if args.part == "sampler":
            args.rank, args.prompts, args.n, args.tokens, args.repeats = 4, 2, 2, 4, 1
            bench_sampler(args)
        elif args.part == "step":
            args.rank, args.sizes, args.repeats = 4, ["2x8"], 1
            bench_step(args)
        elif args.part == "delta":
            args.final, args.base = str(small_final(Path(tmp), args.model)), args.model
            bench_delta(args)
        else:
            args.sft_steps = args.grpo_steps = 1
            bench_loops(args)


if __name__ == "__main__":
    main()
