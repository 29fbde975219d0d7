"""Compare runs: ``python -m shell.report RUN_DIR [RUN_DIR …]``.

Overlays the validation-reward curves of several runs, by step and by wall-clock time, in one PNG
and prints a table of each run's first, best and final values.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from shell.runlog import plot_curves, read_metrics


@dataclass(frozen=True)
class ReportConfig:
    """Overlay validation curves of runs and tabulate their final values."""

    run_dirs: tyro.conf.Positional[tuple[str, ...]]
    """Run folders (each holding a metrics.jsonl)."""
    out: str = "report.png"
    """The PNG to write."""
    metric: str = "eval/answer_reward"
    """The validation metric to compare."""


def summarize_run(run_dir: Path, metric: str) -> dict[str, Any]:
    rows = [r for r in read_metrics(run_dir) if r.get(metric) is not None and "eval_step" in r]
    if not rows:
        return {"run": run_dir.name, "evals": 0}
    best = max(rows, key=lambda r: r[metric])
    return {
        "run": run_dir.name,
        "evals": len(rows),
        "first": rows[0][metric],
        "best": best[metric],
        "best_step": best["eval_step"],
        "final": rows[-1][metric],
        "final_step": rows[-1]["eval_step"],
        "minutes": rows[-1].get("time/elapsed_s", 0.0) / 60,
    }


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    header = f"{'run':30s} {'evals':>5s} {'first':>7s} {'best':>7s} {'@step':>6s} {'final':>7s} {'@step':>6s} {'wall min':>8s}"
    lines = [f"{metric}", header, "-" * len(header)]
    for r in rows:
        if not r["evals"]:
            lines.append(f"{r['run'][:30]:30s} {0:5d}   (no evaluations)")
            continue
        lines.append(f"{r['run'][:30]:30s} {r['evals']:5d} {r['first']:7.3f} {r['best']:7.3f} {r['best_step']:6d} "
                     f"{r['final']:7.3f} {r['final_step']:6d} {r['minutes']:8.1f}")
    return "\n".join(lines)


def main(cfg: ReportConfig) -> list[dict[str, Any]]:
    dirs = [Path(d) for d in cfg.run_dirs]
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    plot_curves(dirs, cfg.out, panels=[(cfg.metric, "eval_step"), (cfg.metric, "time/elapsed_s")])
    rows = [summarize_run(d, cfg.metric) for d in dirs]
    print(format_table(rows, cfg.metric))
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(ReportConfig, description=__doc__.split("\n\n")[0]))
