"""Compare runs: ``python -m shell.report RUN_DIR [RUN_DIR …]``.

Overlays the validation-reward curves of several runs, by step and by wall-clock time, in one PNG (each with
its evaluations' 95% band; an evaluation-only run, from ``shell.evaluate``, as a flat band) and prints a table of
each run's first, best and final values (the final one's interval too) and of each evaluation's figures.
``--group-seeds`` draws runs that differ only in ``--run.seed`` as one curve (the mean over seeds, a band of
± one standard deviation); ``--paired`` adds the paired bootstrap difference of each run's evaluation to the
first run's on the same problems; ``--pass-at-k`` instead draws pass@k against k (log axis) for runs evaluated
with k > 1. ``--phases`` instead draws each run's timeline: its phases (SFT warm start, the loop's steps, the
final evaluation) on a wall-clock axis, with what each ended at.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro

import core
from shell.evaluation import CI_RESAMPLES, CI_SEED, bracket, pass_at_ks, per_problem_values, sampled_figures
from shell.runlog import read_jsonl_records, read_metrics, save_figure


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
    paired: bool = False
    """Also print, for runs evaluated on the same problems (a shell.evaluate folder's results.jsonl, or a training
    run's final_eval/results.jsonl), each run's difference to the first with its 95% paired bootstrap interval
    (problems resampled together) and whether the interval excludes 0."""
    group_seeds: bool = False
    """Runs whose config.json differ only in --run.seed (and name, runs-dir, logger) become one curve: the mean
    over seeds at each step with a band of ± one standard deviation; the table gives mean ± std of the final
    values."""
    pass_at_k: bool = False
    """Draw pass@k against k (log axis, with 95% intervals) for the runs evaluated with k > 1 instead of the
    curves, and print their pass@j table."""


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
        "final_ci": interval_of(rows[-1], metric),
    }


def interval_of(row: dict[str, Any], metric: str) -> list[float] | None:
    """``[metric_ci_low, metric_ci_high]`` of a metrics record (None when it has none)."""
    lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    return None if lo is None or hi is None else [lo, hi]


def format_table(rows: list[dict[str, Any]], metric: str) -> str:
    header = (f"{'run':30s} {'evals':>5s} {'first':>7s} {'best':>7s} {'@step':>6s} {'final':>7s} {'@step':>6s} "
              f"{'wall min':>8s}  final 95% CI")
    lines = [f"{metric}", header, "-" * len(header)]
    for r in rows:
        if not r["evals"]:
            lines.append(f"{r['run'][:30]:30s} {0:5d}   (no evaluations)")
            continue
        lines.append(f"{r['run'][:30]:30s} {r['evals']:5d} {r['first']:7.3f} {r['best']:7.3f} {r['best_step']:6d} "
                     f"{r['final']:7.3f} {r['final_step']:6d} {r['minutes']:8.1f}  {bracket(r.get('final_ci'))}")
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


# ----------------------------------------------------------------------------------------------
# Evaluations: summary.json / results.jsonl of shell.evaluate folders and of training runs' final_eval/.


def evaluation_dir(run_dir: Path) -> Path | None:
    """Where a run's evaluation lies: the folder itself (shell.evaluate), else its ``final_eval/`` (None: neither)."""
    for folder in (run_dir, run_dir / "final_eval"):
        if (folder / "summary.json").is_file():
            return folder
    return None


def run_label(d: Path) -> str:
    """A folder's name in tables and legends: a run's ``final_eval/`` (or its ``greedy/``) is named after its run
    (``grpo_laptop/final_eval``), not as every other run's."""
    if d.name == "final_eval":
        return f"{d.parent.name}/final_eval"
    if d.name == "greedy" and d.parent.name == "final_eval":
        return f"{d.parent.parent.name}/final_eval/greedy"
    return d.name


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    folder = evaluation_dir(run_dir)
    return None if folder is None else json.loads((folder / "summary.json").read_text())


def figure_key(metric: str) -> str:
    """The summary.json key of a metrics key (``eval/answer_reward`` → ``answer_reward``)."""
    return metric.split("/", 1)[-1]


def format_evaluations(dirs: list[Path]) -> str:
    """One line per run with an evaluation: problems, k, and accuracy, pass@j, maj@k with their intervals."""
    lines = []
    for d in dirs:
        s = read_summary(d)
        if s is None:
            continue
        figures = ["accuracy", *(f for f in sampled_figures(s) if f in s and not f.startswith("avg@"))]
        cells = "  ".join(f"{f} {s[f]:.3f} {bracket(s.get('ci95', {}).get(f))}" for f in figures
                          if s.get(f) is not None)
        where = run_label(d) if evaluation_dir(d) == d else f"{d.name}/final_eval"
        lines.append(f"{where[:30]:30s} {s['num_examples']:5d} x {s.get('samples_per_problem', 1):<3d} {cells}")
    if not lines:
        return ""
    header = f"{'evaluation':30s} {'problems':>9s}  figure value [95% CI over problems]"
    return "\n".join([header, "-" * len(header), *lines])


def problem_table(run_dir: Path) -> tuple[list[Any], dict[str, list[float]]]:
    """A run's evaluation per problem: the ground truths, ``{figure: per-problem value}`` (accuracy,
    format_reward, pass@j, maj@k), problems in the order of their first result."""
    folder = evaluation_dir(run_dir)
    if folder is None or not (folder / "results.jsonl").is_file():
        raise ValueError(f"no results.jsonl in {run_dir} or {run_dir / 'final_eval'} (--paired compares evaluations: "
                         "run shell.evaluate, or a training run with --final-eval.enabled)")
    records = read_jsonl_records(folder / "results.jsonl")
    _, rows = per_problem_values(records)
    truths = {}
    for position, r in enumerate(records):
        truths.setdefault(r.get("index", ("row", position)), r.get("ground_truth"))
    keep = [f for f in (rows[0] if rows else {}) if f in ("accuracy", "format_reward") or f.startswith(("pass@", "maj@"))]
    return list(truths.values()), {f: [row[f][0] / row[f][1] for row in rows] for f in keep}


def paired_differences(dirs: list[Path], *, resamples: int = CI_RESAMPLES, seed: int = CI_SEED) -> list[dict[str, Any]]:
    """Each run's evaluation minus the first run's, on the same problems, per figure both have (pass@j for the
    j both reach, maj@k when both drew the same k): ``{run, figure, first, value, diff, low, high, excludes_zero}``.

    Raises:
        ValueError: fewer than two runs, or runs not evaluated on the same problems (count or ground truths).
    """
    if len(dirs) < 2:
        raise ValueError("--paired needs at least two runs (each compared with the first)")
    base_truths, base = problem_table(dirs[0])
    out = []
    for d in dirs[1:]:
        truths, values = problem_table(d)
        if len(truths) != len(base_truths) or any(json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)
                                                  for a, b in zip(truths, base_truths)):
            raise ValueError(f"{d} and {dirs[0]} were not evaluated on the same problems ({len(truths)} and "
                             f"{len(base_truths)} problems, or different answers at the same positions)")
        for figure in [f for f in base if f in values]:
            a = torch.tensor(base[figure], dtype=torch.float64)
            b = torch.tensor(values[figure], dtype=torch.float64)
            diff, lo, hi = core.paired_bootstrap_ci(a, b, resamples=resamples, seed=seed)
            out.append({"run": run_label(d), "figure": figure, "first": float(a.mean()), "value": float(b.mean()),
                        "diff": float(diff), "low": float(lo), "high": float(hi),
                        "excludes_zero": bool(lo > 0 or hi < 0), "problems": len(truths)})
    return out


