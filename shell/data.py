"""Data: MATH / GSM8K / SFT jsonl loaders, the embedded arithmetic task, and SFT traces.

Every entry point loads data through ``load_dataset(DataConfig)``:

- ``DataConfig()`` (``path=None``) is the embedded task: seeded arithmetic word problems with exact integer
  answers, generated in-process (no download), with disjoint ``train`` and ``validation`` splits.
- ``DataConfig(path="x.jsonl")`` loads that file, its format detected from the first record's fields:
  ``math`` ({problem, answer} or {problem, solution with \\boxed{...}}), ``gsm8k`` ({question, answer ending
  in ``#### <number>``}) or ``sft`` ({prompt, response}; see ``load_sft_examples`` / ``sft_examples_for``).
- ``DataConfig(path="dir")`` loads ``dir/<split>.jsonl`` (the course layout: train.jsonl, validation.jsonl;
  a GSM8K-style ``test.jsonl`` stands in for a missing validation.jsonl).

A training entry point holds two configs, e.g. ::

    @dataclass(frozen=True)
    class SFTConfig:
        data: DataConfig = DataConfig(split="train")
        eval_data: DataConfig = DataConfig(split="validation", limit=200)

so ``--data.path ../shared/data/math --eval-data.path ../shared/data/math`` trains on
``math/train.jsonl`` and evaluates on ``math/validation.jsonl``, and no flag at all uses the embedded task.
SFT extends its training ``DataConfig`` with ``--data.num-examples N`` (a seeded random subset of N pairs)
and ``--data.filter-correct``.

Malformed input raises ``DataError`` naming the file, the 1-based line and the field. Records without a
usable ground truth (MATH's two empty answers) are skipped and counted in ``Dataset.skipped``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from shell.prompts import PromptTemplate

__all__ = [
    "DEFAULT_EMBEDDED_SIZES",
    "DataConfig",
    "DataError",
    "DataFileNotFoundError",
    "Dataset",
    "Example",
    "FORMATS",
    "SFTExample",
    "arithmetic_problem",
    "arithmetic_split",
    "detect_format",
    "embedded_dataset",
    "last_boxed_content",
    "load_dataset",
    "load_jsonl_dataset",
    "load_sft_examples",
    "make_sft_examples",
    "overlap",
    "sft_examples_for",
    "sft_response",
    "write_jsonl_atomic",
]

Format = Literal["auto", "math", "gsm8k", "sft"]
Split = Literal["train", "validation"]
FORMATS: tuple[str, ...] = ("math", "gsm8k", "sft")


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Example:
    """One question with its graded ground truth."""

    question: str
    """The problem text, as inserted into a prompt template's ``{question}``."""
    answer: str
    """The ground truth handed to the reward function (never empty)."""
    solution: str | None = None
    """Reasoning text that leads to ``answer``, if known (MATH solution, GSM8K rationale, embedded steps)."""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """Provenance and extras: source, line, subject, level, unique_id, expression, ..."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised pair: the model sees ``prompt`` and learns ``response`` (``prompt + response`` is the text)."""

    prompt: str
    response: str
    ground_truth: str | None = None
    where: str | None = field(default=None, compare=False)
    """``file:line`` it was read from, for error messages (None when made in memory)."""

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "response": self.response, "ground_truth": self.ground_truth}


@dataclass(frozen=True)
class Dataset:
    """Loaded examples plus what was left out. Sequence-like: ``len(ds)``, ``ds[i]``, ``for ex in ds``."""

    examples: tuple[Example, ...]
    source: str
    """The file read, or ``embedded:arithmetic(...)``."""
    format: str
    """``math``, ``gsm8k`` or ``embedded``."""
    skipped: int = 0
    """Records left out because they had no usable ground truth (e.g. an empty MATH answer)."""
    skipped_lines: tuple[int, ...] = ()
    """1-based line numbers of the skipped records."""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def questions(self) -> list[str]:
        return [ex.question for ex in self.examples]

    @property
    def answers(self) -> list[str]:
        return [ex.answer for ex in self.examples]


