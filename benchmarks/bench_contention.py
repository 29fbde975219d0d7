"""How `python -m shell.evaluate` degrades on a busy laptop: alone, beside a one-thread busy loop, and beside
another two-thread torch job, under the thread settings of your choice.

    python benchmarks/bench_contention.py --model runs/sft_laptop/final
    python benchmarks/bench_contention.py --model runs/sft_laptop/final --settings old new
    python benchmarks/bench_contention.py --small    # a tiny random model, 2 problems, alone and beside a busy loop

Settings (environment of the evaluate process):
  old   libgomp's defaults (threads spin while they wait for work) -- what the shell did before
  new   the shell's defaults now (see shell/__init__.py): OMP_WAIT_POLICY=PASSIVE
  t1    passive waiting and one torch thread (REASONING_RL_THREADS=1)
  spin10k  a waiting thread spins 10,000 times, then sleeps (GOMP_SPINCOUNT=10000; libgomp's default is
        300,000 and PASSIVE's 0)

Each (setting, situation) pair runs evaluate once on the same problems and seed; the table gives the wall
seconds and the slow-down against the same setting alone. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import print_table, write_json  # noqa: E402

SETTINGS = {
    "old": {"OMP_WAIT_POLICY": "", "REASONING_RL_THREADS": "", "REASONING_RL_OMP_DEFAULTS": "1"},
    "new": {},
    "t1": {"REASONING_RL_THREADS": "1"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
}

BUSY_LOOP = "while True: pass"
TORCH_JOB = (
    "import torch\n"
    "torch.set_num_threads(2)\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a) \n"
)


def neighbour(kind: str) -> subprocess.Popen | None:
    """Start the competing process of a situation (None: alone). The torch job keeps libgomp's defaults."""
    if kind == "alone":
        return None
    code = BUSY_LOOP if kind == "busy-loop" else TORCH_JOB
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # let it get going
    return proc


def evaluate_seconds(model: str, setting: str, limit: int, out: Path) -> float:
    env = dict(os.environ)
    for key, value in SETTINGS[setting].items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    cmd = [sys.executable, "-m", "shell.evaluate", "--model.name-or-path", model, "--data.limit", str(limit),
           "--run.runs-dir", str(out), "--run.name", setting, "--eval.max-tokens", "64", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a trained laptop model folder (e.g. runs/sft_laptop/final)")
    p.add_argument("--settings", nargs="+", default=["old", "new"], choices=list(SETTINGS))
    p.add_argument("--situations", nargs="+", default=["alone", "busy-loop", "torch-2-threads"],
                   choices=["alone", "busy-loop", "torch-2-threads"])
    p.add_argument("--limit", type=int, default=128)
    p.add_argument("--out", default="/tmp/bench_contention")
    p.add_argument("--small", action="store_true", help="a tiny random model, 2 problems, setting new, alone and "
                                                         "beside a busy loop (CI, seconds)")
    a = p.parse_args()
    if a.small:
        import tempfile

        from benchmarks.common import tiny_model_folder

        a.out = tempfile.mkdtemp(prefix="bench-contention-")
        a.model = str(tiny_model_folder(Path(a.out) / "tiny"))
        a.settings, a.situations, a.limit = ["new"], ["alone", "busy-loop"], 2
    if a.model is None:
        p.error("--model is required (or --small)")
    rows = []
    for setting in a.settings:
        alone = None
        for situation in a.situations:
            other = neighbour(situation)
            try:
                seconds = evaluate_seconds(a.model, setting, a.limit, Path(a.out))
            finally:
                if other is not None:
                    other.kill()
                    other.wait()
            alone = seconds if situation == "alone" else alone
            rows.append({"setting": setting, "situation": situation, "seconds": seconds,
                         "slowdown": seconds / alone if alone else None})
            print_table([rows[-1]], list(rows[-1]))
    print()
    print_table(rows, ["setting", "situation", "seconds", "slowdown"])
    write_json("contention_small" if a.small else "contention", {"config": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
