"""Compare runs: ``python -m shell.report RUN_DIR [RUN_DIR …]``.

Overlays the validation-reward curves of several runs, by step and by wall-clock time, in one PNG
and prints a table of each run's first, best and final values. ``--phases`` instead draws each run's
timeline: its phases (SFT warm start, the loop's steps, the final evaluation) on a wall-clock axis, with
what each ended at.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tyro

from shell.runlog import plot_curves, read_metrics, save_figure


@dataclass(frozen=True)
class ReportConfig:
    """Overlay validation curves of runs and tabulate their final values."""

    run_dirs: tyro.conf.Positional[tuple[str, ...]] = ()
    """Run folders (each holding a metrics.jsonl)."""
    out: str = "runs/report.png"
    """The PNG to write (under runs/ by default, beside the runs and out of the repository's tracked files)."""
    metric: str = "eval/answer_reward"
    """The validation metric to compare."""
    phases: bool = False
    """Draw each run's phases on a wall-clock axis (one panel per run: the metric at each evaluation and at the
    final evaluation, the training loss below) and print a table of the phases instead."""


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


def _time(row: dict[str, Any]) -> float:
    return float(row.get("time/elapsed_s", 0.0))


def _is_final(row: dict[str, Any]) -> bool:
    return any(k.startswith("final") and "/" in k for k in row)


def run_phases(run_dir: Path, metric: str = "eval/answer_reward") -> list[dict[str, Any]]:
    """A run's phases in wall-clock order, each ``{phase, start_min, end_min, minutes, steps, result}``.

    * ``warm start`` (when ``warm_start_metrics.jsonl`` exists): from the process's start to the first
      evaluation, which measures it (its result);
    * ``training``: to the last evaluation of the loop (its result), with the number of training steps;
    * ``final evaluation`` (rows with ``final…/`` keys): to the last of them; its result is ``final/<name>``
      of ``metric`` (and ``final_greedy/<name>`` as ``greedy``).
    """
    return phases_of(read_metrics(run_dir), read_metrics(run_dir / "warm_start_metrics.jsonl"), metric)


def phases_of(rows: list[dict[str, Any]], warm: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """:func:`run_phases` of a run's metrics records and its warm start's (``[]``: none)."""
    loop = [r for r in rows if not _is_final(r)]
    final = [r for r in rows if _is_final(r)]
    evals = [r for r in loop if "eval_step" in r and r.get(metric) is not None]
    steps = [r for r in loop if "train_step" in r]
    name = metric.split("/", 1)[-1]
    out: list[dict[str, Any]] = []
    start = 0.0

    def add(phase: str, end: float, n_steps: int, result: float | None, **extra: Any) -> None:
        nonlocal start
        out.append({"phase": phase, "start_min": start / 60, "end_min": end / 60, "minutes": (end - start) / 60,
                    "steps": n_steps, "result": result, **extra})
        start = end

    if warm:
        first = evals[0] if evals else None
        add("warm start", _time(first) if first else _time(warm[-1]), len(warm), first[metric] if first else None)
        evals = evals[1:]
    if steps or evals:
        end = max([_time(r) for r in loop])
        add("training", end, len(steps), evals[-1][metric] if evals else None)
    if final:
        t_final = next((r for r in final if f"final/{name}" in r), None)
        greedy = next((r for r in final if f"final_greedy/{name}" in r), None)
        add("final evaluation", max(_time(r) for r in final), 0, t_final[f"final/{name}"] if t_final else None,
            greedy=greedy[f"final_greedy/{name}"] if greedy else None,
            examples=(t_final or {}).get("final/num_examples"))
    return out


def format_phases(run: str, phases: list[dict[str, Any]], metric: str) -> str:
    header = f"{'phase':18s} {'from min':>8s} {'to min':>7s} {'minutes':>7s} {'steps':>5s}  {metric} at its end"
    lines = [run, header, "-" * len(header)]
    for p in phases:
        result = "-" if p["result"] is None else f"{p['result']:.3f}"
        if p.get("examples"):
            result += f" on {p['examples']}"
        if p.get("greedy") is not None:
            result += f" (greedy {p['greedy']:.3f})"
        lines.append(f"{p['phase']:18s} {p['start_min']:8.1f} {p['end_min']:7.1f} {p['minutes']:7.1f} {p['steps']:5d}  {result}")
    return "\n".join(lines)


def plot_phases(run_dirs: list[Path], out: Path | str, metric: str) -> list[list[dict[str, Any]]]:
    """One panel pair per run: ``metric`` at each evaluation (and the final ones, as stars) over wall-clock
    minutes, the training loss of the warm start and the loop below, the phases shaded; returns each run's
    :func:`run_phases`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = metric.split("/", 1)[-1]
    fig, axes = plt.subplots(2, len(run_dirs), figsize=(6 * len(run_dirs), 5.5), squeeze=False, sharex="col")
    colours = ["#dbe9f6", "#e3f2dc", "#f9e4cf"]
    all_phases = []
    for j, run_dir in enumerate(run_dirs):
        top, bottom = axes[0][j], axes[1][j]
        rows, warm = read_metrics(run_dir), read_metrics(run_dir / "warm_start_metrics.jsonl")
        all_phases.append(phases_of(rows, warm, metric))
        for k, p in enumerate(all_phases[-1]):
            for ax in (top, bottom):
                ax.axvspan(p["start_min"], p["end_min"], color=colours[k % len(colours)], alpha=0.8, lw=0)
            top.text((p["start_min"] + p["end_min"]) / 2, 1.02, p["phase"], ha="center", va="bottom", fontsize=8,
                     transform=top.get_xaxis_transform())
        evals = [(_time(r) / 60, r[metric]) for r in rows if "eval_step" in r and r.get(metric) is not None]
        if evals:
            top.plot(*zip(*evals), marker="o", markersize=3, label=f"held-out {name}")
        for key, label in ((f"final/{name}", "final (T=1)"), (f"final_greedy/{name}", "final (greedy)")):
            pts = [(_time(r) / 60, r[key]) for r in rows if key in r]
            if pts:
                top.plot(*zip(*pts), marker="*", markersize=10, linestyle="none", label=label)
        for series, label in ((warm, "warm-start loss"), ([r for r in rows if "train_step" in r], "training loss")):
            pts = [(_time(r) / 60, r["train/loss"]) for r in series if r.get("train/loss") is not None]
            if pts:
                bottom.plot(*zip(*pts), linewidth=1, label=label)
        top.set_title(run_dir.name, pad=16)
        top.set_ylabel(metric)
        top.set_ylim(0, 1.05) if all(0 <= v <= 1 for _, v in evals) else None
        losses = [r["train/loss"] for r in [*warm, *rows] if r.get("train/loss") is not None]
        if losses and min(losses) > 0:  # log scale (minor ticks labelled within a decade); a negative loss: linear
            bottom.set_yscale("log")
        bottom.set_ylabel("train/loss")
        bottom.set_xlabel("wall-clock minutes from the process's start")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    save_figure(fig, out, dpi=100)
    return all_phases


def main(cfg: ReportConfig) -> list[dict[str, Any]]:
    dirs = [Path(d) for d in cfg.run_dirs]
    if not dirs:
        print("error: name at least one run folder: python -m shell.report runs/NAME [runs/OTHER …]", file=sys.stderr)
        raise SystemExit(2)
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        print(f"error: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    if not any(r.get(cfg.metric) is not None for d in dirs for r in read_metrics(d)):
        print(f"error: no {cfg.metric} in {', '.join(map(str, dirs))} (nothing to draw; --metric names another key); "
              f"{cfg.out} left as it was", file=sys.stderr)
        raise SystemExit(2)
    if cfg.phases:
        phases = plot_phases(dirs, cfg.out, cfg.metric)
        for d, p in zip(dirs, phases):
            print(format_phases(d.name, p, cfg.metric))
        print(f"wrote {cfg.out}")
        return [{"run": d.name, "phases": p} for d, p in zip(dirs, phases)]
    plot_curves(dirs, cfg.out, panels=[(cfg.metric, "eval_step"), (cfg.metric, "time/elapsed_s")])
    rows = [summarize_run(d, cfg.metric) for d in dirs]
    print(format_table(rows, cfg.metric))
    print(f"wrote {cfg.out}")
    return rows


if __name__ == "__main__":
    main(tyro.cli(ReportConfig, description=__doc__.split("\n\n")[0], prog="python -m shell.report"))
