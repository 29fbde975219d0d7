"""Shared bits of the benchmark scripts: timing, a table printer, JSON output and the small modes' tiny model.

Every script has a small mode (``--small``, or ``--tiny`` for bench_gpu.py) that runs its code paths on a
tiny random model in seconds; ``tests/test_benchmarks.py`` runs each one so that a change that breaks a
benchmark fails the quick suite. Small modes write ``<name>_small.json``; ``REASONING_RL_BENCH_RESULTS``
(set by that test) sends every result file to another folder.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def results_dir() -> Path:
    """Where result files go: ``$REASONING_RL_BENCH_RESULTS`` when set, else ``benchmarks/results``."""
    return Path(os.environ.get("REASONING_RL_BENCH_RESULTS") or RESULTS)


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama-style policy and byte-level tokenizer (``tests/doubles.py``) saved to ``folder``:
    the small modes' model, loadable by every entry point (``--model.name-or-path``)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from doubles import save_tiny_policy

    return save_tiny_policy(folder, seed=seed)


def free_memory(device: str) -> None:
    """Collect what the caller just dropped and, on CUDA, hand the cached blocks back (between measured parts, so
    one part's peak memory is not the last part's leftovers)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def timeit(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict[str, float]:
    """Median and min wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): CPU timings of one
    machine image differ by host, so a result says which it ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: dict[str, object]) -> Path:
    from shell.files import atomic_write_text

    path = atomic_write_text(results_dir() / f"{name}.json", json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