def format_paired(first: str, rows: list[dict[str, Any]], resamples: int = CI_RESAMPLES) -> str:
    problems = rows[0]["problems"] if rows else 0
    header = (f"{'run':30s} {'figure':>13s} {'first':>7s} {'this':>7s} {'diff':>8s}  {'95% CI':19s} excludes 0")
    lines = [f"paired difference to {first} (the same {problems} problems resampled together, {resamples} resamples)",
             header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['run'][:30]:30s} {r['figure']:>13s} {r['first']:7.3f} {r['value']:7.3f} {r['diff']:+8.3f}  "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}]  {'yes' if r['excludes_zero'] else 'no'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Seeds.

_SEED_FREE = {("run", "seed"), ("run", "name"), ("run", "runs_dir"), ("run", "logger")}


def _config_key(run_dir: Path) -> str | None:
    path = run_dir / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    run = {k: v for k, v in (config.get("run") or {}).items() if ("run", k) not in _SEED_FREE}
    return json.dumps({**config, "run": run}, sort_keys=True, default=str)


def seed_groups(dirs: list[Path]) -> list[list[Path]]:
    """The runs grouped by their config.json without ``run.seed`` (and ``run.name``, ``run.runs_dir``,
    ``run.logger``), in order of first appearance; a run without config.json is a group of its own."""
    groups: dict[str, list[Path]] = {}
    for d in dirs:
        groups.setdefault(_config_key(d) or f"alone:{d}", []).append(d)
    return list(groups.values())


def group_label(group: list[Path]) -> str:
    return group[0].name if len(group) == 1 else f"{group[0].name} +{len(group) - 1} (seeds)"


