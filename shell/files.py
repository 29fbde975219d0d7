"""Atomic files and folders: how the shell writes whole files and folders a reader may see half-done
(checkpoints, ``final/``, summaries, results, figures, rewritten logs). The logs that grow a line at a time
(``metrics.jsonl``, ``generations.jsonl``) are appended to directly instead, and their readers drop a torn
last line (:func:`shell.runlog.read_jsonl_records`).

A file is written into a temporary sibling, flushed and ``fsync``'ed, then renamed over its target
(``os.replace``); the parent folder is ``fsync``'ed so the rename itself survives a power cut. A folder
(a checkpoint, ``final/``) is filled under a temporary name and renamed into place the same way. On
any error the temporary is removed, so a full disk never leaves a hidden half-written copy behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["FolderInUse", "FolderLock", "atomic_write_bytes", "atomic_write_jsonl", "atomic_write_text", "fsync_dir",
           "fsync_tree", "missing_folders", "publish_dir", "remove_unused_folders"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path | str) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path | str) -> None:
    """``fsync`` every file below ``root`` and every folder, deepest first."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_jsonl(path: Path | str, records: Iterable[dict[str, Any]], *, ensure_ascii: bool = True) -> int:
    """Write ``records`` as JSON lines, atomically; returns how many. ``ensure_ascii`` as in ``json.dumps`` (the
    logs' appended lines use its default, so a rewritten log reads byte for byte like an appended one)."""
    lines = [json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def publish_dir(target: Path | str, fill: Callable[[Path], Any]) -> Path:
    """Create folder ``target`` atomically: ``fill(tmp)`` writes into a temporary sibling folder, whose
    files are fsync'ed before it is renamed over ``target`` (an existing ``target`` is replaced).

    On any error (a full disk, a read-only folder) the temporary folder is removed and the error is
    re-raised as an ``OSError`` naming ``target``; an existing ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, FileNotFoundError):
            raise OSError(f"could not write {target}: {e}") from e
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


class FolderInUse(ValueError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock`` holding the owner's pid and host (the protocol of a training
    run's lock, so an evaluation and a training run exclude each other); the OS releases it when the process ends,
    however it ends."""

    def __init__(self, folder: Path | str) -> None:
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self, *, hint: str = "choose another --run.name") -> None:
        """Take the lock (making the folder), or raise :class:`FolderInUse` naming the holder."""
        import datetime
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(f"{self.path.parent} is in use by {holder}: wait for it to finish, or {hint}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} "
                     f"(since {datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def missing_folders(path: Path | str) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: what making ``path`` creates."""
    out, p = [], Path(path)
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def remove_unused_folders(folders: Iterable[Path], *, leftovers: tuple[str, ...] = (".lock",)) -> None:
    """Remove each of ``folders`` (deepest first) that holds nothing but ``leftovers`` (a released lock file): a
    start that failed before writing anything leaves no empty run folder behind. Anything else stays."""
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        if any(e.name not in leftovers or not e.is_file() for e in entries):
            return  # something was written: keep it and every folder above
        try:
            for e in entries:
                e.unlink()
            folder.rmdir()
        except OSError:
            return
