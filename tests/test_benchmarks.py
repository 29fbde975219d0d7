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
import torch

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    # run name: (the script and the arguments of its small mode, the result file it writes)
    "bench_contention": (["bench_contention.py", "--small"], "contention_small.json"),
    "bench_curricula": (["bench_curricula.py", "--small"], "curricula_small.json"),
    "bench_gpu": (["bench_gpu.py", "--tiny", "--no-compile"], "gpu_tiny.json"),
    "bench_grading": (["bench_grading.py", "--small"], "grading_small.json"),
    "bench_logprobs": (["bench_logprobs.py", "--small"], "logprobs_float32_small.json"),
    "bench_lora-sampler": (["bench_lora.py", "--small", "sampler"], "lora_sampler_small.json"),
    "bench_lora-step": (["bench_lora.py", "--small", "step"], "lora_step_small.json"),
    "bench_lora-delta": (["bench_lora.py", "--small", "delta"], "lora_delta_small.json"),
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
has a part of its own (bench_lora's sampler, step and delta); bench_curricula has only the chain."""


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


def test_lora_delta_fails_on_a_rank_above_r_and_on_a_changed_untargeted_tensor(tmp_path):
    """bench_lora's delta check (the README's rank <= r on SmolLM2) passes a merged final/ and fails each way."""
    from safetensors.torch import load_file, save_file

    from benchmarks.bench_lora import small_final
    from benchmarks.common import tiny_model_folder

    tiny = tiny_model_folder(tmp_path / "tiny")
    env = {**os.environ, "REASONING_RL_BENCH_RESULTS": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    final = small_final(tmp_path, str(tiny))

    def delta():
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "delta", str(final),
                               "--base", str(tiny)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    proc = delta()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "lora_delta.json").read_text())["max_targeted_rank"] == 4
    weights = final / "model.safetensors"
    clean = load_file(str(weights))
    for key, change, message in (
        ("model.norm.weight", lambda w: w + 1e-3, "model.norm.weight: not targeted, changed"),
        ("model.layers.0.self_attn.q_proj.weight", lambda w: w + 1e-2 * torch.randn_like(w), "q_proj.weight: rank"),
    ):
        save_file({**clean, key: change(clean[key]).contiguous()}, str(weights), metadata={"format": "pt"})
        proc = delta()
        assert proc.returncode == 1 and message in proc.stderr, (proc.returncode, proc.stderr[-2000:])