def seed_curve(group: list[Path], metric: str, step_key: str) -> list[tuple[float, float, float, int]]:
    """``(x, mean, std, seeds)`` over a group's runs at each ``eval_step`` every run evaluated at (``x``: the step,
    or the mean of ``step_key`` over the runs there; std 0 for one run)."""
    per_run = [{r["eval_step"]: r for r in read_metrics(d) if "eval_step" in r and r.get(metric) is not None}
               for d in group]
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    out = []
    for step in common:
        values = [p[step][metric] for p in per_run]
        x = statistics.fmean(float(p[step].get(step_key, step)) for p in per_run)
        out.append((x, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)))
    return out


def format_groups(groups: list[list[Path]], metric: str) -> str:
    header = f"{'group':36s} {'seeds':>5s} {'final mean':>10s} {'± std':>7s} {'min':>7s} {'max':>7s} {'@step':>6s}"
    lines = [f"{metric} over seeds", header, "-" * len(header)]
    for g in groups:
        curve = seed_curve(g, metric, "eval_step")
        if not curve:
            lines.append(f"{group_label(g)[:36]:36s} {len(g):5d}   (no common evaluations)")
            continue
        finals = [s["final"] for s in (summarize_run(d, metric) for d in g) if s["evals"]]
        x, mean, std, n = curve[-1]
        lines.append(f"{group_label(g)[:36]:36s} {n:5d} {mean:10.3f} {std:7.3f} {min(finals):7.3f} {max(finals):7.3f} "
                     f"{int(x):6d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Figures.


def plot_report(dirs: list[Path], out: Path | str, metric: str, *, group_seeds: bool = False) -> Path:
    """``metric`` by step and by wall-clock time: one curve per run (or per seed group) with its band (the
    evaluations' 95% interval, or ± one std over seeds), each evaluation-only run as a flat band (its summary's
    value and interval). Without any training run: each evaluation's figures with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    evaluations = [d for d in dirs if d not in training and read_summary(d) is not None]
    if not training:
        return plot_evaluations(evaluations, out)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    groups = seed_groups(training) if group_seeds else [[d] for d in training]
    for group in groups:
        for ax, step_key in zip(axes[0], ("eval_step", "time/elapsed_s")):
            if group_seeds and len(group) > 1:
                pts = seed_curve(group, metric, step_key)
                if not pts:
                    continue
                xs, mean, std, _ = zip(*pts)
                line, = ax.plot(xs, mean, marker="o", markersize=3, label=f"{group_label(group)} (mean)")
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
                continue
            rows = [r for r in read_metrics(group[0]) if r.get(metric) is not None and step_key in r and "eval_step" in r]
            if not rows:
                continue
            line, = ax.plot([r[step_key] for r in rows], [r[metric] for r in rows], marker="o", markersize=3,
                            label=group[0].name)
            band = [(r[step_key], *interval_of(r, metric)) for r in rows if interval_of(r, metric)]
            if band:
                bx, lo, hi = zip(*band)
                ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for i, d in enumerate(evaluations):
        s = read_summary(d) or {}
        value, interval = s.get(figure_key(metric)), (s.get("ci95") or {}).get(figure_key(metric))
        if value is None:
            continue
        colour = f"C{(len(groups) + i) % 10}"  # after the curves' colours
        for ax in axes[0]:
            ax.axhline(value, color=colour, linestyle="--", linewidth=1, label=f"{run_label(d)} (evaluation)")
            if interval:
                ax.axhspan(interval[0], interval[1], color=colour, alpha=0.15, linewidth=0)
    for ax, step_key in zip(axes[0], ("eval_step", "time/elapsed_s")):
        ax.set_title(f"{metric} (bands: {'± std over seeds / ' if group_seeds else ''}95% CI)")
        ax.set_xlabel(step_key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=110)


def plot_evaluations(dirs: list[Path], out: Path | str) -> Path:
    """Each evaluation's accuracy, pass@j and maj@k as points with their 95% intervals, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    summaries = [(d, read_summary(d) or {}) for d in dirs]
    names: list[str] = []
    for _, s in summaries:
        for f in ["accuracy", *(f for f in sampled_figures(s) if not f.startswith("avg@"))]:
            if f in s and f not in names:
                names.append(f)
    width = 0.8 / max(1, len(summaries))
    for i, (d, s) in enumerate(summaries):
        xs, ys, err = [], [], [[], []]
        for j, f in enumerate(names):
            interval = (s.get("ci95") or {}).get(f)
            if s.get(f) is None or not interval:
                continue
            xs.append(j + (i - (len(summaries) - 1) / 2) * width)
            ys.append(s[f])
            err[0].append(s[f] - interval[0])
            err[1].append(interval[1] - s[f])
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=run_label(d))
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("value (95% CI over problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=110)


def pass_at_k_curves(dirs: list[Path]) -> list[dict[str, Any]]:
    """For each run evaluated with k > 1: ``{run, k, js, values, lows, highs}`` of its pass@j."""
    out = []
    for d in dirs:
        s = read_summary(d)
        if s is None or s.get("samples_per_problem", 1) < 2:
            continue
        js = [j for j in pass_at_ks(s["samples_per_problem"]) if f"pass@{j}" in s]
        intervals = [(s.get("ci95") or {}).get(f"pass@{j}") or [s[f"pass@{j}"]] * 2 for j in js]
        out.append({"run": run_label(d), "k": s["samples_per_problem"], "problems": s["num_examples"], "js": js,
                    "values": [s[f"pass@{j}"] for j in js], "lows": [i[0] for i in intervals],
                    "highs": [i[1] for i in intervals], "maj": s.get(f"maj@{s['samples_per_problem']}")})
    return out


def plot_pass_at_k(curves: list[dict[str, Any]], out: Path | str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        line, = ax.plot(c["js"], c["values"], marker="o", label=f"{c['run']} (k={c['k']})")
        ax.fill_between(c["js"], c["lows"], c["highs"], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({j for c in curves for j in c["js"]}), [str(j) for j in sorted({j for c in curves for j in c["js"]})])
    ax.set_xlabel("k (samples per problem, log scale)")
    ax.set_ylabel("pass@k (band: 95% CI over problems)")
    ax.set_title("pass@k")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=110)


def format_pass_at_k(curves: list[dict[str, Any]]) -> str:
    header = f"{'pass@k':30s} {'problems':>9s}  pass@j [95% CI over problems]"
    lines = [header, "-" * len(header)]
    for c in curves:
        cells = "  ".join(f"pass@{j} {v:.3f} [{lo:.3f}, {hi:.3f}]" for j, v, lo, hi in zip(c["js"], c["values"], c["lows"], c["highs"]))
        lines.append(f"{c['run'][:30]:30s} {c['problems']:5d} x {c['k']:<3d} {cells}")
    return "\n".join(lines)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(cfg: ReportConfig) -> list[dict[str, Any]]:
    dirs = [Path(d) for d in cfg.run_dirs]
    if not dirs:
        _fail("name at least one run folder: python -m shell.report runs/NAME [runs/OTHER …]")
    missing = [str(d) for d in dirs if not (d / "metrics.jsonl").exists()
               and not (not cfg.phases and read_summary(d) is not None)]
    if missing:
        _fail(f"no metrics.jsonl{'' if cfg.phases else ' (nor summary.json)'} in {', '.join(missing)}")
    if (not cfg.paired and not cfg.pass_at_k and not any(read_summary(d) is not None for d in dirs)
            and not any(r.get(cfg.metric) is not None for d in dirs for r in read_metrics(d))):
        _fail(f"no {cfg.metric} in {', '.join(map(str, dirs))} (nothing to draw; --metric names another key); "
              f"{cfg.out} left as it was")
    if cfg.phases:
        phases = plot_phases(dirs, cfg.out, cfg.metric)
        for d, p in zip(dirs, phases):
            print(format_phases(d.name, p, cfg.metric))
        print(f"wrote {cfg.out}")
        return [{"run": d.name, "phases": p} for d, p in zip(dirs, phases)]
    paired: list[dict[str, Any]] = []
    if cfg.paired:  # checked before anything is drawn
        try:
            paired = paired_differences(dirs)
        except ValueError as e:
            _fail(str(e))
    if cfg.pass_at_k:
        curves = pass_at_k_curves(dirs)
        if not curves:
            _fail("--pass-at-k: none of the runs was evaluated with more than one sample per problem "
                  "(shell.evaluate --samples-per-problem K, or --final-eval.samples-per-problem K)")
        plot_pass_at_k(curves, cfg.out)
        print(format_pass_at_k(curves))
    else:
        plot_report(dirs, cfg.out, cfg.metric, group_seeds=cfg.group_seeds)
    training = [d for d in dirs if (d / "metrics.jsonl").exists()]
    rows = [summarize_run(d, cfg.metric) for d in training]
    if rows:
        print(format_table(rows, cfg.metric))
    if cfg.group_seeds and training:
        print(format_groups(seed_groups(training), cfg.metric))
    table = format_evaluations(dirs)
    if table:
        print(table)
    if paired:
        print(format_paired(run_label(dirs[0]), paired))
    print(f"wrote {cfg.out}")
    return rows + [{"paired": r} for r in paired]


if __name__ == "__main__":
    main(tyro.cli(ReportConfig, description=__doc__.split("\n\n")[0], prog="python -m shell.report"))