class DataError(ValueError):
    """Unusable data: the message names the file, the 1-based line and the field where it can."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data path that does not exist (both a DataError and a FileNotFoundError)."""


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from: a jsonl file, a directory of split files, or the embedded task."""

    path: str | None = None
    """None: the embedded arithmetic task. A .jsonl file: loaded in its detected format. A directory: its <split>.jsonl."""
    split: Split = "train"
    """Which split: of the embedded task, or the file picked in a directory (ignored for a .jsonl file)."""
    limit: int | None = None
    """Keep the first N usable examples (after shuffling, if on). None: all (embedded task: a default size)."""
    shuffle: bool = False
    """Shuffle (seeded by --seed) before applying --limit, so limit+shuffle is a random subset."""
    seed: int = 0
    """Seeds the embedded generator and the shuffle."""
    difficulty: int = 1
    """Embedded task only: 1 = 2-digit +/- ... 5 = multiplication and three steps (see arithmetic_problem)."""
    format: Format = "auto"
    """File format; auto = detected from the first record's fields."""

    def with_split(self, split: Split) -> DataConfig:
        return dataclasses.replace(self, split=split)


def load_dataset(cfg: DataConfig, *, split: Split | None = None) -> Dataset:
    """The examples ``cfg`` describes; ``split`` overrides ``cfg.split``."""
    split = split or cfg.split
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit must be a positive integer or None, not {cfg.limit}")
    if cfg.path is None:
        return embedded_dataset(
            split=split, n=cfg.limit, difficulty=cfg.difficulty, seed=cfg.seed, shuffle=cfg.shuffle
        )
    return load_jsonl_dataset(
        _resolve_path(cfg.path, split),
        format=cfg.format,
        limit=cfg.limit,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
    )


