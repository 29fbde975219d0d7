"""Every script in benchmarks/ runs in its small mode (a tiny random model, seconds): a change that breaks a
benchmark fails here, not months later when someone wants its figure. Timings are not checked (they live in
benchmarks/); each run must exit 0 and write its result file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    # run name: (the script and the arguments of its small mode, the result file it writes)
    "bench_contention": (["bench_contention.py", "--small"], "contention_small.json"),
    "bench_curricula": (["bench_curricula.py", "--small"], "curricula_small.json"),
    "bench_gpu": (["bench_gpu.py", "--tiny", "--no-compile"], "gpu_tiny.json"),
    "bench_grading": (["bench_grading.py", "--small"], "grading_small.json"),
    "bench_logprobs": (["bench_logprobs.py", "--small"], "logprobs_float32_small.json"),
    "bench_lora-sampler": (["bench_lora.py", "--small", "sampler"], "lora_sampler_small.json"),
    "bench_lora-loops": (["bench_lora.py", "--small", "loops"], "lora_loops_small.json"),
    "bench_microbatches": (["bench_microbatches.py", "--small"], "microbatches_small.json"),
    "bench_sampler": (["bench_sampler.py", "--small"], "sampler_small.json"),
    "bench_scale": (["bench_scale.py", "--small"], "scale_small.json"),
    "bench_steps": (["bench_steps.py", "--small"], "steps_cpu_small.json"),
    "bench_vs_trl": (["bench_vs_trl.py", "--small"], "vs_trl_small.json"),
    "other_phrasings": (["other_phrasings.py", "-n", "5", "--out", "{tmp}/other.jsonl"], "other.jsonl"),
}
SLOW = {"bench_curricula", "bench_lora-loops"}
"""Small modes that chain several entry-point processes (SFT, pass rates, GRPO runs: tens of CPU seconds in all,
minutes on a loaded machine): behind ``-m slow``. Their scripts' other code runs in the default suite where it
has a part of its own (bench_lora's sampler); bench_curricula has only the chain."""


def test_every_benchmark_script_has_a_small_mode_here():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name not in ("__init__.py", "common.py")}
    assert scripts == {args[0] for args, _ in SMALL.values()}
    assert SLOW <= set(SMALL)


@pytest.mark.parametrize("run", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in sorted(SMALL)])
def test_benchmark_runs_in_its_small_mode(run, tmp_path):
    (script, *args), result = SMALL[run]
    env = {**os.environ, "REASONING_RL_BENCH_RESULTS": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *(a.format(tmp=tmp_path) for a in args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    path = tmp_path / result
    assert path.is_file(), proc.stdout[-2000:]
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        assert payload["environment"]["torch"]
