"""The run skeleton every training loop shares, composed of parts that each do one job:
:class:`shell.run_folder.RunFolder` (the folder, its lock and config guard),
:class:`shell.checkpoint.Checkpointer` (checkpoints of either layout, resume, ``final/``),
:class:`shell.schedule.Schedule` (the steps, the evaluation and checkpoint schedule, the budget, signals) and
:class:`shell.runlog.RunLogger` (``metrics.jsonl``, wandb, and cutting the logs back on resume).

A loop reads top-down as phases on a :class:`Run`::

    with Run(cfg, total_steps=n, plot=draw) as run:            # lock, guard, config checks: nothing loaded yet
        model, tokenizer, sampler = build_sampler(...)
        learner = Learner(model, tokenizer, cfg.optim)
        run.begin(learner, closing=[sampler.close])            # resume (or start) and open the logs
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

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from shell.checkpoint import Checkpointer, list_checkpoints
from shell.config import LoopConfig, RunConfig, asdict
from shell.lora import adapter_files
from shell.progress import say
from shell.run_folder import FREE_TO_CHANGE, RunFolder, RunLocked, config_changes
from shell.runlog import RunLogger, plot_curves, read_metrics
from shell.schedule import Schedule
from shell.steps import compiled_graph_count
from shell.update import Learner, Optimizer
from shell.world import World, close_world, init_world, main_first

__all__ = ["FREE_TO_CHANGE", "Run", "RunLocked", "config_changes", "write_curves"]


def write_curves(run_dir: Path, *, extra_panels: Sequence[tuple[str, str]] = ()) -> Path:
    """``curves.png``: train loss, held-out answer and format rewards, and ``extra_panels``."""
    panels = [("train/loss", "train_step"), ("eval/answer_reward", "eval_step"), ("eval/format_reward", "eval_step"),
              *extra_panels]
    return plot_curves([run_dir], run_dir / "curves.png", panels=panels)


class Run:
    """One training run: ``<runs_dir>/<name>/`` with ``metrics.jsonl``, ``generations.jsonl``, ``config.json``
    (+ ``config_history.jsonl``), ``checkpoints/step_XXXXXX/`` and ``final/``.

    ``with Run(...) as run`` opens the :class:`~shell.run_folder.RunFolder` (lock, no start over checkpoints
    without ``--resume``, the flags compared with the saved config on ``--resume``) before any model loads.
    :meth:`begin` then restores the newest intact checkpoint into the learner (weights, optimizer, schedule,
    RNG, :attr:`state`), cuts ``metrics.jsonl`` and ``generations.jsonl`` back to its step (so every step is
    logged once) and opens the logs.

    SIGTERM and SIGINT finish the current step (or warm-start step: :meth:`stop_if_signalled`), checkpoint it
    and exit 143 / 130 with the command to resume; a second signal abandons the step (the previous checkpoint
    stays); during the final evaluation (:meth:`final_phase`) a signal stops at once and ``--resume`` redoes it.
    ``--budget-hours`` ends the run after the last step that fits, with its evaluation, checkpoint and ``final/``.

    Under torchrun (:mod:`shell.world`) every rank enters the run: rank 0 takes the lock and checks the
    folder and flags (a refusal exits every rank), writes the logs, figures and ``final/``; checkpoints are
    sharded (each rank writes its part); the ranks agree after each step on a signal and on a budget stop.

    Args:
        config: the entry point's whole config; it holds ``run`` (:class:`RunConfig`) and ``loop`` (:class:`LoopConfig`).
        total_steps: the loop's steps (GRPO steps, SFT steps, EI steps).
        unit: what a step is called in messages.
        step_keys: the metrics keys that hold a record's loop step (for truncation on resume).
        plot: draws the run's figures from its folder (after each evaluation and at the end).
        fingerprints: the loop's data sets (name → :func:`shell.fingerprint.records_fingerprint`), stored in
            ``data_fingerprint.json`` and compared on ``--resume`` (None: not checked).
    """

    def __init__(
        self, config: Any, *, total_steps: int, unit: str = "step",
        step_keys: Sequence[str] = ("train_step", "eval_step"), plot: Callable[[Path], Any] | None = None,
        fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.run_cfg: RunConfig = config.run
        self.loop: LoopConfig = config.loop
        self.step_keys = tuple(step_keys)
        self.plot = plot
        self.dir = Path(self.run_cfg.runs_dir) / self.run_cfg.name
        self.folder = RunFolder(self.dir, config, fingerprints=fingerprints)
        self.schedule = Schedule(self.loop, total=total_steps, unit=unit, name=self.run_cfg.name)
        self.schedule.module = config.__class__.__module__
        self.resumed = False
        """Did :meth:`begin` restore a checkpoint (possibly one of the set-up: step 0, mid-warm-start)?"""
        self.state: dict[str, Any] = {}
        """The loop's own state (e.g. expert iteration's SFT step count): saved with every checkpoint, restored on resume."""
        self.learner: Learner | None = None
        self.checkpointer: Checkpointer | None = None
        self.world = World()
        """This process's place under torchrun (one rank of one without it)."""
        self.logger: RunLogger | None = None
        self.closing: list[Callable[[], Any]] = []

    # ------------------------------------------------------------------------------------------ the schedule's

    @property
    def start(self) -> int:
        """The step the run (re)starts after: 0, or the resumed checkpoint's."""
        return self.schedule.start

    @property
    def completed(self) -> int:
        return self.schedule.completed

    @property
    def reserve_s(self) -> float:
        """Seconds to keep free of the budget for the work after the last step (the final evaluation)."""
        return self.schedule.reserve_s

    @reserve_s.setter
    def reserve_s(self, seconds: float) -> None:
        self.schedule.reserve_s = seconds

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far (across resumes)."""
        return self.schedule.elapsed

    def steps(self) -> Iterator[int]:
        """The steps still to run (``start + 1 … total``), with a progress bar on a terminal; ends early after
        the step a ``--budget-hours`` stop chose, and exits after a step when a signal asked it to."""
        return self.schedule.steps(on_signal=self._stop_for_signal)

    def is_last(self, step: int) -> bool:
        return self.schedule.is_last(step)

    def eval_due(self, step: int) -> bool:
        return self.schedule.eval_due(step)

    def checkpoint_if_due(self, step: int) -> None:
        """Checkpoint every ``--checkpoint-every`` steps (the last step's checkpoint is :meth:`finish`'s)."""
        if self.schedule.checkpoint_due(step):
            self.checkpoint(step)

    # ------------------------------------------------------------------------------------------ open/close

    def __enter__(self) -> Run:
        self.world = init_world()
        self.schedule.world_size, self.schedule.local_size = self.world.size, self.world.local_size
        folder = self.folder

        def open_folder() -> tuple[Any, Any, Any]:
            return folder.open(), folder.data_changes, folder.config_lost

        # every rank applies the accepted changes
        folder.changes, folder.data_changes, folder.config_lost = main_first(open_folder)
        self.schedule.install_signal_handlers()
        return self

    def begin(self, learner: Learner, *, closing: Sequence[Callable[[], Any]] = ()) -> Run:
        """Attach the learner: resume from the newest intact checkpoint (or start fresh) and open the logs.
        ``closing`` runs when the run closes (e.g. the sampler's ``close``)."""
        self.learner = learner
        self.closing = list(closing)
        self.checkpointer = Checkpointer(self.dir, model=learner.model, tokenizer=learner.tokenizer,
                                         optimizer=learner.optimizer.optimizer, scheduler=learner.optimizer.scheduler,
                                         keep_last=self.loop.keep_checkpoints,
                                         weights=adapter_files(learner.model, learner.tokenizer))
        resumed = False
        if self.loop.resume:
            ckpt = self.checkpointer.resume()
            if ckpt is None:
                say(f"--resume: no checkpoint in {self.dir}; starting from scratch")
            else:
                self.schedule.resume(ckpt.step, elapsed=ckpt.state.elapsed)
                self.state = dict(ckpt.state.loop)
                self.schedule.reserve_s = float(self.state.get("reserve_s", 0.0))
                resumed = self.resumed = True
                warm = self.state.get("warm_start_step")
                say(f"resumed from {ckpt.path} ({self.schedule.unit} {ckpt.step}"
                    + (f", warm-start step {warm})" if ckpt.step == 0 and warm else ")"))
                if self.folder.accepted:
                    learner.optimizer.apply(learner.optim)
                    if self.world.main:
                        self.folder.record_changes(self.start)
        if not self.world.main:  # rank 0 writes the logs
            return self
        if not resumed:
            self.folder.forget_history()
            self.folder.write_fingerprints()
        self.logger = RunLogger(self.dir, logger=self.run_cfg.logger, config=asdict(self.config), save_config=not resumed,
                                resume_step=self.start if resumed else None, step_keys=self.step_keys,
                                elapsed_offset=self.elapsed, generations_name="generations.jsonl")
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, FloatingPointError):
            kept = list_checkpoints(self.dir)
            kept = kept[-1] if kept else None
            say(f"stopped: {exc}. " + (f"The last good checkpoint is {kept}; " if kept else "")
                + "nothing was written to final/.")
        self.close(clean=kind is None)

    def close(self, *, clean: bool = True) -> None:
        """Close the logger, the samplers and the lock, and leave the process group (after every rank got here,
        when ``clean``: the run ended normally)."""
        self.schedule.restore_signal_handlers()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        for fn in self.closing:
            fn()
        self.closing = []
        self.folder.release(started=self.learner is not None)
        close_world(wait=clean)

    def _stop_for_signal(self, step: int, *, optimizer: Optimizer | None = None) -> None:
        """Checkpoint ``step`` (unless it is the newest checkpoint already; at step 0, the warm start's progress),
        say how to resume, exit 128 + signal."""
        warm = self.state.get("warm_start_step", 0)
        if step > 0:
            where = f"checkpoint {self._checkpoint_unless_newest(step)}"
        elif warm:
            where = f"checkpoint {self.checkpoint(0, optimizer=optimizer)} (warm-start step {warm})"
        else:
            where = "nothing to save yet (no step had completed)"
        self.schedule.exit_for_signal(step, where, module=self.config.__class__.__module__)

    def stop_if_signalled(self, step: int, *, optimizer: Optimizer | None = None) -> None:
        """After a piece of the set-up (a warm-start step; every rank calls it): when a signal came, checkpoint
        (with ``optimizer``, the warm start's own, when given) and exit 128 + signal with the command to resume."""
        if self.schedule.signalled():
            self._stop_for_signal(step, optimizer=optimizer)

    @contextlib.contextmanager
    def final_phase(self) -> Iterator[None]:
        """The final evaluation (after :meth:`finish`): a signal stops it at once, exit 128 + signal; ``--resume``
        redoes it (its records appear once)."""
        self.schedule.phase = "final"
        try:
            yield
        finally:
            self.schedule.phase = "finish"

    # ------------------------------------------------------------------------------------------ records

    def log(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Append a record to ``metrics.jsonl`` (and wandb): rank 0 writes, the other ranks' records are dropped."""
        if not self.world.main:
            return metrics
        assert self.logger is not None, "log() needs a begun Run"
        return self.logger.log(metrics)

    def say(self, text: str) -> None:
        say(text)

    def draw(self) -> None:
        if self.plot is not None and self.world.main:
            self.plot(self.dir)

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.dir / "metrics.jsonl")

    def checkpoint(self, step: int, *, optimizer: Optimizer | None = None) -> Path:
        """Write ``checkpoints/step_{step}``: weights, tokenizer, optimizer + schedule (``optimizer``'s when given:
        the warm start's own), RNG, elapsed time and :attr:`state`."""
        assert self.checkpointer is not None, "checkpoint() needs a begun Run"
        if optimizer is None:
            return self.checkpointer.save(step, elapsed=self.elapsed, loop=self.state)
        return self.checkpointer.save(step, elapsed=self.elapsed, loop=self.state, optimizer=optimizer.optimizer,
                                      scheduler=optimizer.scheduler)

    def _checkpoint_unless_newest(self, step: int) -> Path:
        assert self.checkpointer is not None
        return self.checkpointer.save_unless_newest(step, elapsed=self.elapsed, loop=self.state)

    def finish(self) -> Path:
        """The last checkpoint, ``final/`` (the policy and tokenizer, loadable by ``shell.evaluate`` and vLLM)
        and the figures; returns the run folder."""
        assert self.learner is not None and self.checkpointer is not None
        step = self.completed
        self.schedule.phase = "finish"
        path = self._checkpoint_unless_newest(step)
        self.checkpointer.final()
        self.draw()
        if self.schedule.signalled():  # came while the last checkpoint and final/ were written: both are whole
            self.schedule.exit_for_signal(step, f"checkpoint {path} and {self.dir / 'final'} are written (a final "
                                                f"evaluation, if any, is not)", module=self.config.__class__.__module__)
        if self.learner.optim.compile:
            say(f"torch.compile: {compiled_graph_count()} graph(s) compiled in this process")
        if self.schedule.stopped_by_budget:
            say(f"stopped by --budget-hours after {self.schedule.unit} {step} of {self.schedule.total} "
                f"({self.elapsed / 60:.1f} min)")
        say(f"done: {self.dir / 'metrics.jsonl'}, {self.dir / 'final'}")
        return self.dir
