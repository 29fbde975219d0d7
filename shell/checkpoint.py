"""Checkpoints with everything needed for an exact resume, in one process or sharded under ``torchrun``.

A checkpoint is ``run_dir/checkpoints/step_XXXXXX/`` holding

* the policy: ``save_pretrained`` weights in one process; under torchrun ``sharded/``, the
  ``torch.distributed.checkpoint`` folder each rank writes its shards of the model and AdamW into;
* the tokenizer;
* ``trainer_state.pt``: one schema for both (:class:`TrainerState`): the step, the world size that wrote it,
  the LR schedule, AdamW's state (in one process; sharded ones keep it in ``sharded/``), every rank's RNG
  states, the run's elapsed seconds and the loop's own state;
* ``manifest.json``: every file's size and SHA-256.

It is written into a temporary folder, fsync'ed and renamed into place (:func:`shell.files.publish_dir`; rank 0
renames, after every rank wrote its shards), so a run killed while saving keeps its previous checkpoint.
Loading verifies the manifest; a damaged newest checkpoint is reported by path and the newest intact one is
used instead (rank 0 picks it for all). ``--resume`` needs the world size that wrote the checkpoint
(:func:`check_resume_world`). ``run_dir/final/`` holds the policy and tokenizer at the end of a run
(:func:`save_pretrained_atomic`: gathered from the shards, written by rank 0).
"""

from __future__ import annotations

import dataclasses
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
from shell.fsdp import gather_state_dict, is_sharded
from shell.world import barrier, from_main, gather, is_main, main_first, world

__all__ = ["SHARDED", "Checkpoint", "CheckpointError", "Checkpointer", "TrainerState", "WeightFiles", "check_resume_world",
           "checkpoint_world_size", "list_checkpoints", "load_checkpoint", "load_model_weights",
           "newest_intact_checkpoint", "prune_checkpoints", "remove_stale_temporaries", "rng_state", "save_checkpoint",
           "save_pretrained_atomic", "set_rng_state", "verify_manifest", "write_manifest"]

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
SHARDED = "sharded"
"""The folder of a sharded checkpoint that holds its ``torch.distributed.checkpoint`` shards (model and AdamW)."""

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, or no intact one left): the message names the path."""

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainerState:
    """``trainer_state.pt`` of every checkpoint, one process or sharded."""

    step: int
    world_size: int
    """How many ranks wrote the checkpoint (1: one process, weights as ``save_pretrained``)."""
    scheduler: dict[str, Any]
    optimizer: dict[str, Any] | None
    """AdamW's state dict; None in a sharded checkpoint (its shards are in ``sharded/``)."""
    rng: list[dict[str, Any] | None]
    """Every rank's RNG states (:func:`rng_state`), in rank order."""
    elapsed: float = 0.0
    """Wall-clock seconds of the run up to this step (across resumes)."""
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The loop's own state (e.g. expert iteration's SFT step count)."""

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        """The trainer state of checkpoint ``folder`` (also of one written before the two layouts shared this
        schema: ``rng`` a dict and ``optimizer`` {optimizer, scheduler} in one process, ``rng_rank{r}.pt`` files
        when sharded)."""
        raw = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
        if "scheduler" not in raw:  # the old one-process layout
            raw = {**raw, "world_size": 1, "rng": [raw["rng"]], **raw["optimizer"]}
        elif "rng" not in raw:  # the old sharded layout
            files = [folder / f"rng_rank{r}.pt" for r in range(int(raw["world_size"]))]
            raw = {**raw, "optimizer": None,
                   "rng": [torch.load(f, map_location="cpu", weights_only=False) if f.exists() else None for f in files]}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def write(self, folder: Path) -> None:
        torch.save(dataclasses.asdict(self), folder / TRAINER_STATE)


@dataclass
class Checkpoint:
    """A loaded checkpoint (the policy, AdamW and the schedule are already restored in place)."""

    path: Path
    state: TrainerState

    @property
    def step(self) -> int:
        return self.state.step


@dataclass(frozen=True)
class WeightFiles:
    """How a checkpoint holds the policy when not as ``save_pretrained`` weights (a LoRA run: only its adapter;
    :func:`shell.lora.adapter_files`). Each callable takes the folder it writes or reads."""

    save: Callable[[Path], Any]
    """Writes the policy's trainable weights into a checkpoint folder."""
    load: Callable[[Path], Any]
    """Loads them back from one, into the policy in place."""
    final: Callable[[Path], Any]
    """Fills the ``final/`` folder (a Hugging Face folder that ``shell.evaluate`` and vLLM load as is)."""


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
    state = gather_state_dict(model, tied_once=True) if is_sharded(model) else None
    if is_main():
        publish_dir(path, lambda tmp: _save_pretrained(model, tokenizer, tmp, state))
    barrier()
    return Path(path)


def save_checkpoint(
    run_dir: Path | str, step: int, *, model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, elapsed: float = 0.0, loop: dict[str, Any] | None = None, keep_last: int = 2,
    weights: WeightFiles | None = None,
) -> Path:
    """Write ``checkpoints/step_{step:06d}`` (weights, tokenizer, :class:`TrainerState`, manifest) atomically and
    prune all but the last ``keep_last``. Every rank calls it: a sharded ``model`` is written as each rank's
    shards (:func:`_save_sharded`), otherwise rank 0 writes ``save_pretrained`` weights (or ``weights.save``'s)."""
    target = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    state = TrainerState(step=step, world_size=world().size, scheduler=scheduler.state_dict(), optimizer=None,
                         rng=gather(rng_state()), elapsed=elapsed, loop=dict(loop or {}))
    if is_sharded(model):
        _save_sharded(target, model, optimizer, tokenizer, state)
    else:
        state.optimizer = optimizer.state_dict()

        def fill(tmp: Path) -> None:
            if weights is None:
                _save_pretrained(model, tokenizer, tmp)
            else:
                weights.save(tmp)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            state.write(tmp)
            write_manifest(tmp)

        if is_main():
            publish_dir(target, fill)
    if is_main():
        prune_checkpoints(run_dir, keep_last)
    barrier()  # the checkpoint is in place for every rank
    return target


