"""The embedded task: seeded arithmetic word problems with exact integer answers, generated in-process
(no download), with ``train`` and ``validation`` splits that never share a question."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from shell.data.records import DataError, Dataset, Example

__all__ = [
    "DEFAULT_EMBEDDED_SIZES",
    "Phrasing",
    "SolutionStyle",
    "Split",
    "arithmetic_problem",
    "arithmetic_split",
    "embedded_dataset",
    "example_record",
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

SolutionStyle = Literal["equation", "stepwise"]
"""How the embedded task's solutions (the SFT traces' reasoning) are written: ``equation`` "45 + 23 = 68.";
``stepwise`` "45 + 20 = 65, 65 + 3 = 68." (tens first, then ones: each step moves one digit, easier for a
small model to compute left to right)."""

Phrasing = Literal["plain", "varied"]
"""``plain``: the task's one sentence shape (the held-out metric everyone reports); ``varied``: the same
arithmetic told with many names, items, verbs and sentence shapes, so that what is learned is the arithmetic
rather than the template."""

# The varied phrasing: (name, pronoun, object pronoun, possessive).
_V_NAMES = tuple(
    (n, "she", "her", "her") for n in ("Mia", "Ava", "Zoe", "Ivy", "Eva", "Lily", "Emma", "Nora", "Ruth", "Anna", "Rosa",
                                       "Lena", "Maya", "Sara", "Chloe", "Grace", "Hana", "Priya", "Aisha", "Keiko")
) + tuple(
    (n, "he", "him", "his") for n in ("Tom", "Leo", "Sam", "Max", "Ben", "Omar", "Raj", "Ivan", "Luis", "Jack", "Noah",
                                      "Ethan", "Hugo", "Kofi", "Yusuf", "Diego", "Felix", "Arjun", "Kenji", "Paul")
)
_V_ITEMS = _ITEMS + (
    "pencils", "buttons", "beads", "candies", "crayons", "rocks", "toy cars", "oranges", "eggs", "flowers", "balloons",
    "postcards", "seeds", "blocks", "ribbons", "keys", "cups", "plates", "socks", "hats", "tickets", "badges", "coupons",
    "erasers", "puzzles", "songs", "photos", "letters", "bottles", "bricks",
)
_V_FRIENDS = ("a friend", "a neighbour", "an older sister", "a younger brother", "the teacher", "a classmate", "an aunt",
              "a cousin", "the shopkeeper", "grandpa")
_V_PLACES = ("box", "bag", "drawer", "basket", "jar", "backpack", "shelf", "album")
_V_START = (
    "{Name} has {n} {item}.", "{Name} had {n} {item}.", "{Name} starts with {n} {item}.", "{Name} owns {n} {item}.",
    "{Name} collected {n} {item}.", "At first, {Name} has {n} {item}.", "There are {n} {item} in {Name}'s {place}.",
    "{Name} keeps {n} {item} in a {place}.", "In the morning {Name} counts {n} {item}.", "{Name}'s {place} holds {n} {item}.",
)
# (present, past) of events that add or remove k items.
_V_ADD = (
    ("{Pron} gets {k} more.", "got {k} more"), ("{Pron} buys {k} more.", "bought {k} more"),
    ("{Pron} finds {k} more.", "found {k} more"), ("Then {pron} receives {k} more {item}.", "received {k} more {item}"),
    ("{Friend} gives {obj} {k} more.", "was given {k} more"), ("{Pron} adds {k} {item} to the {place}.", "added {k} {item}"),
    ("Later {pron} wins {k} {item}.", "won {k} {item}"), ("{Pron} picks up another {k}.", "picked up another {k}"),
    ("{Friend} brings {k} {item} for {obj}.", "was brought {k} {item}"), ("{Pron} makes {k} more {item}.", "made {k} more {item}"),
)
_V_SUB = (
    ("{Pron} gives away {k}.", "gave away {k}"), ("{Pron} loses {k}.", "lost {k}"), ("{Pron} sells {k}.", "sold {k}"),
    ("{Pron} gives {k} {item} to {friend}.", "gave {k} {item} to {friend}"), ("{Pron} uses {k} of them.", "used {k} of them"),
    ("{Friend} takes {k} {item} from {obj}.", "had {k} {item} taken away"), ("{Pron} donates {k} {item}.", "donated {k} {item}"),
    ("Then {pron} trades away {k}.", "traded away {k}"), ("{Pron} throws out {k} old {item}.", "threw out {k} old {item}"),
    ("{Pron} shares {k} with {friend}.", "shared {k} with {friend}"),
)
_V_QUESTION = (
    "How many {item} does {Name} have now?", "How many {item} does {pron} have now?", "Now how many {item} does {Name} have?",
    "How many {item} does {Name} end up with?", "What is the number of {item} {Name} has now?",
    "How many {item} are there now?", "How many {item} does {Name} have after that?", "Count {poss} {item} now: how many are there?",
)


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


def arithmetic_problem(index: int, *, difficulty: int = 1, seed: int = 0, phrasing: Phrasing = "plain",
                       solution_style: SolutionStyle = "equation") -> Example:
    """The embedded task's problem number ``index`` (a pure function of index, difficulty, seed and phrasing).

    Difficulty 1: "Mia has 45 apples. She gets 23 more. How many apples does she have now?" (two 2-digit
    numbers, + or -); 2: two +/- steps; 3: two steps with 3-digit numbers; 4: "has 7 boxes of 24 apples"
    (multiplication) then one 3-digit step; 5: 2x2-digit multiplication then two 3-digit steps; above 5,
    more steps and digits. Every intermediate amount is non-negative; the answer is an exact integer.
    ``phrasing="varied"`` tells the same arithmetic (the same expression, answer and solution for the same
    index) in one of many sentence shapes, e.g. "Kofi had 45 marbles and then lost 23. How many marbles does
    Kofi end up with?" ``solution_style="stepwise"`` writes each +/- step as tens first, then ones.
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
        steps_text.append(_stepwise(total, op, n) if solution_style == "stepwise" else f"{total} {op} {n} = {new}.")
        expr = f"{expr} {op} {n}"
        total = new
    sentences.append(f"How many {item} does {name} have now?")
    if lv.mul is None and len(steps_text) > 1 and solution_style == "equation":  # one line: "45 + 23 - 12 = 56."
        solution = f"{expr} = {total}."
    else:
        solution = " ".join(steps_text)
    question = " ".join(sentences) if phrasing == "plain" else _varied_question(expr, index, difficulty, seed)
    return Example(
        question=question,
        answer=str(total),
        solution=solution,
        meta={
            "source": "embedded:arithmetic",
            "index": index,
            "difficulty": difficulty,
            "seed": seed,
            "expression": expr,
            "split": arithmetic_split(expr),
            "phrasing": phrasing,
        },
    )


