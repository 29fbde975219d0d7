"""Checkpoints with everything needed for an exact resume, in one process or sharded under ``torchrun``.

A checkpoint is ``run_dir/checkpoints/step_XXXXXX/`` holding

* the policy: ``save_pretrained`` weights in one process; under torchrun ``sharded/``, the
  ``torch.distributed.checkpoint`` folder each rank writes its shards of the model and AdamW into;
* the tokenizer;
* ``trainer_state.safetensors``: one schema for both (:class:`TrainerState`): the step, the world size that
  wrote it, the LR schedule, AdamW's state (in one process; sharded ones keep it in ``sharded/``), every rank's
  RNG states, the run's elapsed seconds and the loop's own state; saved as data (:mod:`shell.safe_state`:
  tensors and JSON, never a pickle);
* ``manifest.json``: every file's size and SHA-256.

A checkpoint is data, never code: no file of it is read before the manifest is checked (a checkpoint without
one is not trusted), the trainer state is read as tensors and JSON, a sharded checkpoint's ``.metadata`` and
items through :func:`shell.safe_state.safe_dcp_reader` / :func:`~shell.safe_state.safe_dcp_planner`. A
checkpoint of the previous format (``trainer_state.pt``, a pickle) is refused naming the file; convert one
once, explicitly, with :func:`convert_legacy_checkpoint` if you trust where it came from.

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
from shell.safe_state import LEGACY_STATE, STATE_FILE, StateError, convert_legacy_state, load_state, save_state
from shell.fsdp import gather_state_dict, is_sharded
from shell.world import barrier, from_main, gather, is_main, main_first, world

__all__ = ["SHARDED", "Checkpoint", "CheckpointError", "Checkpointer", "TrainerState", "WeightFiles", "check_resume_world",
           "checkpoint_world_size", "convert_legacy_checkpoint", "list_checkpoints", "load_checkpoint", "load_model_weights",
           "newest_intact_checkpoint", "prune_checkpoints", "remove_stale_temporaries", "rng_state", "save_checkpoint",
           "save_pretrained_atomic", "set_rng_state", "verify_manifest", "write_manifest"]

MANIFEST = "manifest.json"
TRAINER_STATE = STATE_FILE
"""The trainer state's file (``trainer_state.safetensors``); the previous format's was ``trainer_state.pt``."""
SHARDED = "sharded"
"""The folder of a sharded checkpoint that holds its ``torch.distributed.checkpoint`` shards (model and AdamW)."""

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, or no intact one left): the message names the path."""

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class TrainerState:
    """``trainer_state.safetensors`` of every checkpoint, one process or sharded (data: :mod:`shell.safe_state`)."""

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
    def read(cls, folder: Path | str, *, verified: bool = False) -> TrainerState:
        """The trainer state of checkpoint ``folder``, after its manifest is checked (:func:`verify_manifest`;
        ``verified``: the caller just did). Read as tensors and JSON, never unpickled: a ``trainer_state.pt`` of
        the previous format is refused (:class:`CheckpointError` naming it; see :func:`convert_legacy_checkpoint`)."""
        folder = Path(folder)
        if not verified:
            verify_manifest(folder)
        try:
            raw = load_state(folder)
        except StateError as e:
            raise CheckpointError(str(e)) from None
        return cls.of(raw, where=folder / TRAINER_STATE)

    @classmethod
    def of(cls, raw: dict[str, Any], *, where: Path) -> TrainerState:
        """A trainer state from its fields (as :meth:`write` saved them); :class:`CheckpointError` naming ``where``
        when a field is missing or of the wrong kind."""
        kinds = {"step": int, "world_size": int, "scheduler": dict, "optimizer": (dict, type(None)), "rng": list,
                 "elapsed": (int, float), "loop": dict}
        for name, kind in kinds.items():
            if name not in raw or not isinstance(raw[name], kind) or isinstance(raw[name], bool):
                raise CheckpointError(f"{where}: no valid {name!r} field (not a trainer state this code wrote)")
        return cls(**{k: raw[k] for k in kinds})

    def write(self, folder: Path) -> None:
        save_state(folder, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def convert_legacy_checkpoint(folder: Path | str) -> Path:
    """Convert checkpoint ``folder`` of the previous format (``trainer_state.pt``, and a sharded one's
    ``rng_rank{r}.pt``: pickles) to ``trainer_state.safetensors``, once and explicitly, e.g.::

        python -c "from shell.checkpoint import convert_legacy_checkpoint as c; c('runs/x/checkpoints/step_000050')"

    Only for a checkpoint you trust where it came from: its manifest is checked first, and the pickles are read
    with ``torch.load(weights_only=True)`` (tensors, containers and NumPy's RNG arrays, nothing that can name a
    function: :func:`shell.safe_state.convert_legacy_state`), so a payload is refused there too. The old files
    are removed and the manifest rewritten; returns the new file."""
    folder = Path(folder)
    verify_manifest(folder)
    if not (folder / LEGACY_STATE).is_file():
        raise CheckpointError(f"{folder / LEGACY_STATE}: missing (nothing to convert)")
    try:
        convert_legacy_state(folder)
        raw = load_state(folder)
        if "scheduler" not in raw:  # the one-process layout before the two layouts shared one schema
            raw = {**raw, "world_size": 1, "rng": [raw["rng"]], **raw["optimizer"]}
        elif "rng" not in raw:  # the sharded layout before it: one RNG file per rank
            rng: list[dict[str, Any] | None] = []
            for r in range(int(raw["world_size"])):
                name = f"rng_rank{r}.pt"
                if (folder / name).is_file():
                    convert_legacy_state(folder, name=name)
                    rng.append(load_state(folder, name=f"rng_rank{r}.safetensors"))
                    (folder / f"rng_rank{r}.safetensors").unlink()
                else:
                    rng.append(None)
            raw = {**raw, "optimizer": None, "rng": rng}
        raw.setdefault("elapsed", 0.0)
        raw.setdefault("loop", {})
        state = TrainerState.of(raw, where=folder / LEGACY_STATE)
    except StateError as e:
        (folder / TRAINER_STATE).unlink(missing_ok=True)
        raise CheckpointError(str(e)) from None
    state.write(folder)
    (folder / LEGACY_STATE).unlink()
    for old in folder.glob("rng_rank*.pt"):
        old.unlink()
    write_manifest(folder)
    return folder / TRAINER_STATE


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

    def load(path: Path) -> TrainerState:  # newest_intact_checkpoint checked the manifest first
        state = TrainerState.read(path, verified=True)
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
        load_shards(path, states)
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


def load_shards(path: Path, states: dict[str, Any]) -> None:
    """Read the ``sharded/`` folder of checkpoint ``path`` into ``states`` (``{"model": …, "optimizer": …}`` as
    ``get_state_dict`` made them) in place, as data: its ``.metadata`` and non-tensor items through
    :func:`shell.safe_state.safe_dcp_reader` and :func:`~shell.safe_state.safe_dcp_planner` (torch's own reader and
    planner unpickle them unrestricted). Call it after the manifest is checked."""
    import torch.distributed.checkpoint as dcp

    from shell.safe_state import safe_dcp_planner, safe_dcp_reader

    dcp.load(states, storage_reader=safe_dcp_reader(path / SHARDED), planner=safe_dcp_planner())


def checkpoint_world_size(path: Path) -> int:
    """How many ranks wrote checkpoint ``path`` (its manifest checked first)."""
    return TrainerState.read(path).world_size


def check_resume_world(run_dir: Path | str) -> None:
    """``ValueError`` when the run's newest intact checkpoint was written by another number of ranks than this run
    has. Rank 0 picks it as a resume does (:func:`newest_intact_checkpoint`: each candidate's manifest checked
    before anything of it is read, a damaged one reported and the previous one tried) and decides for all."""
    found = main_first(lambda: newest_intact_checkpoint(run_dir, checkpoint_world_size))
    if found is None:
        return
    path, wrote = found
    now = world().size
    if wrote != now:
        how = "python -m … (no torchrun)" if wrote == 1 else f"torchrun with {wrote} ranks in all"
        raise ValueError(f"{path} was written by {wrote} rank(s) and this run has {now}: resume with {how}")


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

    def save(self, step: int, *, elapsed: float, loop: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None) -> Path:
        """Checkpoint ``step``; ``optimizer`` and ``scheduler``: others than the run's (the SFT warm start's own)."""
        return save_checkpoint(self.run_dir, step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer if optimizer is None else optimizer,
                               scheduler=self.scheduler if scheduler is None else scheduler, elapsed=elapsed, loop=loop,
                               keep_last=self.keep_last, weights=self.weights)

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


_VERIFIED: dict[Path, tuple[tuple[str, int, int], ...]] = {}
"""Folders this process verified, with their files' (name, size, mtime) then: a resume checks a checkpoint once
(:func:`check_resume_world` and :func:`load_checkpoint` both do), unless a file changed since."""


def _file_stats(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file() or p.is_symlink()))