def _save_sharded(target: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any,
                  state: TrainerState) -> None:
    """Each rank writes its shards of the model and AdamW (``torch.distributed.checkpoint`` into ``sharded/``) into
    rank 0's temporary folder; then rank 0 writes the trainer state, the tokenizer and the manifest, and renames
    the folder into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)

    def write_shards(tmp: Path) -> None:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED))

    def fill(tmp: Path) -> None:  # rank 0
        from_main(str(tmp))
        write_shards(tmp)
        barrier()
        state.write(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)

    if is_main():
        publish_dir(target, fill)
    else:
        write_shards(Path(from_main("")))
        barrier()


def load_checkpoint(
    run_dir: Path | str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    restore_rng: bool = True, weights: WeightFiles | None = None,
) -> Checkpoint | None:
    """Load the newest intact checkpoint of ``run_dir`` into ``model`` (through ``weights.load`` when given, the
    counterpart of :func:`save_checkpoint`'s), ``optimizer`` and ``scheduler`` in place (and this rank's RNG
    states); None when there is none. Every rank calls it.

    Each candidate is verified against its manifest and loaded (rank 0 picks the checkpoint for all); a damaged
    one is reported (a warning naming its path and the problem) and the next older one is tried. Raises
    :class:`CheckpointError` when checkpoints exist but none is intact.
    """
    sharded = is_sharded(model)

    def load(path: Path) -> TrainerState:
        state = TrainerState.read(path)
        if weights is not None:
            weights.load(path)
        elif not sharded:
            load_model_weights(model, path)
        return state

    found = main_first(lambda: newest_intact_checkpoint(run_dir, load))
    if found is None:
        return None
    path, state = found
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        states = {"model": model_state, "optimizer": optim_state}
        dcp.load(states, checkpoint_id=str(path / SHARDED))
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
    else:
        optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    rank = world().rank
    rng = state.rng[rank] if rank < len(state.rng) else None
    if restore_rng and rng is not None:
        set_rng_state(rng)
    elif restore_rng:
        warnings.warn(f"{path} holds no RNG state of rank {rank}: this rank's RNG starts afresh", stacklevel=2)
    return Checkpoint(path=path, state=state)


def checkpoint_world_size(path: Path) -> int:
    """How many ranks wrote checkpoint ``path``."""
    return TrainerState.read(path).world_size


def check_resume_world(run_dir: Path | str) -> None:
    """``ValueError`` when the run's newest checkpoint was written by another number of ranks than this run has."""
    found = list_checkpoints(run_dir)
    if not found:
        return
    wrote, now = checkpoint_world_size(found[-1]), world().size
    if wrote != now:
        how = "python -m … (no torchrun)" if wrote == 1 else f"torchrun with {wrote} ranks in all"
        raise ValueError(f"{found[-1]} was written by {wrote} rank(s) and this run has {now}: resume with {how}")


class Checkpointer:
    """The checkpoints of one run's policy: ``save(step)`` (every rank calls it), the newest one restored by
    ``resume()``, ``final()`` (the ``final/`` folder). ``optimizer`` is the AdamW and ``scheduler`` its schedule;
    ``weights`` how the policy's weights are held when not as ``save_pretrained`` (a LoRA run's adapter)."""

    def __init__(self, run_dir: Path, *, model: torch.nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer,
                 scheduler: Any, keep_last: int, weights: WeightFiles | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.keep_last = keep_last
        self.weights = weights

    def resume(self) -> Checkpoint | None:
        """Restore the newest intact checkpoint (None: there is none); ``ValueError`` when another number of
        ranks wrote it."""
        check_resume_world(self.run_dir)
        return load_checkpoint(self.run_dir, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               weights=self.weights)

    def save(self, step: int, *, elapsed: float, loop: dict[str, Any]) -> Path:
        return save_checkpoint(self.run_dir, step, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                               scheduler=self.scheduler, elapsed=elapsed, loop=loop, keep_last=self.keep_last,
                               weights=self.weights)

    def save_unless_newest(self, step: int, *, elapsed: float, loop: dict[str, Any]) -> Path:
        """The checkpoint of ``step``: the newest one when it is that step's already, else a new one."""
        kept = list_checkpoints(self.run_dir)
        return kept[-1] if kept and kept[-1].name == f"step_{step:06d}" else self.save(step, elapsed=elapsed, loop=loop)

    def final(self) -> Path:
        """``final/``: the policy and tokenizer, loadable by ``shell.evaluate`` and vLLM (``weights.final``'s folder
        when given: a LoRA run's merged weights with its adapter in ``final/adapter/``)."""
        if self.weights is None:
            return save_pretrained_atomic(self.model, self.tokenizer, self.run_dir / "final")
        if is_main():
            publish_dir(self.run_dir / "final", self.weights.final)
        barrier()
        return self.run_dir / "final"


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
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_STATE).exists()]
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
