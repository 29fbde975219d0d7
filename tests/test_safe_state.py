"""The trainer-state format that is data (issue 28, case 1): safetensors + JSON round trips of a real trainer
state and of arbitrary nested states, and refusals of everything else, pickled payloads first of all."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from doubles import tiny_model
from shell.checkpoint import rng_state, set_rng_state
from shell.safe_state import LEGACY_STATE, STATE_FILE, StateError, convert_legacy_state, load_state, save_state


def same(a, b) -> bool:
    """Equal values of exactly the same types, all the way down (tuples stay tuples, ints stay ints)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def trainer_state() -> tuple[dict, torch.optim.Optimizer]:
    """What a checkpoint holds after one AdamW step on the tiny model: optimizer, schedule, loop, RNG."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model(torch.tensor([[1, 2, 3, 4]])).logits.square().mean().backward()
    optimizer.step()
    scheduler.step()
    return {"step": 7, "rng": rng_state(), "elapsed": 12.5, "loop": {"sft_steps": 3, "best": None},
            "optimizer": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}}, optimizer


def test_a_trainer_state_round_trips_exactly_and_restores_optimizer_and_rng(tmp_path):
    state, optimizer = trainer_state()
    path = save_state(tmp_path, state)
    assert path == tmp_path / STATE_FILE and [p.name for p in tmp_path.iterdir()] == [STATE_FILE]
    back = load_state(tmp_path)
    assert same(back, state)
    assert set(back["optimizer"]["optimizer"]["state"]) == set(range(len(optimizer.param_groups[0]["params"])))
    optimizer.load_state_dict(back["optimizer"]["optimizer"])  # what a resume does
    assert same(optimizer.state_dict(), state["optimizer"]["optimizer"])
    set_rng_state(back["rng"])
    drawn = (random.random(), np.random.rand(), torch.rand(3).tolist())
    set_rng_state(state["rng"])
    assert drawn == (random.random(), np.random.rand(), torch.rand(3).tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_and_rng_states_are_saved_from_the_cpu(tmp_path):
    state = {"cuda": torch.cuda.get_rng_state_all(), "moment": torch.ones(3, device="cuda", dtype=torch.bfloat16)}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(back["cuda"], state["cuda"]))
    assert back["moment"].device.type == "cpu" and torch.equal(back["moment"], state["moment"].cpu())
    assert load_state(tmp_path, device="cuda")["moment"].device.type == "cuda"


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
tensors = st.builds(lambda shape, dtype, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3), st.sampled_from([torch.float32, torch.bfloat16, torch.int64,
                                                                               torch.uint8, torch.bool]), st.integers(0, 99))
arrays = st.builds(lambda n, dtype: np.arange(n).astype(dtype), st.integers(0, 5),
                   st.sampled_from([np.uint32, np.int8, np.float64, np.bool_]))
keys = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4) | st.sampled_from(
    ["__tuple__", "__dict__", "__tensor__", "__ndarray__", "dtype"]) | st.tuples(st.integers(0, 3), st.text(max_size=2))
values = st.recursive(scalars | tensors | arrays, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                      | st.dictionaries(keys, inner, max_size=3), max_leaves=12)


@given(st.dictionaries(st.text(max_size=5), values, max_size=4))
def test_any_nested_state_of_plain_data_round_trips(tmp_path_factory, state):
    folder = tmp_path_factory.mktemp("state")
    save_state(folder, state)
    assert same(load_state(folder), state)


@pytest.mark.parametrize(("value", "where"), [
    (object(), "state['loop']['x']"),
    (lambda: 0, "state['loop']['x']"),
    ({1, 2}, "state['loop']['x']"),
    ([1, np.array([object()], dtype=object)], "state['loop']['x'][1]"),
    ({frozenset(): 1}, "state['loop']['x']"),
])
def test_what_is_not_plain_data_is_refused_on_save_naming_its_place(tmp_path, value, where):
    with pytest.raises(StateError, match=f"^{__import__('re').escape(where)}: "):
        save_state(tmp_path, {"loop": {"x": value}})


# ------------------------------------------------------------------------------------------------ payloads


class Payload:
    """A pickle that runs a shell command when it is unpickled (what an attacker plants in a checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(folder: Path, marker: Path, name: str = LEGACY_STATE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "rng": rng_state(), "x": Payload(marker)}, folder / name)
    return folder / name


