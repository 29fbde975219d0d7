"""Atomic checkpoints with everything needed for an exact resume.

A checkpoint is ``run_dir/checkpoints/step_XXXXXX/``: the policy and tokenizer (``save_pretrained``),
``trainer_state.pt`` with the optimizer and schedule, RNG states and the loop's own state, and
``manifest.json`` with every file's size and SHA-256. It is written into a temporary folder, fsync'ed and
renamed into place (:func:`shell.files.publish_dir`), so a run killed while saving keeps its previous
checkpoint. Loading verifies the manifest; a damaged newest checkpoint is reported by path and the newest
intact one is used instead. ``run_dir/final/`` holds the policy and tokenizer at the end of a run.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from shell.files import publish_dir

__all__ = ["Checkpoint", "CheckpointError", "list_checkpoints", "load_latest_checkpoint", "load_model_weights",
           "newest_intact_checkpoint", "prune_checkpoints", "remove_stale_temporaries", "rng_state", "save_checkpoint",
           "save_pretrained_atomic", "set_rng_state", "verify_manifest"]

MANIFEST = "manifest.json"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, or no intact one left): the message names the path."""

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint's trainer state (the policy weights are already in the model)."""

    path: Path
    step: int
    state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_pretrained(model: torch.nn.Module, tokenizer: Any, folder: Path, state: dict[str, Any] | None = None) -> None:
    model.save_pretrained(folder, **({} if state is None else {"state_dict": dict(state)}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pretrained_atomic(model: torch.nn.Module, tokenizer: Any, path: Path | str) -> Path:
    """``save_pretrained`` of model and tokenizer into ``path``, replacing it atomically. Under torchrun every
    rank calls it: a sharded policy's full weights are gathered, and rank 0 alone writes."""
    from shell.distributed import barrier, gather_state_dict, is_main, is_sharded

    state = gather_state_dict(model, tied_once=True) if is_sharded(model) else None
    if is_main():
        publish_dir(path, lambda tmp: _save_pretrained(model, tokenizer, tmp, state))
    barrier()
    return Path(path)


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int = 2,
    save_weights: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically (weights, tokenizer, ``state`` and the RNG states in
    ``trainer_state.pt``) and prune all but the last ``keep_last``. ``save_weights(folder)``, when given, writes
    the weights instead of ``save_pretrained`` (a LoRA run: only its adapter, :func:`shell.lora.save_adapter`)."""

    def fill(tmp: Path) -> None:
        if save_weights is None:
            _save_pretrained(model, tokenizer, tmp)
        else:
            save_weights(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "rng": rng_state(), **state}, tmp / "trainer_state.pt")
        write_manifest(tmp)

    final = publish_dir(Path(run_dir) / "checkpoints" / f"step_{step:06d}", fill)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path | str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (none when ``keep_last`` is 0)."""
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: the size and SHA-256 of every other file in ``folder`` (recursively)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1) + "\n")


def verify_manifest(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the file when a file of ``folder`` is missing, has another size
    or another checksum than its manifest says (a checkpoint without a manifest passes unverified)."""
    path = folder / MANIFEST
    if not path.exists():
        return
    try:
        entries = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    for name, want in entries.items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f}: checksum differs from the manifest (the file is corrupted)")


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def remove_stale_temporaries(run_dir: Path | str) -> list[Path]:
    """Delete the temporary folders a killed run left behind (``.step_N.tmp``, ``.final.tmp``): they are never
    used and can hold gigabytes. Returns what was removed."""
    run_dir = Path(run_dir)
    stale = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
             for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")) and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_latest_checkpoint(run_dir: Path | str, *, model: torch.nn.Module, restore_rng: bool = True,
                           load_weights: Callable[[Path], Any] | None = None) -> Checkpoint | None:
    """Load the newest intact checkpoint of ``run_dir`` into ``model`` and return its state; None if there is none.
    ``load_weights(folder)``, when given, loads the weights instead of :func:`load_model_weights` (the
    counterpart of :func:`save_checkpoint`'s ``save_weights``).

    Each candidate is verified against its manifest and loaded; a damaged one is reported (a warning naming its
    path and the problem) and the next older one is tried. Raises :class:`CheckpointError` when checkpoints
    exist but none is intact.
    """

    def load(path: Path) -> dict[str, Any]:
        if load_weights is None:
            load_model_weights(model, path)
        else:
            load_weights(path)
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)

    found = newest_intact_checkpoint(run_dir, load)
    if found is None:
        return None
    path, state = found
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def newest_intact_checkpoint(run_dir: Path | str, load: Callable[[Path], T]) -> tuple[Path, T] | None:
    """The newest checkpoint of ``run_dir`` that matches its manifest and that ``load`` reads without an error,
    with what ``load`` returned; None when there is no checkpoint. A damaged one is reported (a warning naming
    its path and the problem) and the next older one is tried; :class:`CheckpointError` when none is intact."""
    found = list_checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            verify_manifest(path)
            return path, load(path)
        except Exception as e:  # noqa: BLE001 - any damage: fall back to an older checkpoint
            problems.append(f"{path}: {e}")
            warnings.warn(f"checkpoint {path} is damaged ({e}); trying the previous one", stacklevel=2)
    if found:
        raise CheckpointError("no intact checkpoint in " + str(Path(run_dir) / "checkpoints") + ": " + "; ".join(problems))
    return None


def load_model_weights(model: torch.nn.Module, folder: Path | str) -> None:
    """Copy the weights saved by ``save_pretrained`` in ``folder`` into ``model`` in place."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not match the model (missing {really_missing[:5]}, unexpected {unexpected[:5]})")
