"""Data strategies on the laptop: GRPO's uniform sampling vs each curriculum, on the embedded task with mixed
difficulties (1-3), held-out answer reward on mixed held-out problems.

    python benchmarks/bench_curricula.py [--seeds 0 1] [--strategies uniform level pass-rate-band online] [--steps 10]
    python benchmarks/bench_curricula.py --small     # a tiny random model, 1 seed, uniform and online, 1 step (CI)

One SFT model (``shell.sft``, ``--sft-steps`` 16 steps on mixed-difficulty traces) is every run's start; ``shell.pass_rates``
estimates its pass rate on a training pool of ``--pool`` 48 problems (8 samples each); every GRPO run then trains on that
pool from that model for ``--steps`` steps (8 questions × G 8, the laptop preset's batch) with one strategy, and
ends with an evaluation of ``--eval-problems`` held-out mixed problems (validation split, T = 1). Runs already
done (their ``final_eval/summary.json`` exists) are not rerun. Writes ``benchmarks/results/curricula.json`` (``--out``) and
prints the table (per strategy: each seed's score, the mean, a 95% Wilson interval on the pooled counts).
``--small`` runs the same pipeline on a tiny random model (2 SFT steps, 6 pool problems × 2 samples, 1 GRPO
step of 2 questions × G 2, 4 held-out problems, at most 6 tokens everywhere) in a temporary runs folder and
writes ``curricula_small.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, tiny_model_folder, write_json  # noqa: E402

STRATEGIES: dict[str, list[str]] = {
    "uniform": ["--data.curriculum", "none"],
    "level": ["--data.curriculum", "level", "--data.curriculum-start", "0.25", "--data.curriculum-steps", "8"],
    "pass-rate-band": ["--data.curriculum", "pass-rate", "--data.curriculum-band-min", "0.2",
                       "--data.curriculum-band-max", "0.8", "--data.curriculum-start", "1.0"],
    "pass-rate-order": ["--data.curriculum", "pass-rate", "--data.curriculum-start", "0.25", "--data.curriculum-steps", "8"],
    "online": ["--data.curriculum", "online"],
}


def sh(args: list[str]) -> float:
    print("$", " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--strategies", nargs="+", default=["uniform", "level", "pass-rate-band", "online"],
                   choices=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sft-steps", type=int, default=16, help="SFT steps of the starting model")
    p.add_argument("--pool", type=int, default=48, help="training problems (mixed difficulties 1-3)")
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="curricula", help="benchmarks/results/<out>.json")
    p.add_argument("--report-only", action="store_true", help="run nothing: the table of the runs already done")
    p.add_argument("--small", action="store_true", help="a tiny random model, 1 seed, uniform and online, 1 step (CI)")
    a = p.parse_args()
    if a.small:
        with tempfile.TemporaryDirectory(prefix="bench-curricula-") as tmp:
            a.seeds, a.strategies, a.steps, a.eval_problems, a.runs_dir, a.out = [0], ["uniform", "online"], 1, 4, tmp, a.out + "_small"
            run_all(a, tiny=tiny_model_folder(Path(tmp) / "tiny"))
        return
    run_all(a)


def run_all(a: argparse.Namespace, tiny: Path | None = None) -> None:
    """Every run of the benchmark (those not done yet) and the table; ``tiny``: the small mode's model folder."""
    runs = Path(a.runs_dir)
    py = sys.executable
    sft, pool = runs / "c25_sft", runs / f"c25_pool{6 if tiny else a.pool}.jsonl"
    small_tokens = ["--sampling.max-tokens", "6"] if tiny else []
    tiny_cpu = ["--model.device", "cpu", "--grading.workers", "0", "--sampler.generation-dtype", "None"] if tiny else []
    if not (sft / "final").is_dir() and not a.report_only:
        size = ["--model.name-or-path", str(tiny), *tiny_cpu, "--eval.max-tokens", "6", "--batch-size", "4",
                "--data.limit", "8"] if tiny else []
        steps = 2 if tiny else a.sft_steps
        sh([py, "-m", "shell.sft", "--data.difficulty-max", "3", "--num-steps", str(steps),
            "--eval-data.limit", "4" if tiny else "32", "--eval-every", str(steps), *size,
            "--run.logger", "none", "--run.runs-dir", str(runs), "--run.name", "c25_sft"])
    if not pool.exists() and not a.report_only:
        sh([py, "-m", "shell.pass_rates", "--model.name-or-path", str(sft / "final"), "--data.difficulty-max", "3",
            "--data.seed", "1", "--data.limit", "6" if tiny else str(a.pool), "--samples-per-problem", "2" if tiny else "8",
            "--sampling.max-tokens", "6" if tiny else "48", *tiny_cpu, "--output", str(pool)])
    held = ["--eval-data.path", "embedded", "--eval-data.difficulty", "1", "--eval-data.difficulty-max", "3",
            "--eval-data.limit", "4" if tiny else "32", "--final-eval.enabled", "--final-eval.data.path", "embedded",
            "--final-eval.data.difficulty", "1", "--final-eval.data.difficulty-max", "3",
            "--final-eval.data.limit", str(a.eval_problems), "--final-eval.sampling.max-tokens", "6" if tiny else "48"]
    if tiny:
        held += [*tiny_cpu, *small_tokens, "--eval.max-tokens", "6", "--rollout-batch-size", "4", "--group-size", "2",
                 "--train-batch-size", "4", "--gradient-accumulation-steps", "2"]
    rows = []
    for seed in a.seeds:  # every strategy at one seed before the next seed
        for name in a.strategies:
            run = f"c25_{name}_p{a.pool}_t{a.steps}_s{seed}"
            summary = runs / run / "final_eval" / "summary.json"
            if not summary.exists() and a.report_only:
                continue
            if not summary.exists():
                sh([py, "-m", "shell.grpo", "--model.name-or-path", str(sft / "final"), "--warm-start.steps", "0",
                    "--data.path", str(pool), *held, "--n-grpo-steps", str(a.steps), "--eval-every", "1000",
                    "--run.logger", "none", "--run.runs-dir", str(runs), "--run.name", run, "--run.seed", str(seed),
                    *STRATEGIES[name]])
            s = json.loads(summary.read_text())
            metrics = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            start = next(m["eval/answer_reward"] for m in metrics if m.get("eval_step") == 0)
            wall = max(m.get("time/elapsed_s", 0.0) for m in metrics)
            zero_var = [m["train/zero_variance_group_fraction"] for m in metrics if "train/zero_variance_group_fraction" in m]
            rows.append({"strategy": name, "seed": seed, "answer_reward": s["answer_reward"],
                         "correct": round(s["answer_reward"] * s["num_examples"]), "n": s["num_examples"],
                         "step0_answer_reward_32": start, "wall_s": wall,
                         "zero_variance_group_fraction": sum(zero_var) / max(1, len(zero_var))})
    table = []
    for name in a.strategies:
        mine = [r for r in rows if r["strategy"] == name]
        if not mine:
            continue
        k, n = sum(r["correct"] for r in mine), sum(r["n"] for r in mine)
        lo, hi = wilson(k, n)
        table.append({"strategy": name, "per seed": " / ".join(f"{r['answer_reward']:.1%}" for r in mine),
                      "mean": f"{k / n:.1%}", "95% CI (pooled)": f"{lo:.1%}-{hi:.1%}",
                      "zero-variance groups": " / ".join(f"{r['zero_variance_group_fraction']:.0%}" for r in mine),
                      "wall min (each)": " / ".join(f"{r['wall_s'] / 60:.1f}" for r in mine)})
    print_table(table, list(table[0]) if table else [])
    pool_info: dict[str, object] = {}
    if pool.exists():
        recs = [json.loads(line) for line in pool.read_text().splitlines() if line.strip()]
        by_level: dict[int, list[float]] = {}
        for r in recs:
            by_level.setdefault(r["difficulty"], []).append(r["pass_rate"])
        pool_info = {"problems": len(recs), "in_0.2_0.8": sum(0.2 <= r["pass_rate"] <= 0.8 for r in recs),
                     "in_0.1_0.9": sum(0.1 <= r["pass_rate"] <= 0.9 for r in recs),
                     "mean_pass_rate_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_level.items())}}
        print("pool:", pool_info)
    write_json(a.out, {"runs": rows, "table": table, "pool": pool_info, "steps": a.steps, "eval_problems": a.eval_problems})


if __name__ == "__main__":
    main()
