"""The run folder ``<runs_dir>/<name>/``: its lock (one writer per run), and the guard that a run neither starts
over an existing run's checkpoints or finished run (unless ``--overwrite``) nor resumes with flags or data that
change training (unless allowed, then the changes are recorded in ``config_history.jsonl``): a resume compares
the flags with ``config.json`` (missing or unreadable: refused, naming it) and the data with
``data_fingerprint.json`` (:mod:`shell.fingerprint`)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shell.checkpoint import remove_stale_temporaries
from shell.config import LoopConfig, asdict
from shell.files import (
    FolderInUse, FolderLock, atomic_write_jsonl, atomic_write_text, missing_folders, remove_unused_folders,
)
from shell.fingerprint import FINGERPRINT_FILE, fingerprint_changes, read_fingerprints, write_fingerprints
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
    a, b = (_flatten(json.loads(json.dumps(c, default=str))) for c in (saved, new))  # both as JSON reads them
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    return {k: v for k, v in changed.items() if not k.startswith(FREE_TO_CHANGE)}


class RunFolder:
    """``path`` for a run of ``config`` (an entry point's config, holding ``loop``: :class:`LoopConfig`) on the
    data of ``fingerprints`` (data set name → :func:`shell.fingerprint.records_fingerprint`; None: not checked).

    :meth:`open` (rank 0, before any model loads) takes the lock, clears what a killed run left, refuses to
    start over checkpoints unless ``--resume`` and over a finished run unless ``--resume`` or ``--overwrite``, and
    on ``--resume`` compares the flags with the saved config and the data with the saved fingerprints: a change
    that alters training, a missing or unreadable ``config.json`` or ``data_fingerprint.json``, is refused (naming
    each field old → new, or the file) unless ``--allow-config-change``; the accepted changes are :attr:`changes`
    (flags), :attr:`data_changes` and :attr:`config_lost`, written by :meth:`record_changes`."""

    def __init__(self, path: Path, config: Any, *, fingerprints: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.path = path
        self.config = config
        self.loop: LoopConfig = config.loop
        self.fingerprints = None if fingerprints is None else {k: dict(v) for k, v in fingerprints.items()}
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.data_changes: dict[str, tuple[str, str]] = {}
        """Accepted differences of the data from the saved fingerprints (``--allow-config-change``)."""
        self.config_lost: str | None = None
        """Why ``config.json`` could not be compared (missing, unreadable), when that was accepted: the resume's flags
        replace it."""
        self.lock = FolderLock(path)
        self.made: list[Path] = []
        """The folders :meth:`open` created (the run folder and missing parents): removed by :meth:`release`
        if the start fails before anything is written in them."""

    @property
    def accepted(self) -> bool:
        """Did :meth:`open` accept anything to record (changed flags or data, a lost ``config.json``)?"""
        return bool(self.changes or self.data_changes or self.config_lost)

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
            if not self.loop.resume:
                self._refuse_a_finished_run()
            if self.loop.resume and has_checkpoints:
                self._check_config()
                self._check_data()
        except BaseException:
            self.lock.release()
            raise
        return self.changes

    def _refuse_a_finished_run(self) -> None:
        """A new run over a run that trained (``final/``, or a non-empty ``metrics.jsonl``) whose checkpoints are gone:
        refused unless ``--overwrite``."""
        metrics = self.path / "metrics.jsonl"
        final = self.path / "final"
        trained = [name for name, there in (("final/", final.is_dir() and not final.is_symlink()),
                                            ("metrics.jsonl", metrics.is_file() and not metrics.is_symlink()
                                             and metrics.stat().st_size > 0)) if there]  # a planted link: not a run
        if not trained:
            return
        if not getattr(self.loop, "overwrite", False):
            raise ValueError(f"{self.path} holds a run that trained ({', '.join(trained)}): pass --resume to continue "
                             f"it, --overwrite to replace it, or choose another --run.name")
        say(f"--overwrite: replacing the run in {self.path} ({', '.join(trained)})")

    def saved_config(self) -> dict[str, Any] | None:
        """The config the run trains with now: ``config.json`` plus the recorded changes (flattened); None when
        ``config.json`` is missing, ``ValueError`` naming it when it is unreadable."""
        path = self.path / "config.json"
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError, OSError) as e:
            raise ValueError(f"{path} is unreadable ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is unreadable (not a JSON object)")
        config = _flatten(raw)
        history = read_jsonl_records(self.path / HISTORY)
        replaced = max((i for i, entry in enumerate(history) if entry.get("config_replaced")), default=-1)
        for entry in history[replaced + 1:]:  # config.json, rewritten at a replacement, holds the earlier ones
            for k, (_, new) in entry.get("changes", {}).items():
                config[k] = new
        return config

    def _check_config(self) -> None:
        path = self.path / "config.json"
        try:
            saved = self.saved_config()
            problem = None if saved is not None else f"{path} is missing"
        except ValueError as e:
            saved, problem = None, str(e)
        if problem is not None:
            if not self.loop.allow_config_change:
                raise ValueError(f"--resume: {problem}, so this resume's flags cannot be compared with the run's own. "
                                 f"Restore it, or pass --allow-config-change to resume with these flags (they replace "
                                 f"it, recorded in config_history.jsonl)")
            self.config_lost = problem
            return
        assert saved is not None
        changes = config_changes(saved, asdict(self.config))
        if changes and not self.loop.allow_config_change:
            listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"--resume with flags that change training mid-run ({listing}). Resume with the run's "
                             f"own flags, or pass --allow-config-change to apply and record the change")
        self.changes = changes

    def _check_data(self) -> None:
        """The data loaded now against ``data_fingerprint.json``: a change, or a missing or unreadable file, is
        refused unless ``--allow-config-change``."""
        if self.fingerprints is None:
            return
        path = self.path / FINGERPRINT_FILE
        try:
            saved = read_fingerprints(self.path)
            changes = ({"data fingerprint": (f"{path} missing", "the data of this resume")} if saved is None
                       else fingerprint_changes(saved, self.fingerprints))
        except ValueError as e:
            changes = {"data fingerprint": (str(e), "the data of this resume")}
        if changes and not self.loop.allow_config_change:
            listing = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items())
            raise ValueError(f"--resume with other data than the run trained on ({listing}; {path}). Resume on the "
                             f"run's own data, or pass --allow-config-change to train on this data from here on "
                             f"(recorded in config_history.jsonl)")
        self.data_changes = changes

    def write_fingerprints(self) -> None:
        """Store the fingerprints of the data this run trains on (a fresh start, or accepted data changes)."""
        if self.fingerprints is not None:
            write_fingerprints(self.path, self.fingerprints)

    def record_changes(self, step: int) -> None:
        """Append the accepted changes, from ``step`` on, to ``config_history.jsonl``: changed flags; a lost
        ``config.json`` (rewritten with this resume's flags); changed data (the fingerprints rewritten)."""
        history = read_jsonl_records(self.path / HISTORY)
        entry: dict[str, Any] = {"step": step, "time": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
                                 "changes": {k: [old, new] for k, (old, new) in self.changes.items()}}
        if self.config_lost:
            entry["config_replaced"] = self.config_lost
            atomic_write_text(self.path / "config.json", json.dumps(asdict(self.config), indent=2, default=str) + "\n")
        if self.data_changes:
            entry["data"] = {k: [old, new] for k, (old, new) in self.data_changes.items()}
            self.write_fingerprints()
        history.append(entry)
        atomic_write_jsonl(self.path / HISTORY, history)
        said = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items()]
        said += [f"{k}: {old} -> {new}" for k, (old, new) in self.data_changes.items()]
        if self.config_lost:
            said.append(f"{self.config_lost}: replaced by this resume's flags")
        say("changed from this step on (recorded in config_history.jsonl): " + "; ".join(said))

    def forget_history(self) -> None:
        """A fresh start: no recorded changes."""
        (self.path / HISTORY).unlink(missing_ok=True)

    def release(self, *, started: bool = True) -> None:
        """Release the lock; a run that never ``started`` (it failed before loading anything) leaves no empty
        folder behind."""
        self.lock.release()
        if not started:
            remove_unused_folders(self.made)
