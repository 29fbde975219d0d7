"""Atomic checkpoints with everything needed for an exact resume.

A checkpoint is ``run_dir/checkpoints/step_XXXXXX/``: the policy and tokenizer (``save_pretrained``),
and ``trainer_state.pt`` with the optimizer state, counters, RNG states and loop-specific extras.
It is written into a temporary folder and renamed into place, so a run killed while saving keeps its
previous checkpoint. ``run_dir/final/`` holds the policy and tokenizer at the end of a run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def save_pretrained_atomic(model: torch.nn.Module, tokenizer: Any, path: Path | str) -> Path:
    """``save_pretrained`` of model and tokenizer into ``path``, replacing it atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` atomically and prune all but the last ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        },
        tmp / "trainer_state.pt",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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


def load_latest_checkpoint(
    run_dir: Path | str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    restore_rng: bool = True,
) -> Checkpoint | None:
    """Load the newest checkpoint of ``run_dir`` into ``model`` and ``optimizer``; None if there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1]
    load_model_weights(model, path)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
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
