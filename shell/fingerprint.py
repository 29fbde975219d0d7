"""Fingerprints of a run's data, so that a resume can tell when the data under it changed.

A fingerprint is a small JSON-friendly dict: how many records and a SHA-256 over them (:func:`records_fingerprint`:
of what was loaded and is trained or evaluated on, in order; for a file, also :func:`file_fingerprint`: its size
and a SHA-256 of its bytes). A run stores one per data set (``{"train": …, "held_out": …}``) in
``<run>/data_fingerprint.json`` (:func:`write_fingerprints`); on ``--resume`` the stored ones are compared with
those of the data loaded now (:func:`fingerprint_changes`), each difference worded ``old → new`` like a changed
flag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shell.files import atomic_write_text

__all__ = ["FINGERPRINT_FILE", "file_fingerprint", "fingerprint_changes", "read_fingerprints", "records_fingerprint",
           "write_fingerprints"]

FINGERPRINT_FILE = "data_fingerprint.json"

_FIELDS = ("question", "answer", "solution", "prompt", "response", "ground_truth")


def _record(item: Any) -> Any:
    """The part of a loaded record that training sees: an ``Example``'s question, answer and solution, an
    ``SFTExample``'s prompt, response and ground truth (provenance such as ``meta`` or ``where`` is left out);
    a dict or a string as it is."""
    if isinstance(item, (dict, str)):
        return item
    return {name: getattr(item, name) for name in _FIELDS if hasattr(item, name)}


def records_fingerprint(records: Iterable[Any]) -> dict[str, Any]:
    """``{"records": n, "sha256": …}`` over ``records`` in order (Examples, SFTExamples, dicts or strings): one
    canonical JSON line per record (sorted keys, ASCII), hashed. Two loads of the same data give the same
    fingerprint; any record added, dropped, reordered or changed gives another."""
    digest = hashlib.sha256()
    n = 0
    for item in records:
        digest.update(json.dumps(_record(item), sort_keys=True, ensure_ascii=True, default=str).encode("ascii"))
        digest.update(b"\n")
        n += 1
    return {"records": n, "sha256": digest.hexdigest()}


def file_fingerprint(path: Path | str) -> dict[str, Any]:
    """``{"bytes": size, "sha256": …}`` of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def write_fingerprints(run_dir: Path | str, fingerprints: Mapping[str, Mapping[str, Any]]) -> Path:
    """Store ``fingerprints`` (data set name → fingerprint) as ``run_dir/data_fingerprint.json``, atomically."""
    path = Path(run_dir) / FINGERPRINT_FILE
    atomic_write_text(path, json.dumps({k: dict(v) for k, v in fingerprints.items()}, indent=1, sort_keys=True) + "\n")
    return path


def read_fingerprints(run_dir: Path | str) -> dict[str, dict[str, Any]] | None:
    """The fingerprints stored in ``run_dir`` (None when the run has none: it began before they were kept).
    Raises ``ValueError`` naming the file when it is unreadable."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to resume without checking the data") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: not a map of data set names to fingerprints")
    return data


def _words(fp: Mapping[str, Any] | None) -> str:
    if fp is None:
        return "none"
    parts = [f"{fp['records']} records" if "records" in fp else None, f"{fp['bytes']} bytes" if "bytes" in fp else None,
             f"sha256 {str(fp.get('sha256', '?'))[:12]}"]
    return ", ".join(p for p in parts if p)


def fingerprint_changes(saved: Mapping[str, Mapping[str, Any]],
                        now: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """What differs between the ``saved`` fingerprints and those of the data loaded ``now``, as
    ``{"data fingerprint: <name>": (old, new)}`` in words (``"16 records, sha256 3f2a…"``), like the changed
    flags a resume reports; empty when all agree. A data set fingerprinted on one side only counts as changed."""
    changes: dict[str, tuple[str, str]] = {}
    for name in sorted(set(saved) | set(now)):
        old, new = saved.get(name), now.get(name)
        if old is None or new is None or dict(old) != dict(new):
            changes[f"data fingerprint: {name}"] = (_words(old), _words(new))
    return changes
