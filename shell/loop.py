"""The run skeleton every training loop shares: the run folder, its lock and guard, honest resume
(weights, optimizer, schedule, RNG and the loop's own state; changed flags refused or recorded), the
metrics logger, the evaluation and checkpoint schedule, the wall-clock budget, SIGTERM/SIGINT, the final
save, progress, and closing.

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

import datetime
import json
import os
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shell.checkpoint import (
    list_checkpoints, load_latest_checkpoint, remove_stale_temporaries, save_checkpoint, save_pretrained_atomic,
)
from shell.config import LoopConfig, RunConfig, asdict
from shell.distributed import (
    World, check_resume_world, close_world, from_main, gather, init_world, is_sharded, load_sharded_checkpoint,
    main_first, save_sharded_checkpoint,
)
from shell.files import atomic_write_jsonl
from shell.progress import progress_bar, say
from shell.runlog import RunLogger, plot_curves, read_jsonl_records, read_metrics
from shell.steps import compiled_graph_count
from shell.update import Learner

__all__ = ["FREE_TO_CHANGE", "Run", "RunLocked", "config_changes", "write_curves"]

FREE_TO_CHANGE = ("loop.", "run.logger", "run.runs_dir", "grading.", "sampler.batch_size", "model.device",
                  "sampler.placement", "sampler.gpu_memory_utilization", "sampler.vllm_device", "sampler.sleep",
                  "sampler.kv_cache_gib", "sampler.enforce_eager", "num_steps", "n_grpo_steps", "n_ei_steps", "epochs")
"""Config fields (dotted prefixes) a resumed run may change freely: they do not change what is trained
(the schedule flags, logging, grading workers, where vLLM runs and its memory, the number of steps)."""


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


class RunLocked(ValueError):
    """Another process holds the run folder."""


def write_curves(run_dir: Path, *, extra_panels: Sequence[tuple[str, str]] = ()) -> Path:
    """``curves.png``: train loss, held-out answer and format rewards, and ``extra_panels``."""
    panels = [("train/loss", "train_step"), ("eval/answer_reward", "eval_step"), ("eval/format_reward", "eval_step"),
              *extra_panels]
    return plot_curves([run_dir], run_dir / "curves.png", panels=panels)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields (dotted) whose value differs between two config dicts and that change training: ``field -> (old, new)``."""
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(new, default=str)))
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return {k: v for k, v in changed.items() if not k.startswith(FREE_TO_CHANGE)}


