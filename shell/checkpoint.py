"""Atomic checkpoints with everything needed for an exact resume.

A checkpoint is ``run_dir/checkpoints/step_XXXXXX/``: the policy and tokenizer (``save_pretrained``),
and ``trainer_state.pt`` with the optimizer and schedule, RNG states and the loop's own state.
It is written into a temporary folder and renamed into place (:func:`shell.files.publish_dir`), so a
run killed while saving keeps its previous checkpoint. ``run_dir/final/`` holds the policy and
tokenizer at the end of a run.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shell.files import publish_dir

__all__ = ["Checkpoint", "list_checkpoints", "load_latest_checkpoint", "load_model_weights", "rng_state",
           "save_checkpoint", "save_pretrained_atomic", "set_rng_state"]

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


def _save_pretrained(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pretrained_atomic(model: torch.nn.Module, tokenizer: Any, path: Path | str) -> Path:
    """``save_pretrained`` of model and tokenizer into ``path``, replacing it atomically."""
    return publish_dir(path, lambda tmp: _save_pretrained(model, tokenizer, tmp))


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically (weights, tokenizer, ``state`` and the RNG states in
    ``trainer_state.pt``) and prune all but the last ``keep_last``."""

    def fill(tmp: Path) -> None:
        _save_pretrained(model, tokenizer, tmp)
        torch.save({"step": step, "rng": rng_state(), **state}, tmp / "trainer_state.pt")

    final = publish_dir(Path(run_dir) / "checkpoints" / f"step_{step:06d}", fill)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.pt").exists()]
    return [p for _, p in sorted(found)]


def load_latest_checkpoint(run_dir: Path | str, *, model: torch.nn.Module, restore_rng: bool = True) -> Checkpoint | None:
    """Load the newest checkpoint of ``run_dir`` into ``model`` and return its state; None if there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1]
    load_model_weights(model, path)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint(path=path, step=int(state["step"]), state=state)


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
