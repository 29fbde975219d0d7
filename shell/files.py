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

__all__ = ["atomic_write_bytes", "atomic_write_jsonl", "atomic_write_text", "fsync_dir", "fsync_tree", "publish_dir"]


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
