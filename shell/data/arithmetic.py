"""The embedded task: seeded arithmetic word problems with exact integer answers, generated in-process
(no download), with ``train`` and ``validation`` splits that never share a question."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from shell.data.records import DataError, Dataset, Example

__all__ = [
    "DEFAULT_EMBEDDED_SIZES",
    "Split",
    "arithmetic_problem",
    "arithmetic_split",
    "embedded_dataset",
]

Split = Literal["train", "validation"]

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
