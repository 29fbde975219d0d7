"""MATH / GSM8K / SFT jsonl files: read line by line, each malformed line a ``DataError`` naming
``file:line`` and the field.

- ``math``: {problem, answer} or {problem, solution with ``\\boxed{...}``} (its last box, by the grader's
  rule :func:`core.extract_boxed`, the one that reads the responses); records without a usable answer (MATH
  train's two empty answers) are skipped and counted.
- ``gsm8k``: {question, answer ending in ``#### <number>``}.
- ``sft``: {prompt, response[, ground_truth | answer]} (the course's sft.jsonl, ``make_sft_data`` output).
- ``embedded``: embedded-task problems written out ({question, answer, solution, source "embedded:…", difficulty,
  …}: ``example_record``, e.g. by ``shell.pass_rates``), read back as the same problems.

Every format keeps a record's ``pass_rate``, ``num_samples`` and ``num_correct`` (``shell.pass_rates``) in
``Example.meta``, where the curricula (``shell/data/curriculum.py``) find them.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from core import extract_boxed
from shell.data.records import DataError, DataFileNotFoundError, Dataset, Example, SFTExample

__all__ = [
    "FORMATS",
    "Format",
    "detect_format",
    "load_jsonl_dataset",
    "load_sft_examples",
    "PASS_RATE_FIELDS",
    "read_jsonl",
    "shuffle_limit",
]

Format = Literal["auto", "math", "gsm8k", "sft", "embedded"]
FORMATS: tuple[str, ...] = ("math", "gsm8k", "sft", "embedded")

PASS_RATE_FIELDS: tuple[str, ...] = ("pass_rate", "num_samples", "num_correct")
"""Fields ``shell.pass_rates`` adds to a record; every loader keeps them in ``Example.meta``."""


def read_jsonl(path: Path, *, complete_lines_only: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line; malformed lines raise DataError.
    ``complete_lines_only``: a last line without its newline (a writer killed mid-line) is skipped, not parsed."""
    if not path.is_file():
        raise DataFileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if complete_lines_only and not raw.endswith(b"\n"):
                return
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: invalid JSON (nested more than {MAX_DEPTH} levels deep)") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            problem = _unusable_value(obj)
            if problem is not None:
                raise DataError(f"{path}:{lineno}: {problem}")
            yield lineno, obj


MAX_DEPTH = 64
"""Most levels of nesting a record may have (the records we read are flat: strings, numbers, a list of
alternatives); deeper values are refused before anything recurses over them."""


def _unusable_value(record: dict[str, Any]) -> str | None:
    """Why ``record`` cannot be used (a value nested deeper than :data:`MAX_DEPTH`, or text that is not valid
    Unicode: a lone surrogate escape such as ``"\\ud800"``, which no tokenizer can encode), naming the top-level
    field; None if it is fine. Walks the record without recursion."""
    stack: list[tuple[Any, int, str]] = [(value, 1, str(key)) for key, value in record.items()]
    stack += [(key, 1, str(key)) for key in record]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_DEPTH:
            return f"field {field!r} is nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"field {field!r} holds text that is not valid Unicode (a lone surrogate "
                        f"{value[e.start]!r} at character {e.start})")
        elif isinstance(value, dict):
            stack += [(v, depth + 1, field) for v in value.values()]
            stack += [(k, depth + 1, field) for k in value]
        elif isinstance(value, list):
            stack += [(v, depth + 1, field) for v in value]
    return None


def _field(rec: dict[str, Any], name: str, where: str, *, required: bool = True) -> str | None:
    if name not in rec or (not required and rec[name] is None):
        if required:
            raise DataError(f"{where}: field {name!r} is missing")
        return None
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def detect_format(fields: Iterable[str]) -> str:
    """``math``, ``gsm8k``, ``sft`` or ``embedded`` from a record's field names (``embedded``: a record, i.e. a
    mapping, with ``question`` and a ``source`` starting ``embedded:``); DataError if none fits."""
    keys = set(fields)
    if isinstance(fields, dict) and "question" in keys and str(fields.get("source", "")).startswith("embedded:"):
        return "embedded"
    if "problem" in keys:
        return "math"
    if {"prompt", "response"} <= keys:
        return "sft"
    if "question" in keys:
        return "gsm8k"
    raise DataError(
        f"cannot detect the data format from fields {sorted(keys)}: expected 'problem' (MATH), "
        "'question' + 'answer' (GSM8K) or 'prompt' + 'response' (SFT)"
    )


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def _math_example(rec: dict[str, Any], where: str, meta: dict[str, Any]) -> Example | None:
    problem = _field(rec, "problem", where)
    solution = _field(rec, "solution", where, required=False)
    answer = _field(rec, "answer", where, required=False)
    if answer is None and solution is None:
        raise DataError(f"{where}: field 'answer' is missing (and there is no 'solution' to take it from)")
    answer = (answer or "").strip()
    if not answer and solution is not None:
        answer = (extract_boxed(solution) or "").strip()
    if not answer:
        return None
    for key in ("subject", "level", "unique_id"):
        if key in rec:
            meta[key] = rec[key]
    return Example(question=problem, answer=answer, solution=solution, meta=meta)  # type: ignore[arg-type]


