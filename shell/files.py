"""Atomic files and folders: how the shell writes whole files and folders a reader may see half-done
(checkpoints, ``final/``, summaries, results, figures, rewritten logs). The logs that grow a line at a time
(``metrics.jsonl``, ``generations.jsonl``) are appended to directly instead, and their readers drop a torn
last line (:func:`shell.runlog.read_jsonl_records`).

A file is written into a temporary sibling, flushed and ``fsync``'ed, then renamed over its target
(``os.replace``); the parent folder is ``fsync``'ed so the rename itself survives a power cut. A folder
(a checkpoint, ``final/``) is filled under a temporary name and renamed into place the same way. On
any error the temporary is removed, so a full disk never leaves a hidden half-written copy behind.

Nothing is written through a symbolic link: a rename replaces a link planted at the target (the file it
pointed to is untouched), and :func:`append_text` refuses to append to one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["FolderInUse", "FolderLock", "LinkRefused", "WriteError", "append_text", "atomic_write_bytes",
           "atomic_write_jsonl", "atomic_write_text", "describe_os_error", "fsync_dir", "fsync_tree", "is_disk_full",
           "missing_folders", "publish_dir", "remove_unused_folders"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
_NEARLY_FULL_BYTES = 1 << 20


def is_disk_full(error: BaseException, folder: Path | str | None = None) -> bool:
    """Whether ``error`` (or an error it was raised from) says the disk is full (``ENOSPC``/``EDQUOT``, or a
    library's text for it), or, with ``folder``, that folder's file system has less than 1 MiB free."""
    seen: BaseException | None = error
    for _ in range(16):  # the chain of causes, bounded against cycles
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in _DISK_FULL_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is not None:
        try:
            return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


class WriteError(OSError):
    """Writing ``path`` failed: ``could not write <path>: <why>``, where why is "no space left on device (the
    disk is full)" when it is. ``errno`` is the cause's (``ENOSPC`` for a full disk)."""

    def __init__(self, path: Path | str, error: BaseException, *, disk_full: bool) -> None:
        why = ("no space left on device (the disk is full)" if disk_full
               else getattr(error, "strerror", None) or str(error) or type(error).__name__)
        code = errno.ENOSPC if disk_full else getattr(error, "errno", None)
        super().__init__(code, why, str(path))
        self.message = f"could not write {path}: {why}"

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, path: Path | str, error: BaseException, *, folder: Path | str | None = None) -> WriteError:
        """``error`` itself when it already is one (it names its own path), else a new one for ``path``."""
        return error if isinstance(error, WriteError) else cls(path, error, disk_full=is_disk_full(error, folder))


def describe_os_error(error: OSError) -> str:
    """The one line an entry point prints for an I/O error: a :class:`WriteError` as it is; a refused link or a
    full disk said in words, naming the file; any other error as Python words it (with its file name)."""
    if isinstance(error, WriteError):
        return str(error)
    name = error.filename or "a file"
    if error.errno == errno.ELOOP:
        return (f"{name} is a symbolic link: files in a run folder are never written through a link "
                f"(remove it, or choose another --run.name)")
    if is_disk_full(error):
        return f"could not write {name}: no space left on device (the disk is full)"
    return str(error)


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
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync of the folder). A
    symbolic link at ``path`` is replaced by the file, never followed. A failure raises :class:`WriteError`
    naming ``path`` (and saying so when the disk is full)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise WriteError.of(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        error = WriteError.of(path, e, folder=path.parent) if isinstance(e, OSError) else None
        Path(tmp).unlink(missing_ok=True)
        if error is not None:
            raise error from e
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


def append_text(path: Path | str, text: str) -> Path:
    """Append ``text`` (UTF-8) to ``path`` (created when missing) and flush it: one ``write`` of the whole
    text, so concurrent appenders never interleave within it. A symbolic link at ``path`` is refused with a
    ``ValueError`` naming it (appending would write into whatever file it points to)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise LinkRefused(path) from None
        raise WriteError.of(path, e) from e
    try:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data):]
    except OSError as e:
        raise WriteError.of(path, e) from e
    finally:
        os.close(fd)
    return path


class LinkRefused(ValueError):
    """A file we would write is a symbolic link (planted in a run folder, say): refused, naming it."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is a symbolic link: files in a run folder are never written through a link "
                         f"(remove it, or choose another --run.name)")
        self.path = path


def publish_dir(target: Path | str, fill: Callable[[Path], Any]) -> Path:
    """Create folder ``target`` atomically: ``fill(tmp)`` writes into a temporary sibling folder, whose
    files are fsync'ed before it is renamed over ``target`` (an existing ``target`` is replaced).

    On any error (a full disk, a read-only folder) the temporary folder is removed and the error is
    re-raised as a :class:`WriteError` naming ``target`` (and saying that the disk is full when it is: an
    ``ENOSPC`` anywhere in the error's chain, a library's "No space left on device" text, as the tokenizers and
    safetensors writers raise it, or a file system with no space left, as after torch.save's "unexpected pos");
    an existing ``target`` is left as it was.
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
        # judged before the temporary is removed: a write that failed on a full disk left it (nearly) full
        full = isinstance(e, Exception) and is_disk_full(e, target.parent if isinstance(e, (OSError, RuntimeError)) else None)
        shutil.rmtree(tmp, ignore_errors=True)
        if full or (isinstance(e, (OSError, RuntimeError)) and not isinstance(e, FileNotFoundError)):
            raise WriteError(target, e, disk_full=full) from e
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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a link
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
