"""Trainer state as data: a nested state saved in one safetensors file that cannot run code when it is loaded.

A checkpoint's trainer state (the optimizer's and scheduler's ``state_dict``, the loop's own state, the step,
the RNG states of Python, NumPy, torch and CUDA) is a tree of dicts, lists and tuples whose leaves are
``None``, booleans, numbers, strings, tensors and NumPy arrays. :func:`save_state` writes it as
``trainer_state.safetensors``: the tensors as the file's tensors (``t0``, ``t1``, …) and the tree as JSON in the
file's metadata, each tensor a ``{"__tensor__": "t0"}`` placeholder. Loading (:func:`load_state`) parses that
JSON and that tensor table and nothing else: unlike ``torch.load(weights_only=False)`` (pickle), no file
can name a function to call. Anything outside the grammar below is refused with a :class:`StateError`
naming the file and the place in the tree.

The JSON grammar (``value``)::

    null | true | false | number | string | [value, …]        (a list)
    {"__tuple__": [value, …]}                                 (a tuple)
    {"__dict__": [[key, value], …]}                           (a dict with a non-string or tag-like key;
                                                               key: null, bool, number, string or tuple)
    {"__tensor__": name}                                      (a tensor of the file)
    {"__ndarray__": name, "dtype": "<u4", "shape": [624]}     (a NumPy array of booleans or numbers,
                                                               stored as the bytes of a uint8 tensor)
    {string: value, …}                                        (a dict with string keys, none a tag)

A sharded checkpoint (``torch.distributed.checkpoint``) pickles its ``.metadata`` and its non-tensor items, and
its own loader unpickles both without restriction: :func:`safe_dcp_reader` and :func:`safe_dcp_planner` load
one with only the metadata's own classes allowed and the items read with ``torch.load(weights_only=True)``.

A state of the previous format (``trainer_state.pt``, a pickle) is never unpickled here: :func:`load_state`
refuses it naming the file, and :func:`convert_legacy_state` converts one explicitly with
``torch.load(weights_only=True)`` and only the NumPy types of an RNG state allowed, so a pickled payload
is refused there too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["LEGACY_STATE", "STATE_FILE", "StateError", "convert_legacy_state", "load_dcp_metadata", "load_state",
           "safe_dcp_planner", "safe_dcp_reader", "save_state"]

STATE_FILE = "trainer_state.safetensors"
"""The file :func:`save_state` writes in a checkpoint folder."""
LEGACY_STATE = "trainer_state.pt"
"""The previous format's file (a pickle), refused by :func:`load_state`."""

_FORMAT = "reasoning-rl trainer state"
_VERSION = 1
_TAGS = ("__tuple__", "__dict__", "__tensor__", "__ndarray__")
_MAX_DEPTH = 64
_NDARRAY_KINDS = "biuf"  # bool, signed and unsigned integers, floats: never objects


class StateError(ValueError):
    """A trainer state that cannot be saved or loaded as data: the message names the file (or the place in
    the state) and what is wrong."""


# ------------------------------------------------------------------------------------------------ saving


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], seen: set[int], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise StateError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach().to("cpu")
        if not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.contiguous().clone()  # safetensors refuses views of one storage
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NDARRAY_KINDS:
            raise StateError(f"{where}: a NumPy array of dtype {value.dtype} is not plain data")
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8).copy())
        return {"__ndarray__": name, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic) and value.dtype.kind in _NDARRAY_KINDS:
        return _encode(value.item(), where, tensors, seen, depth)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]", tensors, seen, depth + 1) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]", tensors, seen, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = list(value.items())
        if all(isinstance(k, str) and k not in _TAGS for k, _ in items):
            return {k: _encode(v, f"{where}[{k!r}]", tensors, seen, depth + 1) for k, v in items}
        return {"__dict__": [[_encode_key(k, where), _encode(v, f"{where}[{k!r}]", tensors, seen, depth + 1)]
                             for k, v in items]}
    raise StateError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} is not plain data "
                     "(a trainer state holds dicts, lists, tuples, None, booleans, numbers, strings, tensors and "
                     "NumPy arrays)")