def _gsm8k_example(rec: dict[str, Any], where: str, meta: dict[str, Any]) -> Example | None:
    question = _field(rec, "question", where)
    full = _field(rec, "answer", where)
    assert question is not None and full is not None
    if "####" not in full:
        raise DataError(f"{where}: field 'answer' has no '#### <answer>' line")
    reasoning, _, final = full.rpartition("####")
    answer = final.strip().replace(",", "")
    if not answer:
        return None
    solution = _GSM8K_CALC.sub("", reasoning).strip() or None
    return Example(question=question, answer=answer, solution=solution, meta=meta)


def _embedded_example(rec: dict[str, Any], where: str, meta: dict[str, Any]) -> Example | None:
    question = _field(rec, "question", where)
    answer = _field(rec, "answer", where)
    solution = _field(rec, "solution", where, required=False)
    assert question is not None and answer is not None
    if not answer.strip():
        return None
    extra = {k: v for k, v in rec.items() if k not in ("question", "answer", "solution")}
    if "difficulty" in extra and not (isinstance(extra["difficulty"], int) and not isinstance(extra["difficulty"], bool)):
        raise DataError(f"{where}: field 'difficulty' must be an integer, got {extra['difficulty']!r}")
    return Example(question=question, answer=answer.strip(), solution=solution,
                   meta={**extra, "file": meta["source"], "line": meta["line"]})


def _pass_rate_fields(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """The record's ``pass_rate`` (a number in [0, 1]), ``num_samples`` and ``num_correct`` (integers), checked."""
    out: dict[str, Any] = {}
    for key in PASS_RATE_FIELDS:
        if key not in rec:
            continue
        value = rec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: field {key!r} must be a number, got {value!r}")
        if key == "pass_rate" and not 0.0 <= value <= 1.0:
            raise DataError(f"{where}: field 'pass_rate' must be in [0, 1], got {value}")
        out[key] = value
    return out


_PARSERS = {"math": _math_example, "gsm8k": _gsm8k_example, "embedded": _embedded_example}


def load_jsonl_dataset(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> Dataset:
    """Examples from a MATH, GSM8K or embedded-record jsonl file: skip unusable records, then shuffle (seeded), then limit."""
    path = Path(path).expanduser()
    examples: list[Example] = []
    skipped: list[int] = []
    fmt = None if format == "auto" else format
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; not {format!r}")
    for lineno, rec in read_jsonl(path):
        if fmt is None:
            try:
                fmt = detect_format(rec)
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
        if fmt == "sft":
            raise DataError(
                f"{path}: is an SFT file ({{prompt, response}} records), not questions with answers; "
                "load it with load_sft_examples / sft_examples_for"
            )
        where = f"{path}:{lineno}"
        ex = _PARSERS[fmt](rec, where, {"source": str(path), "line": lineno})
        if ex is not None:
            ex.meta.update(_pass_rate_fields(rec, where))
        if ex is None:
            skipped.append(lineno)
        else:
            examples.append(ex)
    if not examples:
        detail = f" ({len(skipped)} records skipped for an empty answer)" if skipped else ""
        raise DataError(f"{path}: no usable examples{detail}")
    examples = shuffle_limit(examples, shuffle=shuffle, seed=seed, limit=limit)
    return Dataset(
        examples=tuple(examples),
        source=str(path),
        format=fmt or "unknown",
        skipped=len(skipped),
        skipped_lines=tuple(skipped),
    )


def shuffle_limit(items: list[Any], *, shuffle: bool, seed: int, limit: int | None) -> list[Any]:
    if shuffle:
        items = list(items)
        random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]


def load_sft_examples(
    path: str | os.PathLike[str], *, limit: int | None = None, shuffle: bool = False, seed: int = 0
) -> list[SFTExample]:
    """{prompt, response[, ground_truth | answer]} records (the course's sft.jsonl, make_sft_data output)."""
    path = Path(path).expanduser()
    out: list[SFTExample] = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = _field(rec, "prompt", where)
        response = _field(rec, "response", where)
        key = "ground_truth" if "ground_truth" in rec else "answer"
        truth = _field(rec, key, where, required=False)
        assert prompt is not None and response is not None
        out.append(SFTExample(prompt=prompt, response=response, ground_truth=truth, where=where))
    if not out:
        raise DataError(f"{path}: no usable examples")
    return shuffle_limit(out, shuffle=shuffle, seed=seed, limit=limit)
