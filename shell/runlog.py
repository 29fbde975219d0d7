"""Run directories, metrics.jsonl, wandb (optional, offline without a key) and PNG curves.

Every loop writes ``./runs/<run name>/metrics.jsonl``: one JSON object a line, ``train/…`` keys with
``train_step`` or ``eval/…`` keys with ``eval_step``, plus ``time/elapsed_s`` (wall-clock seconds
since the run began, carried across resumes). wandb gets the same keys.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from shell.files import LinkRefused, append_text, atomic_write_bytes, atomic_write_jsonl, atomic_write_text

LoggerName = Literal["wandb", "none"]


def read_jsonl_records(path: Path | str) -> list[dict[str, Any]]:
    """The records of a jsonl log (a missing file gives []). A torn last line (the process was killed while
    writing it) is dropped with a warning; a bad line elsewhere raises ``ValueError`` naming ``file:line``."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) or all(not x.strip() for x in lines[i:]):
                warnings.warn(f"{path}:{i}: dropped a torn last line (the run was killed while writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}:{i}: not a JSON record ({e.msg})") from None
    return rows


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of ``<folder>/metrics.jsonl``); see :func:`read_jsonl_records`."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return read_jsonl_records(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class RunLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` (and wandb), and draws the run's curves.

    Args:
        run_dir: the run's folder (created).
        logger: ``"wandb"`` (offline unless a key is configured) or ``"none"``.
        config: the run's configuration, sent to wandb (and saved as ``config.json`` with ``save_config``).
        resume_step: on resume, the step of the checkpoint: later records (from the part of the run
            that was lost) are dropped from the metrics and the generations log, so both read as if the run
            never stopped; None: a fresh start, both logs begin empty.
        step_keys: the keys holding a metrics record's step, for ``resume_step`` (the first one present counts).
        redone_on_resume: key prefixes of records a resumed run always writes again, dropped on resume whatever
            their step: the final evaluation's (``final/…``, ``final_greedy/…``), which a resume redoes.
        elapsed_offset: wall-clock seconds already spent before a resume.
        project: the wandb project.
        metrics_name: the metrics file in ``run_dir``.
        generations_name: the run's generations log in ``run_dir`` (its records' step is ``step``), cut back
            with the metrics; None: this logger has none.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        logger: LoggerName = "none",
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        step_keys: Sequence[str] = ("train_step", "eval_step"),
        elapsed_offset: float = 0.0,
        project: str = "reasoning-rl",
        metrics_name: str = "metrics.jsonl",
        generations_name: str | None = None,
        save_config: bool = True,
        redone_on_resume: Sequence[str] = ("final/", "final_greedy/"),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / metrics_name
        self._t0 = time.monotonic() - elapsed_offset
        generations = None if generations_name is None else self.run_dir / generations_name
        if resume_step is None:
            atomic_write_text(self.metrics_path, "")  # a link planted there is replaced, never truncated through
            if generations is not None:
                generations.unlink(missing_ok=True)
        else:
            if self.metrics_path.is_symlink():
                raise LinkRefused(self.metrics_path)
            redone = tuple(redone_on_resume)
            kept = [r for r in read_metrics(self.metrics_path) if step_of(r, step_keys) <= resume_step
                    and not (redone and any(k.startswith(redone) for k in r))]
            atomic_write_jsonl(self.metrics_path, kept)
            if generations is not None and generations.exists():
                atomic_write_jsonl(generations, [r for r in read_jsonl_records(generations)
                                                 if r.get("step", 0) <= resume_step])
        if config is not None and save_config:
            atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=2, default=str) + "\n")
        self._wandb = None
        if logger == "wandb":
            import wandb  # imported only when asked for

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=project,
                name=self.run_dir.name,
                dir=str(self.run_dir),
                config=config,
                mode=_wandb_mode(),
                resume="allow",
                id=self.run_dir.name.replace("/", "-"),
            )
            self._wandb.define_metric("train_step")
            self._wandb.define_metric("eval_step")
            self._wandb.define_metric("train/*", step_metric="train_step")
            self._wandb.define_metric("eval/*", step_metric="eval_step")
        elif logger != "none":
            raise ValueError(f"unknown logger {logger!r}; expected 'wandb' or 'none'")

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds since the run began (across resumes)."""
        return time.monotonic() - self._t0

    def log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append one record (``train/…`` keys with ``train_step``, or ``eval/…`` with ``eval_step``)."""
        record = {k: _jsonable(v) for k, v in metrics.items()}
        record.setdefault("time/elapsed_s", round(self.elapsed, 3))
        append_text(self.metrics_path, json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(record)
        return record

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def step_of(record: dict[str, Any], keys: Sequence[str] = ("train_step", "eval_step")) -> int:
    """The step of a metrics record: the value of the first of ``keys`` it holds (-1 if none)."""
    for key in keys:
        if key in record:
            return int(record[key])
    return -1


def plot_curves(
    run_dirs: Sequence[Path | str],
    out_path: Path | str,
    *,
    panels: Iterable[tuple[str, str]] = (("train/loss", "train_step"), ("eval/answer_reward", "eval_step")),
    labels: Sequence[str] | None = None,
    metrics_name: str = "metrics.jsonl",
) -> Path:
    """Draw ``(key, step_key)`` panels from one or more runs' metrics into one PNG (atomically).

    ``step_key`` may be ``time/elapsed_s`` for a wall-clock axis. Missing keys leave a panel empty. Where the
    records hold ``{key}_ci_low`` and ``{key}_ci_high`` (the evaluations' 95% intervals) the curve gets that band.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(panels)
    out_path = Path(out_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(Path(run_dir) / metrics_name)
        label = labels[i] if labels else Path(run_dir).name
        for ax, (key, step_key) in zip(axes[0], panels):
            pts = [(r[step_key], r[key]) for r in rows if key in r and step_key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                line, = ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
                band = [(r[step_key], r[f"{key}_ci_low"], r[f"{key}_ci_high"]) for r in rows
                        if step_key in r and r.get(f"{key}_ci_low") is not None and r.get(f"{key}_ci_high") is not None]
                if band:
                    bx, lo, hi = zip(*band)
                    ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    for ax, (key, step_key) in zip(axes[0], panels):
        ax.set_title(key)
        ax.set_xlabel(step_key)
        ax.grid(alpha=0.3)
        if len(run_dirs) > 1:
            ax.legend(fontsize=7)
    return save_figure(fig, out_path, dpi=110)


def save_figure(fig: Any, out_path: Path | str, *, dpi: int) -> Path:
    """Write a matplotlib figure as a PNG (atomically: a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(out_path), buffer.getvalue())
    return Path(out_path)