def test_the_payload_is_real(tmp_path):  # the other tests' payload does run when unpickled as torch.load did
    marker = tmp_path / "ran"
    plant(tmp_path / "ckpt", marker)
    torch.load(tmp_path / "ckpt" / LEGACY_STATE, weights_only=False)
    assert marker.exists()


def test_a_pickled_state_of_the_previous_format_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    legacy = plant(tmp_path / "ckpt", marker)
    with pytest.raises(StateError, match=f"{legacy}: a trainer state of the previous format"):
        load_state(tmp_path / "ckpt")
    assert not marker.exists()


def test_the_explicit_conversion_refuses_a_payload_and_converts_a_clean_state(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "bad", marker)
    with pytest.raises(StateError, match="refused"):
        convert_legacy_state(tmp_path / "bad")
    assert not marker.exists() and not (tmp_path / "bad" / STATE_FILE).exists()
    state, _ = trainer_state()
    (tmp_path / "good").mkdir()
    torch.save(state, tmp_path / "good" / LEGACY_STATE)
    convert_legacy_state(tmp_path / "good")
    assert same(load_state(tmp_path / "good"), state)


def test_a_pickle_under_the_new_name_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "ckpt", marker, name=STATE_FILE)
    with pytest.raises(StateError, match=f"{tmp_path / 'ckpt' / STATE_FILE}: not a safetensors file"):
        load_state(tmp_path / "ckpt")
    assert not marker.exists()


def forge(folder: Path, tree, tensors=None, *, version=1) -> None:
    from safetensors.torch import save_file

    doc = {"format": "reasoning-rl trainer state", "version": version, "state": tree}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {}, str(folder / STATE_FILE), metadata={"trainer_state": json.dumps(doc)})


@pytest.mark.parametrize(("tree", "tensors", "message"), [
    ({"x": {"__tensor__": "t9"}}, None, "names tensor 't9', which the file does not hold"),
    ({"x": {"__tensor__": "t0"}, "y": {"__tensor__": "t0"}}, {"t0": torch.zeros(1)}, "named twice"),
    ({}, {"t0": torch.zeros(1)}, "holds tensors its trainer state does not name"),
    ({"x": {"__ndarray__": "t0", "dtype": "|O", "shape": [1]}}, {"t0": torch.zeros(8, dtype=torch.uint8)}, "not plain data"),
    ({"x": {"__ndarray__": "t0", "dtype": "<u4", "shape": [3]}}, {"t0": torch.zeros(8, dtype=torch.uint8)}, "8 bytes"),
    ({"x": {"__reduce__": ["os.system", "touch x"]}}, None, None),  # just a dict with that key: data, nothing called
    ({"x": {"__tuple__": [1], "extra": 2}}, None, "malformed __tuple__"),
    ({"x": {"__dict__": [[{"a": 1}, 2]]}}, None, "a dict key must be"),
    ({"x": {"__dict__": [[1]]}}, None, "must be a [key, value] pair"),
])
def test_a_forged_state_is_refused_naming_the_file(tmp_path, tree, tensors, message):
    forge(tmp_path, tree, tensors)
    if message is None:
        assert load_state(tmp_path) == tree
        return
    with pytest.raises(StateError) as exc:
        load_state(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / STATE_FILE}: ") and message in str(exc.value)