class _Lock:
    """An exclusive ``flock`` on ``<run>/.lock`` holding the owner's pid and host; the OS releases it when the
    process ends, however it ends, so a crashed run never leaves a stale lock."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a link
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by {holder}: wait for it to finish, or choose another "
                            f"--run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Run:
    """One training run: ``<runs_dir>/<name>/`` with ``metrics.jsonl``, ``generations.jsonl``, ``config.json``
    (+ ``config_history.jsonl``), ``checkpoints/step_XXXXXX/`` and ``final/``.

    ``with Run(...) as run`` takes the folder's lock (a second process exits at once, naming the holder),
    refuses to start over a run that has checkpoints unless ``--resume``, and on ``--resume`` compares the
    flags with the saved config: a change that alters training is refused (naming each field old → new)
    unless ``--allow-config-change``, which records it and applies it. All of that happens before any model
    loads. :meth:`begin` then restores the newest intact checkpoint into the learner (weights, optimizer,
    schedule, RNG, :attr:`state`), truncates ``metrics.jsonl`` and ``generations.jsonl`` to its step (so
    every step is logged once) and opens the logs.

    SIGTERM and SIGINT finish the current step, checkpoint it and exit 143 / 130 with the command to resume;
    a second signal abandons the step (the previous checkpoint stays). ``--budget-hours`` ends the run
    after the last step that fits, with its evaluation, checkpoint and ``final/``.

    Under torchrun (:mod:`shell.distributed`) every rank enters the run: rank 0 takes the lock and checks the
    folder and flags (a refusal exits every rank), writes the logs, figures and ``final/``; checkpoints are
    sharded (each rank writes its part); the ranks agree after each step on a signal and on a budget stop.

    Args:
        config: the entry point's whole config; it holds ``run`` (:class:`RunConfig`) and ``loop`` (:class:`LoopConfig`).
        total_steps: the loop's steps (GRPO steps, SFT steps, EI steps).
        unit: what a step is called in messages.
        step_keys: the metrics keys that hold a record's loop step (for truncation on resume).
        plot: draws the run's figures from its folder (after each evaluation and at the end).
    """

    def __init__(
        self, config: Any, *, total_steps: int, unit: str = "step",
        step_keys: Sequence[str] = ("train_step", "eval_step"), plot: Callable[[Path], Any] | None = None,
    ) -> None:
        self.config = config
        self.run_cfg: RunConfig = config.run
        self.loop: LoopConfig = config.loop
        self.total = total_steps
        self.unit = unit
        self.step_keys = tuple(step_keys)
        self.plot = plot
        self.dir = Path(self.run_cfg.runs_dir) / self.run_cfg.name
        self.start = 0
        self.completed = 0
        self.state: dict[str, Any] = {}
        """The loop's own state (e.g. expert iteration's SFT step count): saved with every checkpoint, restored on resume."""
        self.learner: Learner | None = None
        self.world = World()
        """This process's place under torchrun (one rank of one without it)."""
        self.logger: RunLogger | None = None
        self.closing: list[Callable[[], Any]] = []
        self.reserve_s = 0.0
        """Seconds to keep free of the budget for the work after the last step (the final evaluation)."""
        self._lock = _Lock(self.dir)
        self._changes: dict[str, tuple[Any, Any]] = {}
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._budget_stop: int | None = None
        self._judged: tuple[int, bool] | None = None  # (step, is it the last): the budget is judged once a step
        self._in_steps = False
        self._step_seconds: list[float] = []
        self._elapsed_before = 0.0
        self._t0 = time.monotonic() - process_age()

    # ------------------------------------------------------------------------------------------ open/close

    def __enter__(self) -> Run:
        self.world = init_world()
        self._changes = main_first(self._open_folder)
        self._install_signal_handlers()
        return self

    def _open_folder(self) -> dict[str, tuple[Any, Any]]:
        """Lock the folder, clear what a killed run left, refuse to start over checkpoints without --resume and
        compare the flags on --resume; returns the accepted changes."""
        self._lock.acquire()
        try:
            removed = remove_stale_temporaries(self.dir)
            if removed:
                say(f"removed {len(removed)} temporary folder(s) a killed run left behind: {', '.join(p.name for p in removed)}")
            has_checkpoints = bool(list(self.dir.glob("checkpoints/step_*")))
            if not self.loop.resume and has_checkpoints:
                raise ValueError(f"{self.dir} already holds checkpoints: pass --resume to continue it or choose another --run.name")
            if self.loop.resume and has_checkpoints:
                self._check_config()
        except BaseException:
            self._lock.release()
            raise
        return self._changes

    def _saved_config(self) -> dict[str, Any] | None:
        """The config the run trains with now: ``config.json`` plus the recorded changes."""
        path = self.dir / "config.json"
        if not path.exists():
            return None
        config = _flatten(json.loads(path.read_text()))
        for entry in read_jsonl_records(self.dir / "config_history.jsonl"):
            for k, (_, new) in entry["changes"].items():
                config[k] = new
        return config

    def _check_config(self) -> None:
        saved = self._saved_config()
        if saved is None:
            return
        changes = config_changes(saved, asdict(self.config))
        if changes and not self.loop.allow_config_change:
            listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"--resume with flags that change training mid-run ({listing}). Resume with the run's "
                             f"own flags, or pass --allow-config-change to apply and record the change")
        self._changes = changes

    def begin(self, learner: Learner, *, closing: Sequence[Callable[[], Any]] = ()) -> Run:
        """Attach the learner: resume from the newest intact checkpoint (or start fresh) and open the logs.
        ``closing`` runs when the run closes (e.g. the sampler's ``close``)."""
        self.learner = learner
        self.closing = list(closing)
        resumed = False
        if self.loop.resume:
            check_resume_world(self.dir)
            if is_sharded(learner.model):  # weights, optimizer and schedule restored in place
                ckpt = load_sharded_checkpoint(self.dir, model=learner.model, optimizer=learner.optimizer.optimizer,
                                               scheduler=learner.optimizer.scheduler)
            else:
                ckpt = load_latest_checkpoint(self.dir, model=learner.model)
                if ckpt is not None:
                    learner.optimizer.load_state_dict(ckpt.state["optimizer"])
            if ckpt is None:
                say(f"--resume: no checkpoint in {self.dir}; starting from scratch")
            else:
                self.start = self.completed = ckpt.step
                self.state = dict(ckpt.state.get("loop", {}))
                self._elapsed_before = float(ckpt.state.get("elapsed", 0.0))
                resumed = True
                say(f"resumed from {ckpt.path} ({self.unit} {ckpt.step})")
                if self._changes:
                    learner.optimizer.apply(learner.optim)
                    if self.world.main:
                        self._record_changes()
        if not self.world.main:  # rank 0 writes the logs
            return self
        if resumed:
            self._truncate_generations(self.start)
        else:
            (self.dir / "generations.jsonl").unlink(missing_ok=True)
            (self.dir / "config_history.jsonl").unlink(missing_ok=True)
        self.logger = RunLogger(self.dir, logger=self.run_cfg.logger, config=asdict(self.config), save_config=not resumed,
                                resume_step=self.start if resumed else None, step_keys=self.step_keys,
                                elapsed_offset=self.elapsed)
        return self

    def _record_changes(self) -> None:
        history = read_jsonl_records(self.dir / "config_history.jsonl")
        history.append({"step": self.start, "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                        "changes": {k: [old, new] for k, (old, new) in self._changes.items()}})
        atomic_write_jsonl(self.dir / "config_history.jsonl", history)
        say("changed from this step on (recorded in config_history.jsonl): "
            + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self._changes.items()))

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, FloatingPointError):
            kept = list_checkpoints(self.dir)
            say(f"stopped: {exc}. " + (f"The last good checkpoint is {kept[-1]}; " if kept else "")
                + "nothing was written to final/.")
        self.close(clean=kind is None)

    def close(self, *, clean: bool = True) -> None:
        """Close the logger, the samplers and the lock, and leave the process group (after every rank got here,
        when ``clean``: the run ended normally)."""
        self._restore_signal_handlers()
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        for fn in self.closing:
            fn()
        self.closing = []
        self._lock.release()
        close_world(wait=clean)

    def _truncate_generations(self, step: int) -> None:
        path = self.dir / "generations.jsonl"
        if path.exists():
            atomic_write_jsonl(path, [r for r in read_jsonl_records(path) if r.get("step", 0) <= step])

    # ------------------------------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if os.name != "posix" or signal.getsignal(signal.SIGINT) is None:
            return
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: leave signals alone
            self._old_handlers.clear()

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            say(f"{name} again: abandoning this step; the last checkpoint stays as it was")
            self._restore_signal_handlers()
            raise SystemExit(128 + signum)
        self._signal = signum
        doing = f"{self.unit} {self.completed + 1}" if self._in_steps else "the set-up"
        say(f"{name}: finishing {doing}, then checkpointing and stopping (send it again to abandon it)")

    def _agree_on_signal(self) -> None:
        """Under torchrun: a signal any rank received stops every rank after the same step."""
        if self.world.size > 1:
            self._signal = max(gather(self._signal or 0)) or None

    def _stop_for_signal(self, step: int) -> None:
        """Checkpoint ``step`` (unless it is the newest checkpoint already), say how to resume, exit 128 + signal."""
        signum = self._signal
        assert signum is not None
        where = (f"checkpoint {self._checkpoint_unless_newest(step)}" if step > 0
                 else "nothing to save yet (no step had completed)")
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else self.config.__class__.__module__
        args = [a for a in (sys.argv[1:] if sys.argv and sys.argv[0].endswith(".py") else []) if a != "--resume"]
        launcher = "python -m" if self.world.size == 1 else f"torchrun --nproc-per-node {self.world.local_size} -m"
        command = " ".join([launcher, module, *args, "--resume"])
        say(f"stopped by {signal.Signals(signum).name} after {self.unit} {step}: {where}. Continue with: {command}")
        raise SystemExit(128 + signum)

    # ------------------------------------------------------------------------------------------ schedule

    @property
    def elapsed(self) -> float:
        """Wall-clock seconds of the run so far (across resumes)."""
        return self._elapsed_before + time.monotonic() - self._t0

    def steps(self) -> Iterator[int]:
        """The steps still to run (``start + 1 … total``), with a progress bar on a terminal; ends early after
        the step a ``--budget-hours`` stop chose, and exits after a step when a signal asked it to."""
        self._agree_on_signal()
        if self._signal is not None:  # a signal during the set-up (warm start, first evaluation)
            self._stop_for_signal(self.start)
        bar = progress_bar(total=self.total, initial=self.start, desc=self.run_cfg.name, unit=self.unit)
        self._in_steps = True
        try:
            for step in range(self.start + 1, self.total + 1):
                t0 = time.monotonic()
                yield step
                self._step_seconds.append(time.monotonic() - t0)
                self.completed = step
                bar.update(1)
                self._agree_on_signal()
                if self._signal is not None:
                    self._stop_for_signal(step)
                if self._budget_stop == step:
                    return
        finally:
            self._in_steps = False
            bar.close()

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

    def checkpoint_if_due(self, step: int) -> None:
        """Checkpoint every ``--checkpoint-every`` steps (the last step's checkpoint is :meth:`finish`'s)."""
        if self.loop.checkpoint_every and step % self.loop.checkpoint_every == 0 and not self.is_last(step):
            self.checkpoint(step)

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

    def checkpoint(self, step: int) -> Path:
        """Write ``checkpoints/step_{step}``: weights, tokenizer, optimizer + schedule, RNG, elapsed time and
        :attr:`state`."""
        assert self.learner is not None
        state = {"elapsed": self.elapsed, "loop": dict(self.state)}
        if is_sharded(self.learner.model):  # every rank writes its shards
            return save_sharded_checkpoint(self.dir, step, model=self.learner.model, optimizer=self.learner.optimizer.optimizer,
                                           scheduler=self.learner.optimizer.scheduler, tokenizer=self.learner.tokenizer,
                                           state=state, keep_last=self.loop.keep_checkpoints)
        state["optimizer"] = self.learner.optimizer.state_dict()
        return save_checkpoint(self.dir, step, model=self.learner.model, tokenizer=self.learner.tokenizer, state=state,
                               keep_last=self.loop.keep_checkpoints)

    def _checkpoint_unless_newest(self, step: int) -> Path:
        """The checkpoint of ``step``: the newest one when it is that step's already, else a new one."""
        kept = list_checkpoints(self.dir)
        return kept[-1] if kept and kept[-1].name == f"step_{step:06d}" else self.checkpoint(step)

    def finish(self) -> Path:
        """The last checkpoint, ``final/`` (the policy and tokenizer, loadable by ``shell.evaluate`` and vLLM)
        and the figures; returns the run folder."""
        assert self.learner is not None
        step = self.completed
        self._checkpoint_unless_newest(step)
        save_pretrained_atomic(self.learner.model, self.learner.tokenizer, self.dir / "final")
        self.draw()
        if self.learner.optim.compile:
            say(f"torch.compile: {compiled_graph_count()} graph(s) compiled in this process")
        if self.stopped_by_budget:
            say(f"stopped by --budget-hours after {self.unit} {step} of {self.total} ({self.elapsed / 60:.1f} min)")
        say(f"done: {self.dir / 'metrics.jsonl'}, {self.dir / 'final'}")
        return self.dir
