"""The run skeleton every training loop shares: the run folder and its guard, resume (weights, optimizer,
schedule, RNG and the loop's own state), the metrics logger, the evaluation and checkpoint schedule, the
final save, progress, and closing.

A loop reads top-down as phases on a :class:`Run`::

    with Run(cfg, learner, total_steps=n, closing=[sampler.close]) as run:
        if run.start == 0:
            evaluate(0)
        for step in run.steps():
            ...rollout → score → train...
            run.log({...})
            if run.eval_due(step): evaluate(step)
            run.checkpoint_if_due(step)
        run.finish()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shell.checkpoint import load_latest_checkpoint, save_checkpoint, save_pretrained_atomic
from shell.config import LoopConfig, RunConfig, asdict
from shell.files import atomic_write_text
from shell.progress import progress_bar, say
from shell.runlog import RunLogger, plot_curves, read_metrics
from shell.steps import compiled_graph_count
from shell.update import Learner

__all__ = ["Run", "write_curves"]


def write_curves(run_dir: Path, *, extra_panels: Sequence[tuple[str, str]] = ()) -> Path:
    """``curves.png``: train loss, held-out answer and format rewards, and ``extra_panels``."""
    panels = [("train/loss", "train_step"), ("eval/answer_reward", "eval_step"), ("eval/format_reward", "eval_step"),
              *extra_panels]
    return plot_curves([run_dir], run_dir / "curves.png", panels=panels)


class Run:
    """One training run: ``<runs_dir>/<name>/`` with ``metrics.jsonl``, ``generations.jsonl``, ``config.json``,
    ``checkpoints/step_XXXXXX/`` and ``final/``.

    Opening it (``with Run(...) as run``) refuses to start over a run that has checkpoints unless
    ``--resume``; with ``--resume`` it loads the newest checkpoint into the learner (weights, optimizer,
    schedule, RNG), sets :attr:`start` and :attr:`state` (the loop's own saved state) and truncates
    ``metrics.jsonl`` and ``generations.jsonl`` to that step, so every step is logged once.

    Args:
        config: the entry point's whole config (``config.json``, wandb); it holds ``run`` (:class:`RunConfig`)
            and ``loop`` (:class:`LoopConfig`).
        learner: the policy and optimizer that checkpoints save and resume restores.
        total_steps: the loop's steps (GRPO steps, SFT steps, EI steps).
        unit: what a step is called in messages.
        step_keys: the metrics keys that hold a record's loop step (for truncation on resume).
        plot: draws the run's figures from its folder (after each evaluation and at the end).
        closing: called when the run closes (e.g. the sampler's ``close``).
    """

    def __init__(
        self, config: Any, learner: Learner, *, total_steps: int, unit: str = "step",
        step_keys: Sequence[str] = ("train_step", "eval_step"), plot: Callable[[Path], Any] | None = None,
        closing: Sequence[Callable[[], Any]] = (),
    ) -> None:
        self.config = config
        self.run_cfg: RunConfig = config.run
        self.loop: LoopConfig = config.loop
        self.learner = learner
        self.total = total_steps
        self.unit = unit
        self.step_keys = tuple(step_keys)
        self.plot = plot
        self.closing = list(closing)
        self.dir = Path(self.run_cfg.runs_dir) / self.run_cfg.name
        self.start = 0
        self.state: dict[str, Any] = {}
        self.logger: RunLogger | None = None
        self._bar: Any = None

    # ------------------------------------------------------------------------------------------ open/close

    def __enter__(self) -> Run:
        resumed = self._restore()
        if self.start == 0:
            (self.dir / "generations.jsonl").unlink(missing_ok=True)
        else:
            self._truncate_generations(self.start)
        self.logger = RunLogger(self.dir, logger=self.run_cfg.logger, config=asdict(self.config),
                                resume_step=self.start if resumed else None, step_keys=self.step_keys,
                                elapsed_offset=float(self.state.get("elapsed", 0.0)))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        for fn in self.closing:
            fn()
        self.closing = []

    def _restore(self) -> bool:
        """Load the newest checkpoint when resuming; refuse to overwrite checkpoints otherwise."""
        has_checkpoints = any((self.dir / "checkpoints").glob("step_*"))
        if not self.loop.resume:
            if has_checkpoints:
                raise SystemExit(f"{self.dir} already holds checkpoints: pass --resume to continue it "
                                 f"or choose another --run.name")
            return False
        ckpt = load_latest_checkpoint(self.dir, model=self.learner.model)
        if ckpt is None:
            say(f"--resume: no checkpoint in {self.dir}; starting from scratch")
            return False
        self.learner.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.start = ckpt.step
        self.state = dict(ckpt.state.get("loop", {}))
        self.state["elapsed"] = float(ckpt.state.get("elapsed", 0.0))
        say(f"resumed from {ckpt.path} ({self.unit} {ckpt.step})")
        return True

    def _truncate_generations(self, step: int) -> None:
        path = self.dir / "generations.jsonl"
        if path.exists():
            lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
            atomic_write_text(path, "".join(x + "\n" for x in lines))

    # ------------------------------------------------------------------------------------------ schedule

    def steps(self) -> Iterator[int]:
        """The steps still to run (``start + 1 … total``), with a progress bar on a terminal."""
        self._bar = progress_bar(total=self.total, initial=self.start, desc=self.run_cfg.name, unit=self.unit)
        try:
            for step in range(self.start + 1, self.total + 1):
                yield step
                self._bar.update(1)
        finally:
            self._bar.close()
            self._bar = None

    def eval_due(self, step: int) -> bool:
        """Evaluate after this step? Every ``--eval-every`` steps and after the last."""
        return step % self.loop.eval_every == 0 or step == self.total

    def checkpoint_if_due(self, step: int, **loop_state: Any) -> None:
        """Checkpoint every ``--checkpoint-every`` steps (the last step's checkpoint is :meth:`finish`'s)."""
        if self.loop.checkpoint_every and step % self.loop.checkpoint_every == 0 and step != self.total:
            self.checkpoint(step, **loop_state)

    # ------------------------------------------------------------------------------------------ records

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far (across resumes)."""
        assert self.logger is not None
        return self.logger.elapsed

    def log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        assert self.logger is not None, "log() needs an open Run"
        return self.logger.log(metrics)

    def say(self, text: str) -> None:
        say(text)

    def draw(self) -> None:
        if self.plot is not None:
            self.plot(self.dir)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir / "metrics.jsonl")

    def checkpoint(self, step: int, **loop_state: Any) -> Path:
        """Write ``checkpoints/step_{step}``: weights, tokenizer, optimizer + schedule, RNG, elapsed time and
        ``loop_state`` (what :attr:`state` returns on resume)."""
        state = {"optimizer": self.learner.optimizer.state_dict(), "elapsed": self.elapsed, "loop": loop_state}
        return save_checkpoint(self.dir, step, model=self.learner.model, tokenizer=self.learner.tokenizer, state=state,
                               keep_last=self.loop.keep_checkpoints)

    def finish(self, **loop_state: Any) -> Path:
        """The last checkpoint, ``final/`` (the policy and tokenizer, loadable by ``shell.evaluate`` and vLLM)
        and the figures; returns the run folder."""
        self.checkpoint(self.total, **loop_state)
        save_pretrained_atomic(self.learner.model, self.learner.tokenizer, self.dir / "final")
        self.draw()
        if self.learner.optim.compile:
            say(f"torch.compile: {compiled_graph_count()} graph(s) compiled in this process")
        say(f"done: {self.dir / 'metrics.jsonl'}, {self.dir / 'final'}")
        return self.dir
