"""The schedule of a run's steps: which steps remain, when to evaluate and checkpoint, the wall-clock budget
(``--budget-hours``) and SIGTERM/SIGINT.

A signal finishes the current step (an RL step, a warm-start step, the last checkpoint and ``final/``); the run
then checkpoints it and exits 128 + the signal's number with the command to resume
(:meth:`Schedule.exit_for_signal`); a second signal abandons the step. During the final evaluation (which
``--resume`` redoes) a signal stops at once. Under torchrun the ranks agree after each step on a signal any of
them received, and rank 0 decides a budget stop for all.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shell.config import LoopConfig
from shell.progress import progress_bar, say
from shell.world import from_main, gather

__all__ = ["Schedule", "process_age"]


def process_age() -> float:
    """Seconds since this process started when it is an entry point (``python -m shell.<loop>``, Linux
    ``/proc``), else 0: a run's clock starts with its process, so ``--budget-hours`` and ``time/elapsed_s``
    count imports and loading too (a loop called from a notebook counts from the call)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or not str(spec.name).startswith("shell."):
        return 0.0
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return 0.0


class Schedule:
    """Steps ``start + 1 … total`` of a run, the evaluation and checkpoint schedule of ``loop``, the budget and
    the signals.

    Args:
        loop: the schedule flags (``--eval-every --checkpoint-every --budget-hours``).
        total: the run's steps.
        unit: what a step is called in messages.
        name: the progress bar's label.
    """

    def __init__(self, loop: LoopConfig, *, total: int, unit: str = "step", name: str = "run") -> None:
        self.loop = loop
        self.total = total
        self.unit = unit
        self.name = name
        self.start = 0
        self.completed = 0
        self.reserve_s = 0.0
        """Seconds to keep free of the budget for the work after the last step (the final evaluation)."""
        self.world_size = 1
        self.local_size = 1
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._budget_stop: int | None = None
        self._judged: tuple[int, bool] | None = None  # (step, is it the last): the budget is judged once a step
        self.phase = "setup"
        """What the run does now: ``setup`` (loading, the warm start, the first evaluation), ``steps``, ``finish``
        (the last checkpoint and ``final/``) or ``final`` (the final evaluation: a signal stops it at once)."""
        self.doing: str | None = None
        """The piece of the set-up under way, for a signal's message (e.g. ``warm-start step 3``)."""
        self.module = ""
        """The entry point's module, for the command that resumes the run."""
        self._step_seconds: list[float] = []
        self._elapsed_before = 0.0
        self._t0 = time.monotonic() - process_age()

    def resume(self, step: int, *, elapsed: float) -> None:
        """Continue after ``step``, with ``elapsed`` seconds already spent before this process."""
        self.start = self.completed = step
        self._elapsed_before = elapsed

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far (across resumes)."""
        return self._elapsed_before + time.monotonic() - self._t0

    # ------------------------------------------------------------------------------------------ steps

    def steps(self, on_signal: Callable[[int], Any]) -> Iterator[int]:
        """The steps still to run, with a progress bar on a terminal; ends early after the step a budget stop
        chose. After a step (or before the first, for a signal during the set-up) that a signal interrupted,
        ``on_signal(step)`` runs: it checkpoints and exits (:meth:`exit_for_signal`)."""
        self._agree_on_signal()
        if self._signal is not None:  # a signal during the set-up (warm start, first evaluation)
            on_signal(self.start)
        bar = progress_bar(total=self.total, initial=self.start, desc=self.name, unit=self.unit)
        self.phase = "steps"
        try:
            for step in range(self.start + 1, self.total + 1):
                t0 = time.monotonic()
                yield step
                self._step_seconds.append(time.monotonic() - t0)
                self.completed = step
                bar.update(1)
                self._agree_on_signal()
                if self._signal is not None:
                    on_signal(step)
                if self._budget_stop == step:
                    return
        finally:
            self.phase = "finish"
            bar.close()

    def over_share(self, share: float, typical: float) -> bool:
        """Would more work of ``typical`` seconds end past ``share`` of ``--budget-hours`` (the warm start's part of
        the budget)? False without a budget; rank 0 decides for all."""
        if self.loop.budget_hours is None:
            return False
        return bool(from_main(self.elapsed + typical > share * self.loop.budget_hours * 3600))

    def is_last(self, step: int) -> bool:
        """Is ``step`` the run's last: the final one, or the last that fits ``--budget-hours`` (judged from the
        median step time and :attr:`reserve_s`)?"""
        if step == self.total or self._budget_stop == step:
            return True
        if self.loop.budget_hours is None or self._budget_stop is not None:
            return False
        if self._judged is not None and self._judged[0] == step:  # one decision a step: its evaluation and
            return self._judged[1]                                 # checkpoint agree, one collective a step
        budget = self.loop.budget_hours * 3600
        typical = statistics.median(self._step_seconds) if self._step_seconds else 0.0
        last = from_main(self.elapsed + typical + self.reserve_s > budget)  # rank 0 decides for all
        self._judged = (step, last)
        if last:
            self._budget_stop = step
            say(f"--budget-hours {self.loop.budget_hours:g}: {self.elapsed / 60:.1f} min used, another {self.unit} "
                f"(~{typical / 60:.1f} min) and the final work (~{self.reserve_s / 60:.1f} min) would not fit: "
                f"{self.unit} {step} is the last")
        return last

    @property
    def stopped_by_budget(self) -> bool:
        return self._budget_stop is not None

    def eval_due(self, step: int) -> bool:
        """Evaluate after this step? Every ``--eval-every`` steps and after the last."""
        return step % self.loop.eval_every == 0 or self.is_last(step)

    def checkpoint_due(self, step: int) -> bool:
        """Checkpoint after this step? Every ``--checkpoint-every`` steps but the last (whose checkpoint is the
        run's finish)."""
        return bool(self.loop.checkpoint_every) and step % self.loop.checkpoint_every == 0 and not self.is_last(step)

    # ------------------------------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        if os.name != "posix" or signal.getsignal(signal.SIGINT) is None:
            return
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            self._old_handlers.clear()

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            say(f"{name} again: abandoning this step; the last checkpoint stays as it was")
            self.restore_signal_handlers()
            raise SystemExit(128 + signum)
        self._signal = signum
        if self.phase == "final":  # nothing to finish: the checkpoint and final/ are written, --resume redoes it
            say(f"{name} during the final evaluation: stopping now; the checkpoint of {self.unit} {self.completed} and "
                f"final/ are saved, the final evaluation is not. Continue with: {self.resume_command()} (it redoes "
                f"the final evaluation)")
            self.restore_signal_handlers()
            raise SystemExit(128 + signum)
        doing = {"steps": f"{self.unit} {self.completed + 1}", "finish": "the last checkpoint and final/"}.get(
            self.phase, self.doing or "the set-up")
        say(f"{name}: finishing {doing}, then checkpointing and stopping (send it again to abandon it)")

    def signalled(self) -> bool:
        """Did a signal come (on any rank, under torchrun: every rank calls it at the same point)?"""
        self._agree_on_signal()
        return self._signal is not None

    def _agree_on_signal(self) -> None:
        """Under torchrun: a signal any rank received stops every rank after the same step."""
        if self.world_size > 1:
            self._signal = max(gather(self._signal or 0)) or None

    def exit_for_signal(self, step: int, where: str, *, module: str) -> None:
        """Say what was saved (``where``) and the command that continues the run, and exit 128 + the signal."""
        signum = self._signal
        assert signum is not None
        say(f"stopped by {signal.Signals(signum).name} after {self.unit} {step}: {where}. Continue with: "
            f"{self.resume_command(module)}")
        raise SystemExit(128 + signum)

    def resume_command(self, module: str = "") -> str:
        """The command line that continues this run (its own arguments and ``--resume``)."""
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else (module or self.module)
        args = [a for a in (sys.argv[1:] if sys.argv and sys.argv[0].endswith(".py") else []) if a != "--resume"]
        launcher = "python -m" if self.world_size == 1 else f"torchrun --nproc-per-node {self.local_size} -m"
        return " ".join([launcher, module, *args, "--resume"])