def _resolve_path(path: str | os.PathLike[str], split: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = [p / f"{split}.jsonl"] + ([p / "test.jsonl"] if split == "validation" else [])
        for c in candidates:
            if c.is_file():
                return c
        raise DataFileNotFoundError(
            f"{p}: directory has no {' or '.join(c.name for c in candidates)} for split {split!r}"
        )
    if not p.exists():
        raise DataFileNotFoundError(f"data file not found: {p}")
    return p


def overlap(a: Iterable[Example], b: Iterable[Example]) -> int:
    """How many distinct question texts occur in both (a train/eval leak check)."""
    return len({ex.question for ex in a} & {ex.question for ex in b})


# --------------------------------------------------------------------------------------------- jsonl


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line; malformed lines raise DataError."""
    if not path.is_file():
        raise DataFileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
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
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


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
    """``math``, ``gsm8k`` or ``sft`` from a record's field names; DataError if none fits."""
    keys = set(fields)
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


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed_content(text: str) -> str | None:
    r"""Content of the last well-formed ``\boxed{...}`` / ``\fbox{...}`` / ``\boxed 5`` in ``text``, or None.

    Braces nest (``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``); backslash-escaped characters (``\{``) do not
    count as braces. ``\boxed 5`` takes the text up to the next ``$`` or newline.
    """
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\":
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
                j += 1
            continue  # unbalanced: try an earlier one
        if i > m.end():  # "\boxed 5"
            token = re.match(r"[^$\n]*", text[i:])
            content = token.group(0).strip() if token else ""
            if content:
                return content
    return None


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def _math_example(rec: dict[str, Any], where: str, meta: dict[str, Any]) -> Example | None:
    problem = _field(rec, "problem", where)
    solution = _field(rec, "solution", where, required=False)
    answer = _field(rec, "answer", where, required=False)
    if answer is None and solution is None:
        raise DataError(f"{where}: field 'answer' is missing (and there is no 'solution' to take it from)")
    answer = (answer or "").strip()
    if not answer and solution is not None:
        answer = (last_boxed_content(solution) or "").strip()
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


_PARSERS = {"math": _math_example, "gsm8k": _gsm8k_example}


def load_jsonl_dataset(
    path: str | os.PathLike[str],
    *,
    format: Format = "auto",
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> Dataset:
    """Examples from a MATH or GSM8K jsonl file: skip unusable records, then shuffle (seeded), then limit."""
    path = Path(path).expanduser()
    examples: list[Example] = []
    skipped: list[int] = []
    fmt = None if format == "auto" else format
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; not {format!r}")
    for lineno, rec in _read_jsonl(path):
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
        if ex is None:
            skipped.append(lineno)
        else:
            examples.append(ex)
    if not examples:
        detail = f" ({len(skipped)} records skipped for an empty answer)" if skipped else ""
        raise DataError(f"{path}: no usable examples{detail}")
    examples = _shuffle_limit(examples, shuffle=shuffle, seed=seed, limit=limit)
    return Dataset(
        examples=tuple(examples),
        source=str(path),
        format=fmt or "unknown",
        skipped=len(skipped),
        skipped_lines=tuple(skipped),
    )


def _shuffle_limit(items: list[Any], *, shuffle: bool, seed: int, limit: int | None) -> list[Any]:
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
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = _field(rec, "prompt", where)
        response = _field(rec, "response", where)
        key = "ground_truth" if "ground_truth" in rec else "answer"
        truth = _field(rec, key, where, required=False)
        assert prompt is not None and response is not None
        out.append(SFTExample(prompt=prompt, response=response, ground_truth=truth, where=where))
    if not out:
        raise DataError(f"{path}: no usable examples")
    return _shuffle_limit(out, shuffle=shuffle, seed=seed, limit=limit)


# --------------------------------------------------------------------------------------------- SFT traces


def sft_response(example: Example, template: str) -> str:
    """The response that continues ``template``'s prompt for ``example`` (its solution, then its answer)."""
    if example.solution is None:
        raise ValueError("example has no solution to build a reasoning trace from")
    solution = example.solution.strip()
    if template == "r1_zero":
        # The prompt ends with "Assistant: <think>"; the trace continues it.
        return f" {solution} </think> <answer> {example.answer} </answer>"
    if template == "question_only":
        if last_boxed_content(solution) is None:
            solution = f"{solution} The answer is $\\boxed{{{example.answer}}}$."
        return f"\n{solution}"
    raise ValueError(f"no SFT response format for template {template!r}")


def make_sft_examples(
    examples: Iterable[Example], template: PromptTemplate | str = "r1_zero"
) -> list[SFTExample]:
    """SFT pairs in ``template``'s format; examples without a ``solution`` are left out."""
    from shell.prompts import load_prompt

    tpl = load_prompt(template) if isinstance(template, str) else template
    return [
        SFTExample(prompt=tpl.format(ex.question), response=sft_response(ex, tpl.name), ground_truth=ex.answer)
        for ex in examples
        if ex.solution is not None
    ]


def sft_examples_for(cfg: DataConfig, template: PromptTemplate | str = "r1_zero") -> list[SFTExample]:
    """SFT pairs for any config: an SFT file as is, otherwise traces made from the examples' solutions."""
    if cfg.path is not None:
        path = _resolve_path(cfg.path, cfg.split)
        fmt = cfg.format
        if fmt == "auto":
            first = next(_read_jsonl(path), None)
            if first is None:
                raise DataError(f"{path}: no usable examples")
            try:
                fmt = detect_format(first[1])  # type: ignore[assignment]
            except DataError as e:
                raise DataError(f"{path}:{first[0]}: {e}") from None
        if fmt == "sft":
            return load_sft_examples(path, limit=cfg.limit, shuffle=cfg.shuffle, seed=cfg.seed)
    return make_sft_examples(load_dataset(cfg), template)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as jsonl to ``path`` via a temp file and os.replace; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the usual mode
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


# --------------------------------------------------------------------------------------------- embedded task

DEFAULT_EMBEDDED_SIZES: dict[str, int] = {"train": 5000, "validation": 500}
"""Examples per split of the embedded task when DataConfig.limit is None."""

VALIDATION_FRACTION_PERCENT = 20
"""Share of arithmetic expressions (by hash) that belong to the validation split."""

_NAMES = (("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"),
          ("Ivy", "she"), ("Max", "he"), ("Eva", "she"), ("Ben", "he"))
_ITEMS = ("apples", "coins", "pens", "cards", "books", "stamps", "shells", "marbles", "stickers", "cookies")
_ADD = ("gets {n} more.", "buys {n} more.", "finds {n} more.")
_SUB = ("gives away {n}.", "loses {n}.", "sells {n}.")


@dataclass(frozen=True)
class _Level:
    steps: int  # number of +/- steps after the starting amount
    digits: int  # digits of the starting amount and of each +/- operand
    mul: tuple[int, int] | None  # start as boxes*per_box with these digit counts, or None


def _level(difficulty: int) -> _Level:
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, not {difficulty}")
    table = {
        1: _Level(steps=1, digits=2, mul=None),
        2: _Level(steps=2, digits=2, mul=None),
        3: _Level(steps=2, digits=3, mul=None),
        4: _Level(steps=1, digits=3, mul=(1, 2)),
        5: _Level(steps=2, digits=3, mul=(2, 2)),
    }
    if difficulty in table:
        return table[difficulty]
    return _Level(steps=difficulty - 3, digits=difficulty - 2, mul=(2, 3))


def _digits(rng: random.Random, k: int) -> int:
    return rng.randint(10 ** (k - 1) if k > 1 else 1, 10**k - 1)


def arithmetic_problem(index: int, *, difficulty: int = 1, seed: int = 0) -> Example:
    """The embedded task's problem number ``index`` (a pure function of index, difficulty and seed).

    Difficulty 1: "Mia has 45 apples. She gets 23 more. How many apples does she have now?" (two 2-digit
    numbers, + or -); 2: two +/- steps; 3: two steps with 3-digit numbers; 4: "has 7 boxes of 24 apples"
    (multiplication) then one 3-digit step; 5: 2x2-digit multiplication then two 3-digit steps; above 5,
    more steps and digits. Every intermediate amount is non-negative; the answer is an exact integer.
    """
    lv = _level(difficulty)
    rng = random.Random(f"arith:{seed}:{difficulty}:{index}")
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    steps_text: list[str] = []
    if lv.mul is None:
        total = _digits(rng, lv.digits)
        expr = str(total)
        sentences = [f"{name} has {total} {item}."]
    else:
        boxes, per = _digits(rng, lv.mul[0]), _digits(rng, lv.mul[1])
        total = boxes * per
        expr = f"{boxes} * {per}"
        sentences = [f"{name} has {boxes} boxes of {per} {item}."]
        steps_text.append(f"{boxes} * {per} = {total}.")
    lo, hi = 10 ** (lv.digits - 1), 10**lv.digits - 1
    for _ in range(lv.steps):
        sub = rng.random() < 0.5 and total >= lo
        n = rng.randint(lo, min(hi, total)) if sub else rng.randint(lo, hi)
        new = total - n if sub else total + n
        op = "-" if sub else "+"
        verb = rng.choice(_SUB if sub else _ADD)
        sentences.append(f"{pron.capitalize()} {verb.format(n=n)}")
        steps_text.append(f"{total} {op} {n} = {new}.")
        expr = f"{expr} {op} {n}"
        total = new
    sentences.append(f"How many {item} does {name} have now?")
    if lv.mul is None and len(steps_text) > 1:  # one line for pure +/- chains: "45 + 23 - 12 = 56."
        solution = f"{expr} = {total}."
    else:
        solution = " ".join(steps_text)
    return Example(
        question=" ".join(sentences),
        answer=str(total),
        solution=solution,
        meta={
            "source": "embedded:arithmetic",
            "index": index,
            "difficulty": difficulty,
            "seed": seed,
            "expression": expr,
            "split": arithmetic_split(expr),
        },
    )


def arithmetic_split(expression: str) -> Split:
    """The split an arithmetic expression belongs to: a hash of its canonical text, independent of seed.

    So the same arithmetic (hence the same question text) never appears in both splits, for any seeds.
    """
    h = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big")
    return "validation" if h % 100 < VALIDATION_FRACTION_PERCENT else "train"


def embedded_dataset(
    *,
    split: Split = "train",
    n: int | None = None,
    difficulty: int = 1,
    seed: int = 0,
    shuffle: bool = False,
) -> Dataset:
    """The first ``n`` distinct problems of ``split`` (default size DEFAULT_EMBEDDED_SIZES[split])."""
    n = DEFAULT_EMBEDDED_SIZES[split] if n is None else n
    _level(difficulty)  # validate early
    seen: set[str] = set()
    out: list[Example] = []
    index = 0
    max_index = 50 * n + 10_000  # a split can run dry only at tiny problem spaces; fail, don't loop
    while len(out) < n:
        if index >= max_index:
            raise DataError(
                f"embedded task (difficulty {difficulty}): only {len(out)} distinct {split} problems found"
            )
        ex = arithmetic_problem(index, difficulty=difficulty, seed=seed)
        index += 1
        if ex.meta["split"] == split and ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    if shuffle:
        random.Random(seed).shuffle(out)
    return Dataset(
        examples=tuple(out),
        source=f"embedded:arithmetic(difficulty={difficulty}, split={split}, seed={seed})",
        format="embedded",
    )