def test_a_deep_forged_state_and_other_versions_are_refused(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    forge(tmp_path / "deep", deep)
    with pytest.raises(StateError, match="nested more than 64 levels"):
        load_state(tmp_path / "deep")
    forge(tmp_path / "v2", {}, version=2)
    with pytest.raises(StateError, match="version 2"):
        load_state(tmp_path / "v2")
    with pytest.raises(StateError, match="missing"):
        load_state(tmp_path / "nothing")


def test_a_ranks_rng_file_round_trips_under_its_own_name_and_its_old_form_is_refused(tmp_path):
    state = rng_state()
    path = save_state(tmp_path, state, name="rng_rank1.safetensors")
    assert path.name == "rng_rank1.safetensors" and same(load_state(tmp_path, name="rng_rank1.safetensors"), state)
    marker = tmp_path / "ran"
    plant(tmp_path / "old", marker, name="rng_rank1.pt")
    with pytest.raises(StateError, match="rng_rank1.pt: a trainer state of the previous format"):
        load_state(tmp_path / "old", name="rng_rank1.safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ sharded (dcp)


def dcp_state():
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def test_a_sharded_checkpoint_loads_through_the_safe_reader_and_planner(tmp_path):
    import copy

    import torch.distributed.checkpoint as dcp

    from shell.safe_state import safe_dcp_planner, safe_dcp_reader

    saved = dcp_state()
    dcp.save(saved, checkpoint_id=str(tmp_path / "sharded"))
    target = copy.deepcopy(saved)
    for part in (target["model"], target["optimizer"]["state"]["weight"]):
        for value in part.values():
            value.zero_()
    target["optimizer"]["param_groups"][0]["lr"] = 0.5
    dcp.load(target, storage_reader=safe_dcp_reader(tmp_path / "sharded"), planner=safe_dcp_planner())
    assert same(target["model"], saved["model"])
    assert torch.equal(target["optimizer"]["state"]["weight"]["exp_avg"], saved["optimizer"]["state"]["weight"]["exp_avg"])
    assert target["optimizer"]["param_groups"][0]["lr"] == 1e-3  # a non-tensor item, read as data


def test_a_payload_in_a_sharded_checkpoints_metadata_never_runs(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from shell.safe_state import load_dcp_metadata, safe_dcp_planner, safe_dcp_reader

    state = dcp_state()
    dcp.save(state, checkpoint_id=str(tmp_path / "sharded"))
    marker = tmp_path / "ran"
    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(StateError, match=r"\.metadata: names (posix|os)\.system, which a checkpoint's metadata never"):
        load_dcp_metadata(tmp_path / "sharded" / ".metadata")  # what a loader checks first, for a clear message
    with pytest.raises(BaseException, match="CheckpointException"):  # dcp wraps the reader's StateError in its
        dcp.load(state, storage_reader=safe_dcp_reader(tmp_path / "sharded"), planner=safe_dcp_planner())  # own
    assert not marker.exists()
    with pytest.raises(BaseException):  # what torch's own reader does with it: runs it
        dcp.load(state, checkpoint_id=str(tmp_path / "sharded"))
    assert marker.exists()


def test_a_payload_in_a_sharded_checkpoints_items_never_runs(tmp_path):
    import torch.distributed.checkpoint as dcp

    from shell.safe_state import safe_dcp_planner, safe_dcp_reader

    marker = tmp_path / "ran"
    dcp.save({"w": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "sharded"))
    assert not marker.exists()  # saving pickles it without calling it
    target = {"w": torch.zeros(2), "extra": 0}
    with pytest.raises(BaseException) as exc:  # dcp's CheckpointException (a BaseException) wraps the StateError
        dcp.load(target, storage_reader=safe_dcp_reader(tmp_path / "sharded"), planner=safe_dcp_planner())
    assert "sharded checkpoint item 'extra' refused" in repr(getattr(exc.value, "failures", exc.value))
    assert not marker.exists()
    dcp.load(target, checkpoint_id=str(tmp_path / "sharded"))  # torch's own planner: runs it
    assert marker.exists()