def verify_manifest(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the file when ``folder`` has no readable manifest (a checkpoint without
    one is not trusted), when a file the manifest lists is missing, has another size or another checksum than it
    says, or when a file is not listed (nothing unchecked is ever read)."""
    folder = Path(folder)
    path = folder / MANIFEST
    stats = _file_stats(folder) if folder.is_dir() else ()
    if stats and _VERIFIED.get(folder.resolve()) == stats:
        return
    if not path.is_file() or path.is_symlink():
        raise CheckpointError(f"{path}: missing: a checkpoint without a manifest is not trusted (nothing of "
                              f"{folder} is read)")
    try:
        entries = json.loads(path.read_text())["files"]
        if not isinstance(entries, dict):
            raise ValueError("'files' is not a map")
        wants = {str(name): (int(want["bytes"]), str(want["sha256"])) for name, want in entries.items()}
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    listed = set()
    for name, (want_bytes, want_sha) in wants.items():
        f = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: names {name!r}, outside the checkpoint")
        if f.is_symlink() or not f.is_file():
            raise CheckpointError(f"{f}: missing" + (" (a link, not a file)" if f.is_symlink() else ""))
        size = f.stat().st_size
        if size != want_bytes:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {want_bytes} (truncated or overwritten)")
        if _sha256(f) != want_sha:
            raise CheckpointError(f"{f}: checksum differs from the manifest (the file is corrupted)")
        listed.add(name)
    unlisted = [name for name, _, _ in stats if name != MANIFEST and name not in listed]
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: not in the manifest (a file added after the checkpoint was "
                              "written is not trusted)")
    _VERIFIED[folder.resolve()] = stats


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first (those of the previous format too: loading refuses them by name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and ((p / TRAINER_STATE).exists() or (p / LEGACY_STATE).exists())]  # an old one: refused by name on load
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
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != TRAINER_STATE)  # a checkpoint's state: no weights
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