def _stepwise(a: int, op: str, b: int) -> str:
    """``a op b`` as tens first, then ones: "45 + 20 = 65, 65 + 3 = 68." (one equation when ``b`` has no tens or no ones)."""
    sign = 1 if op == "+" else -1
    tens, ones = b - b % 10, b % 10
    if not (tens and ones):
        return f"{a} {op} {b} = {a + sign * b}."
    mid = a + sign * tens
    return f"{a} {op} {tens} = {mid}, {mid} {op} {ones} = {mid + sign * ones}."


def _varied_question(expr: str, index: int, difficulty: int, seed: int) -> str:
    """``expr`` ("45 + 23", "7 * 24 - 130") as a story in one of the varied shapes, drawn from its own random
    stream (so the arithmetic is the plain phrasing's)."""
    rng = random.Random(f"phrase:{seed}:{difficulty}:{index}")
    name, pron, obj, poss = rng.choice(_V_NAMES)
    item, friend, place = rng.choice(_V_ITEMS), rng.choice(_V_FRIENDS), rng.choice(_V_PLACES)
    tokens = expr.split()
    slots = {"Name": name, "pron": pron, "Pron": pron.capitalize(), "obj": obj, "poss": poss, "item": item,
             "friend": friend, "Friend": friend[0].upper() + friend[1:], "place": place}
    if len(tokens) >= 3 and tokens[1] == "*":
        start = f"{name} has {tokens[0]} {rng.choice(('boxes', 'bags', 'packs', 'rows'))} of {tokens[2]} {item}."
        rest = tokens[3:]
    else:
        start, rest = rng.choice(_V_START).format(n=tokens[0], **slots), tokens[1:]
    events = [(op, k) for op, k in zip(rest[0::2], rest[1::2])]
    if len(events) == 1 and "*" not in expr and rng.random() < 0.3:  # one sentence: "X had 45 apples and then lost 23."
        op, k = events[0]
        past = rng.choice(_V_SUB if op == "-" else _V_ADD)[1].format(k=k, **slots)
        opening = f"{name} had {tokens[0]} {item} and then {past}."
        return f"{opening} {rng.choice(_V_QUESTION).format(**slots)}"
    sentences = [start]
    for op, k in events:
        sentences.append(rng.choice(_V_SUB if op == "-" else _V_ADD)[0].format(k=k, **slots))
    sentences.append(rng.choice(_V_QUESTION).format(**slots))
    return " ".join(sentences)


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
    phrasing: Phrasing = "plain",
    solution_style: SolutionStyle = "equation",
    difficulty_max: int | None = None,
) -> Dataset:
    """The first ``n`` distinct problems of ``split`` (default size DEFAULT_EMBEDDED_SIZES[split]).

    ``difficulty_max`` (>= ``difficulty``): a mix of every difficulty from ``difficulty`` to ``difficulty_max``,
    in turn (d1, d2, d3, d1, ...: each difficulty's first problems, so the first ``n`` hold them in equal shares
    up to one), then shuffled if ``shuffle``."""
    n = DEFAULT_EMBEDDED_SIZES[split] if n is None else n
    if difficulty_max is not None and difficulty_max != difficulty:
        if difficulty_max < difficulty:
            raise ValueError(f"difficulty_max ({difficulty_max}) must be >= difficulty ({difficulty})")
        levels = range(difficulty, difficulty_max + 1)
        each = -(-n // len(levels))
        parts = [embedded_dataset(split=split, n=each, difficulty=d, seed=seed, phrasing=phrasing,
                                  solution_style=solution_style).examples for d in levels]
        mixed = [part[i] for i in range(each) for part in parts][:n]
        if shuffle:
            random.Random(seed).shuffle(mixed)
        return _embedded(mixed, f"{difficulty}-{difficulty_max}", split=split, seed=seed, phrasing=phrasing)
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
        ex = arithmetic_problem(index, difficulty=difficulty, seed=seed, phrasing=phrasing, solution_style=solution_style)
        index += 1
        if ex.meta["split"] == split and ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    if shuffle:
        random.Random(seed).shuffle(out)
    return _embedded(out, str(difficulty), split=split, seed=seed, phrasing=phrasing)


def _embedded(examples: Sequence[Example], difficulty: str, *, split: str, seed: int, phrasing: str) -> Dataset:
    """The embedded task's problems as a data set, its source naming the difficulty (``"2"`` or ``"1-3"``)."""
    return Dataset(
        examples=tuple(examples),
        source=f"embedded:arithmetic(difficulty={difficulty}, split={split}, seed={seed}"
               + (f", phrasing={phrasing})" if phrasing != "plain" else ")"),
        format="embedded",
    )


def example_record(example: Example) -> dict[str, object]:
    """An embedded-task problem as a jsonl record: ``question``, ``answer``, ``solution`` and its ``meta`` (``source``
    ``embedded:arithmetic``, ``difficulty``, ``index`` ...). ``load_jsonl_dataset`` reads such records back (format
    ``embedded``) as the same problems."""
    return {"question": example.question, "answer": example.answer, "solution": example.solution, **example.meta}
