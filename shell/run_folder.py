"""The run folder ``<runs_dir>/<name>/``: its lock (one writer per run), and the guard that a run neither starts
over an existing run's checkpoints nor resumes with flags that change training (unless allowed, then the
changes are recorded in ``config_history.jsonl``)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from shell.checkpoint import remove_stale_temporaries
from shell.config import LoopConfig, asdict
from shell.files import FolderInUse, FolderLock, atomic_write_jsonl, missing_folders, remove_unused_folders
from shell.progress import say
from shell.runlog import read_jsonl_records

__all__ = ["FREE_TO_CHANGE", "RunFolder", "RunLocked", "config_changes"]

FREE_TO_CHANGE = ("loop.", "run.logger", "run.runs_dir", "grading.", "sampler.batch_size", "model.device",
                  "sampler.placement", "sampler.gpu_memory_utilization", "sampler.vllm_device", "sampler.sleep",
                  "sampler.kv_cache_gib", "sampler.enforce_eager", "num_steps", "n_grpo_steps", "n_ei_steps", "epochs")
"""Config fields (dotted prefixes) a resumed run may change freely: they do not change what is trained
(the schedule flags, logging, grading workers, where vLLM runs and its memory, the number of steps)."""

HISTORY = "config_history.jsonl"


RunLocked = FolderInUse
"""Another process holds the run folder (the lock is :class:`shell.files.FolderLock`, shared with ``shell.evaluate``)."""


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


class RunFolder:
    """``path`` for a run of ``config`` (an entry point's config, holding ``loop``: :class:`LoopConfig`).

    :meth:`open` (rank 0, before any model loads) takes the lock, clears what a killed run left, refuses to
    start over checkpoints unless ``--resume``, and on ``--resume`` compares the flags with the saved config:
    a change that alters training is refused (naming each field old → new) unless ``--allow-config-change``;
    the accepted changes are :attr:`changes`, written by :meth:`record_changes`."""

    def __init__(self, path: Path, config: Any) -> None:
        self.path = path
        self.config = config
        self.loop: LoopConfig = config.loop
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.lock = FolderLock(path)
        self.made: list[Path] = []
        """The folders :meth:`open` created (the run folder and missing parents): removed by :meth:`release`
        if the start fails before anything is written in them."""

    def open(self) -> dict[str, tuple[Any, Any]]:
        """Lock, clear, refuse or compare (see the class); returns the accepted changes."""
        self.made = missing_folders(self.path)
        self.lock.acquire()
        try:
            removed = remove_stale_temporaries(self.path)
            if removed:
                say(f"removed {len(removed)} temporary folder(s) a killed run left behind: {', '.join(p.name for p in removed)}")
            has_checkpoints = bool(list(self.path.glob("checkpoints/step_*")))
            if not self.loop.resume and has_checkpoints:
                raise ValueError(f"{self.path} already holds checkpoints: pass --resume to continue it or choose another --run.name")
            if self.loop.resume and has_checkpoints:
                self._check_config()
        except BaseException:
            self.lock.release()
            raise
        return self.changes

    def saved_config(self) -> dict[str, Any] | None:
        """The config the run trains with now: ``config.json`` plus the recorded changes (flattened)."""
        path = self.path / "config.json"
        if not path.exists():
            return None
        config = _flatten(json.loads(path.read_text()))
        for entry in read_jsonl_records(self.path / HISTORY):
            for k, (_, new) in entry["changes"].items():
                config[k] = new
        return config

    def _check_config(self) -> None:
        saved = self.saved_config()
        if saved is None:
            return
        changes = config_changes(saved, asdict(self.config))
        if changes and not self.loop.allow_config_change:
            listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"--resume with flags that change training mid-run ({listing}). Resume with the run's "
                             f"own flags, or pass --allow-config-change to apply and record the change")
        self.changes = changes

    def record_changes(self, step: int) -> None:
        """Append the accepted changes, from ``step`` on, to ``config_history.jsonl``."""
        history = read_jsonl_records(self.path / HISTORY)
        history.append({"step": step, "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                        "changes": {k: [old, new] for k, (old, new) in self.changes.items()}})
        atomic_write_jsonl(self.path / HISTORY, history)
        say("changed from this step on (recorded in config_history.jsonl): "
            + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items()))

    def forget_history(self) -> None:
        """A fresh start: no recorded changes."""
        (self.path / HISTORY).unlink(missing_ok=True)

    def release(self, *, started: bool = True) -> None:
        """Release the lock; a run that never ``started`` (it failed before loading anything) leaves no empty
        folder behind."""
        self.lock.release()
        if not started:
            remove_unused_folders(self.made)
