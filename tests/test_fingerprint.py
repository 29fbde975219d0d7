"""Data fingerprints for resume checks (issue 28, cases 9 and 10's pure part)."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shell.data import SFTExample, load_dataset
from shell.data.loading import DataConfig
from shell.fingerprint import (
    FINGERPRINT_FILE, file_fingerprint, fingerprint_changes, read_fingerprints, records_fingerprint, write_fingerprints,
)


def math_file(path, n):
    path.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def test_replacing_the_data_file_changes_the_fingerprint(tmp_path):
    # case 10: the training file replaced between a run and its resume (16 problems -> 5)
    data = math_file(tmp_path / "train.jsonl", 16)
    before = records_fingerprint(load_dataset(DataConfig(path=str(data))))
    assert before["records"] == 16
    assert records_fingerprint(load_dataset(DataConfig(path=str(data)))) == before  # the same data: the same print
    math_file(data, 5)
    after = records_fingerprint(load_dataset(DataConfig(path=str(data))))
    assert after["records"] == 5 and after["sha256"] != before["sha256"]
    changes = fingerprint_changes({"train": before}, {"train": after})
    assert changes == {"data fingerprint: train": (f"16 records, sha256 {before['sha256'][:12]}",
                                                    f"5 records, sha256 {after['sha256'][:12]}")}


def test_the_fingerprint_is_of_what_training_sees_not_of_provenance(tmp_path):
    a = math_file(tmp_path / "a.jsonl", 4)
    b = math_file(tmp_path / "b.jsonl", 4)  # the same records in another file
    fa, fb = (records_fingerprint(load_dataset(DataConfig(path=str(p)))) for p in (a, b))
    assert fa == fb
    embedded = records_fingerprint(load_dataset(DataConfig(limit=8)))
    assert embedded == records_fingerprint(load_dataset(DataConfig(limit=8)))
    assert embedded != records_fingerprint(load_dataset(DataConfig(limit=8, seed=1)))
    pairs = [SFTExample(prompt="p", response="r", ground_truth="1", where="x:1")]
    moved = [SFTExample(prompt="p", response="r", ground_truth="1", where="y:9")]
    assert records_fingerprint(pairs) == records_fingerprint(moved)
    assert records_fingerprint(pairs) != records_fingerprint([SFTExample(prompt="p", response="r2", ground_truth="1")])


@given(st.lists(st.text(max_size=6), max_size=6), st.lists(st.text(max_size=6), max_size=6))
def test_equal_fingerprints_mean_equal_record_lists(a, b):
    assert (records_fingerprint(a) == records_fingerprint(b)) == (a == b)


def test_a_known_value():  # hand-worked: the SHA-256 of the canonical lines '"a"\n"b"\n'
    assert records_fingerprint(["a", "b"]) == {"records": 2, "sha256": hashlib.sha256(b'"a"\n"b"\n').hexdigest()}


def test_file_fingerprint_is_size_and_hash(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"hello\n")
    assert file_fingerprint(f) == {"bytes": 6, "sha256": hashlib.sha256(b"hello\n").hexdigest()}


def test_fingerprints_are_stored_and_compared_per_data_set(tmp_path):
    train, held = records_fingerprint(["q1", "q2"]), records_fingerprint(["v1"])
    assert read_fingerprints(tmp_path) is None  # a run from before fingerprints were kept
    path = write_fingerprints(tmp_path, {"train": train, "held_out": held})
    assert path == tmp_path / FINGERPRINT_FILE
    saved = read_fingerprints(tmp_path)
    assert saved == {"train": train, "held_out": held}
    assert fingerprint_changes(saved, {"train": train, "held_out": held}) == {}
    assert set(fingerprint_changes(saved, {"train": train})) == {"data fingerprint: held_out"}
    assert fingerprint_changes(saved, {"train": train})["data fingerprint: held_out"][1] == "none"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: unreadable"):
        read_fingerprints(tmp_path)