def _encode_key(key: Any, where: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return {"__tuple__": [_encode_key(k, where) for k in key]}
    raise StateError(f"{where}: a dict key of type {type(key).__qualname__} is not plain data")


def save_state(folder: Path | str, state: Mapping[str, Any], *, name: str = STATE_FILE) -> Path:
    """Write ``state`` (a nested trainer state, see the module docstring) as ``folder/<name>`` (by default
    ``trainer_state.safetensors``; e.g. ``rng_rank1.safetensors`` for one rank's RNG states) and return its path. Tensors are saved from the CPU, bit for bit; tuples stay tuples and integer dict keys
    (an optimizer's parameter ids) stay integers. Raises :class:`StateError` naming the place of the first value
    that is not plain data. Write into a checkpoint's temporary folder (the file itself is not renamed into
    place)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(state), "state", tensors, set(), 0)
    text = json.dumps({"format": _FORMAT, "version": _VERSION, "state": tree}, allow_nan=True, separators=(",", ":"))
    path = Path(folder) / name
    save_file(tensors, str(path), metadata={"trainer_state": text})
    return path


# ------------------------------------------------------------------------------------------------ loading


def _decode(node: Any, where: str, tensors: Mapping[str, torch.Tensor], used: set[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise StateError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, (int, float)):
        return node
    if isinstance(node, list):
        return [_decode(v, f"{where}[{i}]", tensors, used, depth + 1) for i, v in enumerate(node)]
    if not isinstance(node, dict):  # pragma: no cover - json.loads makes nothing else
        raise StateError(f"{where}: not a JSON value")
    tag = next(iter(node), None) if node and next(iter(node)) in _TAGS else None
    if tag is None:
        return {k: _decode(v, f"{where}[{k!r}]", tensors, used, depth + 1) for k, v in node.items()}
    if tag == "__tuple__" and len(node) == 1 and isinstance(node[tag], list):
        return tuple(_decode(v, f"{where}[{i}]", tensors, used, depth + 1) for i, v in enumerate(node[tag]))
    if tag == "__dict__" and len(node) == 1 and isinstance(node[tag], list):
        out: dict[Any, Any] = {}
        for pair in node[tag]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise StateError(f"{where}: a __dict__ entry must be a [key, value] pair")
            key = _decode_key(pair[0], where)
            out[key] = _decode(pair[1], f"{where}[{key!r}]", tensors, used, depth + 1)
        return out
    if tag == "__tensor__" and len(node) == 1:
        return _tensor(node[tag], where, tensors, used)
    if tag == "__ndarray__" and set(node) == {"__ndarray__", "dtype", "shape"}:
        raw = _tensor(node[tag], where, tensors, used)
        shape = node["shape"]
        if not (isinstance(node["dtype"], str) and isinstance(shape, list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise StateError(f"{where}: a NumPy array needs a dtype string and a shape of sizes")
        try:
            dtype = np.dtype(node["dtype"])
        except TypeError:
            raise StateError(f"{where}: unknown NumPy dtype {node['dtype']!r}") from None
        if dtype.kind not in _NDARRAY_KINDS or raw.dtype != torch.uint8 or raw.dim() != 1:
            raise StateError(f"{where}: a NumPy array of dtype {dtype} is not plain data")
        if raw.numel() != dtype.itemsize * math.prod(shape):
            raise StateError(f"{where}: {raw.numel()} bytes do not make a {dtype} array of shape {tuple(shape)}")
        return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(shape).copy()
    raise StateError(f"{where}: a malformed {tag} entry")


def _decode_key(node: Any, where: str) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and list(node) == ["__tuple__"] and isinstance(node["__tuple__"], list):
        return tuple(_decode_key(k, where) for k in node["__tuple__"])
    raise StateError(f"{where}: a dict key must be null, a boolean, a number, a string or a tuple of those")


def _tensor(name: Any, where: str, tensors: Mapping[str, torch.Tensor], used: set[str]) -> torch.Tensor:
    if not isinstance(name, str) or name not in tensors:
        raise StateError(f"{where}: names tensor {name!r}, which the file does not hold")
    if name in used:
        raise StateError(f"{where}: tensor {name!r} is named twice")
    used.add(name)
    return tensors[name]


def load_state(folder: Path | str, *, name: str = STATE_FILE, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state :func:`save_state` wrote as ``folder/<name>`` (tensors on ``device``). Reads JSON and a
    safetensors tensor table only, never a pickle: a ``trainer_state.pt`` of the previous format is refused
    (see :func:`convert_legacy_state`), and so is a file that is not exactly what :func:`save_state` writes,
    with a :class:`StateError` naming it."""
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        legacy = folder / (LEGACY_STATE if name == STATE_FILE else Path(name).with_suffix(".pt").name)
        if legacy.exists():
            raise StateError(f"{legacy}: a trainer state of the previous format (a pickle, which can run "
                             f"code when loaded) is not read; convert it once, if you trust where it came from, with "
                             f"shell.safe_state.convert_legacy_state")
        raise StateError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            text = (f.metadata() or {}).get("trainer_state")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors for a damaged header or data
        raise StateError(f"{path}: not a safetensors file ({e})") from None
    if text is None:
        raise StateError(f"{path}: holds no trainer state (no 'trainer_state' metadata)")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{path}: its trainer state is not valid JSON ({e})") from None
    if not (isinstance(doc, dict) and doc.get("format") == _FORMAT and isinstance(doc.get("state"), dict)):
        raise StateError(f"{path}: not a {_FORMAT}")
    if doc.get("version") != _VERSION:
        raise StateError(f"{path}: version {doc.get('version')!r} of the format; this code reads version {_VERSION}")
    used: set[str] = set()
    try:
        state = _decode(doc["state"], "state", tensors, used, 0)
    except StateError as e:
        raise StateError(f"{path}: {e}") from None
    if set(tensors) - used:
        raise StateError(f"{path}: holds tensors its trainer state does not name: {sorted(set(tensors) - used)[:5]}")
    return state


# ------------------------------------------------------------------------------------------------ the old format


def convert_legacy_state(folder: Path | str, *, name: str = LEGACY_STATE) -> Path:
    """Convert ``folder/<name>`` (by default ``trainer_state.pt``, the previous, pickled format; or a rank's
    ``rng_rank1.pt``) into the same name with ``.safetensors``, once and explicitly; returns the new file. It is read with ``torch.load(weights_only=True)``, which unpickles
    only tensors and containers, with nothing more allowed than the NumPy types of an RNG state (arrays and
    their dtypes): a pickle that names any other callable (``os.system``, say) is refused with a
    :class:`StateError` and nothing it names is called. The old file is left in place (delete it, and refresh
    the checkpoint's manifest, once the conversion is checked)."""
    folder = Path(folder)
    legacy = folder / name
    # what a pickled np.random.get_state() names: the array constructor NumPy's pickles use, arrays, dtypes
    multiarray = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core to np._core
    allowed = [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateError(f"{legacy}: missing") from None
    except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError for a forbidden global, and damaged files
        raise StateError(f"{legacy}: refused: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise StateError(f"{legacy}: not a trainer state (a {type(state).__name__})")
    return save_state(folder, state, name=Path(name).with_suffix(".safetensors").name)


# ------------------------------------------------------------------------------------------------ sharded checkpoints


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_ALLOWED = {
    (_DCP_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                       "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                       "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}
"""What the ``.metadata`` of a ``torch.distributed.checkpoint`` folder names (torch 2.13, checked by listing a
saved one's globals): its dataclasses, sizes, dtypes, layouts and paths; nothing that runs code."""


def load_dcp_metadata(path: Path | str) -> Any:
    """Unpickle a ``torch.distributed.checkpoint`` ``.metadata`` file allowing only the classes it is made of
    (and torch dtypes): ``torch.distributed.checkpoint``'s own reader uses a plain ``pickle.load``, which runs
    whatever the file names. Raises :class:`StateError` naming the file and the refused global."""
    import io
    import pickle

    path = Path(path)

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _DCP_ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            raise StateError(f"{path}: names {module}.{name}, which a checkpoint's metadata never holds (refused)")

    data = path.read_bytes()  # a missing file stays a FileNotFoundError (dcp looks for a rank's own first)
    try:
        return Restricted(io.BytesIO(data)).load()
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle
        raise StateError(f"{path}: unreadable checkpoint metadata ({e})") from None


def safe_dcp_reader(checkpoint_id: Path | str) -> Any:
    """A ``torch.distributed.checkpoint`` storage reader for ``checkpoint_id`` (a ``sharded/`` folder) whose
    metadata is read with :func:`load_dcp_metadata`; pass it with :func:`safe_dcp_planner` to ``dcp.load``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            metadata = load_dcp_metadata(Path(str(self.path)) / name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(checkpoint_id))


def safe_dcp_planner() -> Any:
    """A ``torch.distributed.checkpoint`` load planner whose non-tensor items (an optimizer's ``param_groups``
    values, say: saved as bytes) are read with ``torch.load(weights_only=True)``: the default planner reads them
    with ``weights_only=False``, a pickle that runs whatever it names. A refused item raises :class:`StateError`."""
    import io

    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError for a forbidden global
                raise StateError(f"sharded checkpoint item {read_item.dest_index.fqn!r} refused: "
                                 f"{str(e).splitlines()[0]}") from None
            clean = io.BytesIO()
            torch.save(obj, clean)  # plain data now: the default planner may unpickle it as it does
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafePlanner()
