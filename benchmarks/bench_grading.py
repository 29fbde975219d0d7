"""Grading throughput (process pool vs in-process) and worst-case latency on adversarial inputs.

    python benchmarks/bench_grading.py [--items 2000 --workers 2 --timeout 5]
    python benchmarks/bench_grading.py --small      # 40 items, adversarial inputs with fast=True only (seconds)

* Throughput: ``--items`` mixed r1_zero items (MATH-style and GSM8K-style answers in many
  equivalent and wrong forms, boxed and unboxed, unformatted responses, long reasoning), graded by a
  plain sequential loop over ``core.r1_zero_reward_fn`` (the baseline), by
  ``shell.grading.grade_batch`` in this process (``num_workers=0``) and by ``grade_batch`` with
  ``--workers`` processes (pool started and warmed first; its start-up time is reported apart).
  Two workloads: ``unique`` (no two responses equal) and ``repeats`` (drawn from a small pool, so
  many pairs repeat, as in late GRPO groups; ``grade_batch`` grades each distinct pair once).
* Latency: every adversarial input (200k characters, 5000-deep nesting, power towers, huge
  factorials and float exponents, lone surrogates, NULs, ...) graded alone, in process, with
  ``fast=True`` and ``fast=False``; the worst call is the bound a training step can see.

Writes ``benchmarks/results/grading.json`` (``grading_small.json`` with ``--small``).  Timings are wall clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402

# Typical MATH / GSM8K final answers, each with equivalent forms a model might write.
_ANSWERS: list[tuple[str, list[str]]] = [
    ("\\frac{1}{2}", ["1/2", "0.5", "\\dfrac{1}{2}", "\\frac12", "\\boxed{\\frac{1}{2}}"]),
    ("-\\frac{2}{3}", ["-2/3", "\\frac{-2}{3}", "-\\dfrac{2}{3}"]),
    ("2\\sqrt{2}", ["\\sqrt{8}", "2\\sqrt2", "2 \\sqrt{2}"]),
    ("\\frac{\\sqrt{3}}{2}", ["\\frac{1}{2}\\sqrt{3}", "\\sqrt{3}/2"]),
    ("(-\\infty, 3]", ["(-\\infty,3]", "\\left(-\\infty, 3\\right]"]),
    ("(3,\\frac{1}{2})", ["\\left( 3, \\frac{1}{2} \\right)", "(3, 0.5)"]),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", ["\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}"]),
    ("90^\\circ", ["90", "90^{\\circ}", "90 degrees"]),
    ("5", ["5 \\text{ cm}", "x = 5", "5.0", "\\boxed{5}", "5 inches"]),
    ("25", ["25\\%", "25%", "\\$25", "25 dollars"]),
    ("1000", ["1,000", "1{,}000", "1000.00"]),
    ("109200000", ["109,200,000", "109200000.0"]),
    ("x^2+2x+1", ["(x+1)^2", "x^2 + 2x + 1"]),
    ("3\\pi", ["3 \\pi", "3\\pi"]),
    ("\\text{(C)}", ["(C)", "\\text{(C)}", "C"]),
    ("18", ["18", "\\$18", "18.00", "eighteen"]),
    ("-7", ["-7", "- 7", "-7.0"]),
    ("\\frac{7}{10}", ["0.7", "7/10", "\\frac{14}{20}"]),
]
_WRONG = ["6", "\\frac{1}{3}", "(1,2)", "\\sqrt{3}", "x+1", "42", "The final answer is 5", "", "\\boxed{7", "1,001"]


def mixed_items(n: int, seed: int = 0, *, unique: bool = False) -> tuple[list[str], list[object]]:
    """``n`` r1_zero (response, ground truth) pairs in a realistic mix of styles (``unique``: each
    reasoning text numbered, so no two responses are equal)."""
    rng = random.Random(seed)
    responses: list[str] = []
    truths: list[object] = []
    for _ in range(n):
        truth, forms = rng.choice(_ANSWERS)
        answer = rng.choice(forms) if rng.random() < 0.6 else rng.choice(_WRONG)
        reasoning = "We compute step by step. " * rng.choice([1, 5, 40])
        if unique:
            reasoning = f"Attempt {len(responses)}. {reasoning}"
        style = rng.random()
        if style < 0.75:
            response = f"{reasoning}</think> <answer> {answer} </answer>"
        elif style < 0.85:
            response = f"{reasoning}</think> <answer> \\boxed{{{answer}}} </answer>"
        elif style < 0.95:
            response = f"{reasoning}</think><answer>{answer}</answer>"  # format failure
        else:
            response = reasoning  # truncated at max_tokens
        truths.append(int(truth) if truth.isdigit() and rng.random() < 0.3 else truth)
        responses.append(response)
    return responses, truths


def adversarial_items() -> dict[str, tuple[str, str]]:
    """Inputs that make unguarded graders hang, blow up or raise."""
    return {
        "200k chars": ("<think>" + "x" * 200_000 + "</think> <answer>" + "7" * 200_000 + "</answer>", "7"),
        "200k boxed": ("</think> <answer>\\boxed{" + "1+" * 100_000 + "1}</answer>", "7"),
        "deep braces x5000": ("</think> <answer>" + "{" * 5000 + "1" + "}" * 5000 + "</answer>", "1"),
        "deep boxed braces": ("</think> <answer>\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}</answer>", "1"),
        "deep parens": ("</think> <answer>" + "(" * 3000 + "1" + ")" * 3000 + "</answer>", "1"),
        "deep fractions": ("</think> <answer>" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "</answer>", "1"),
        "10^{10^{10^{10}}}": ("</think> <answer>10^{10^{10^{10}}}</answer>", "10"),
        "9**9**9": ("</think> <answer>9**9**9</answer>", "1"),
        "100000!": ("</think> <answer>100000!</answer>", "1"),
        "(5!)!!": ("</think> <answer>(5!)!!</answer>", "1"),
        "1e999999x": ("</think> <answer>1e999999x</answer>", "x"),
        "binom 10^6": ("</think> <answer>\\binom{1000000}{500000}</answer>", "1"),
        "degree blow-up": ("</think> <answer>((((x+1)^9)^9)^9)^9</answer>", "x"),
        "degree 36 poly": ("</think> <answer>(x+y)^9*(x-y)^9*(x+2*y)^9*(2*x-y)^9</answer>",
                           "(x-y)^9*(x+y)^9*(x+2*y)^9*(2*x-y)^8"),
        "[1]*10**9": ("</think> <answer>[1]*10**9</answer>", "1"),
        "ff(10**6,10**6)": ("</think> <answer>ff(10**6,10**6)</answer>", "1"),
        "lone surrogates": ("</think> <answer>\ud800\udfff\ud800</answer>", "\ud800"),
        "NULs": ("</think> <answer>1\x002</answer>", "1\x002"),
        "30k \\text{": ("</think> <answer>" + "\\text{ " * 30_000 + "}</answer>", "1"),
        "20k \\boxed{": ("</think> <answer>" + "\\boxed{" * 20_000 + "</answer>", "1"),
        "4k \\frac": ("</think> <answer>" + "\\frac" * 800 + "</answer>", "1"),
        "4k \\[": ("</think> <answer>" + "\\[" * 2000 + "</answer>", "1"),
        "repetitive 3k": ("</think> <answer>" + "ab" * 1500 + "</answer>", "ab" * 1500 + "c"),
        "300-digit radicand": ("</think> <answer>\\sqrt{" + "9" * 300 + "}</answer>", "3" * 150),
        "32 long alternatives": ("</think> <answer>" + "1,000 " * 600 + "</answer>", ["1,000 " * 600 + "x"] * 32),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=5.0, help="grade_batch per-item timeout (s)")
    p.add_argument("--small", action="store_true", help="40 items; adversarial inputs with fast=True only (the "
                                                         "reference grader takes 15-22 s or never on some): CI")
    a = p.parse_args()
    if a.small:
        a.items = 40

    import logging

    logging.getLogger("pylatexenc").setLevel(logging.ERROR)  # malformed \frac chatter
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import core
    from shell.grading import close_pool, grade_batch

    workloads = {
        # every response distinct: only the parallelism and the parent-side format check can help
        "unique": mixed_items(a.items, unique=True),
        # drawn from a small pool of answers and styles: many repeated (response, truth) pairs, as in
        # late GRPO groups; graded once each by grade_batch
        "repeats": mixed_items(a.items),
    }
    rows = []

    t0 = time.perf_counter()
    grade_batch(workloads["unique"][0][:8], workloads["unique"][1][:8], num_workers=a.workers, timeout_s=a.timeout)
    startup_s = time.perf_counter() - t0
    grade_batch(*[x[:min(200, a.items)] for x in workloads["unique"]], num_workers=a.workers, timeout_s=a.timeout)  # warm workers

    for workload, (responses, truths) in workloads.items():
        distinct = len({(r, repr(t)) for r, t in zip(responses, truths)})
        unformatted = sum(1 for r in responses if "</think> <answer>" not in r or "</answer>" not in r)
        for fast in (True, False):
            t = time.perf_counter()
            reference = [core.r1_zero_reward_fn(r, g, fast=fast) for r, g in zip(responses, truths)]
            sequential_s = time.perf_counter() - t
            in_process, meta_seq = grade_batch(responses, truths, num_workers=0, fast=fast)
            pooled, meta_pool = grade_batch(responses, truths, num_workers=a.workers, fast=fast, timeout_s=a.timeout)
            assert reference == in_process == pooled, "grade_batch disagrees with the reward function"
            for label, seconds in (("sequential loop", sequential_s), ("grade_batch in-process", meta_seq["grading_seconds"]),
                                   (f"grade_batch pool x{a.workers}", meta_pool["grading_seconds"])):
                rows.append({
                    "workload": workload, "mode": label, "fast": fast, "items": a.items, "distinct": distinct,
                    "unformatted": unformatted, "seconds": seconds, "items_per_s": a.items / seconds,
                    "speedup": sequential_s / seconds,
                    "reward_mean": sum(r["reward"] for r in reference) / a.items,
                })
    print(f"pool start-up (first call, {a.workers} workers): {startup_s:.2f} s")
    print_table(rows, ["workload", "mode", "fast", "items", "distinct", "unformatted", "seconds", "items_per_s",
                       "speedup", "reward_mean"])

    adversarial = adversarial_items()
    latency_rows = []
    for name, (response, truth) in adversarial.items():
        row: dict[str, object] = {"input": name, "chars": len(response)}
        for fast in (True,) if a.small else (True, False):
            t = time.perf_counter()
            out = core.r1_zero_reward_fn(response, truth, fast=fast)
            row["fast_s" if fast else "slow_s"] = time.perf_counter() - t
            row["reward"] = out["reward"]
        latency_rows.append(row)
    print()
    print_table(latency_rows, ["input", "chars", "fast_s", "slow_s", "reward"])
    worst_fast = max(latency_rows, key=lambda r: r["fast_s"])  # type: ignore[arg-type, return-value]
    worst_slow = max(latency_rows, key=lambda r: r.get("slow_s", 0.0))  # type: ignore[arg-type, return-value]
    adv_resp = [r for r, _ in adversarial.values()]
    adv_truth = [t for _, t in adversarial.values()]
    _, adv_meta = grade_batch(adv_resp, adv_truth, num_workers=a.workers, timeout_s=a.timeout)
    close_pool()
    print(f"\nworst single call: fast=True {worst_fast['fast_s']:.3f} s ({worst_fast['input']}), "
          f"fast=False {worst_slow.get('slow_s', float('nan')):.3f} s ({worst_slow['input']}); "
          f"adversarial batch through the pool: {adv_meta['grading_seconds']:.2f} s, "
          f"{int(adv_meta['timeouts'])} timeouts")
    write_json("grading_small" if a.small else "grading", {
        "config": vars(a),
        "pool_startup_s": startup_s,
        "throughput": rows,
        "adversarial_latency": latency_rows,
        "worst_latency_fast_s": worst_fast["fast_s"],
        "worst_latency_fast_input": worst_fast["input"],
        "worst_latency_slow_s": worst_slow.get("slow_s"),
        "worst_latency_slow_input": worst_slow["input"],
        "adversarial_batch": {k: adv_meta[k] for k in ("grading_seconds", "timeouts", "errors")},
    })


if __name__ == "__main__":
    main()
