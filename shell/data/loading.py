"""What the entry points configure: ``DataConfig`` (the training or evaluated set) and ``HeldOutConfig``
(the held-out set of a training loop, which follows the training data unless set)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

from shell.config import at_least, flag
from shell.data.arithmetic import Phrasing, SolutionStyle, Split, embedded_dataset
from shell.data.jsonl import Format, load_jsonl_dataset
from shell.data.records import DataError, DataFileNotFoundError, Dataset, Example

__all__ = ["DataConfig", "HeldOutConfig", "held_out_config", "keep_within_context", "load_dataset", "overlap",
           "questions_within_context", "resolve_data_path", "within_token_limit"]

EMBEDDED = "embedded"
"""The ``--eval-data.path`` value that names the embedded task explicitly."""


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
    """Shuffle (seeded by --data.seed) before applying --data.limit, so limit + shuffle is a random subset."""
    seed: int = 0
    """Seeds the embedded generator and the shuffle."""
    difficulty: int = 1
    """Embedded task only: 1 = 2-digit +/- ... 5 = multiplication and three steps (see arithmetic_problem)."""
    phrasing: Phrasing = "plain"
    """Embedded task only: "plain" (its one sentence shape) or "varied" (the same arithmetic in many names, items,
    verbs and sentence shapes)."""
    solution_style: SolutionStyle = "equation"
    """Embedded task only: how solutions (the SFT traces' reasoning) are written: "equation" (45 + 23 = 68.) or
    "stepwise" (45 + 20 = 65, 65 + 3 = 68.)."""
    format: Format = "auto"
    """File format; auto = detected from the first record's fields."""
    max_prompt_tokens: int | None = None
    """Skip (and count) examples whose prompt is longer than this many tokens (None: the model's context
    minus the response budget). Prompts far longer are skipped without being tokenised."""

    def with_split(self, split: Split) -> DataConfig:
        return dataclasses.replace(self, split=split)

    def check(self, prefix: str = "data") -> None:
        """Ranges, with each message naming the flag."""
        at_least(self.limit, 1, flag(prefix, "limit"), optional=True)
        at_least(self.max_prompt_tokens, 1, flag(prefix, "max_prompt_tokens"), optional=True)
        at_least(self.difficulty, 1, flag(prefix, "difficulty"))


@dataclass(frozen=True)
class HeldOutConfig:
    """The held-out problems a training loop evaluates on; by default the validation split of --data."""

    path: str | None = None
    """None: follow --data (a folder's validation.jsonl, the validation.jsonl or test.jsonl beside a
    training file, or the embedded task's validation split at --data.difficulty). "embedded": the
    embedded task. Otherwise a MATH/GSM8K .jsonl file or a folder."""
    limit: int | None = 128
    """Evaluate on the first N problems (after shuffling, if on). None: all."""
    shuffle: bool = False
    """Shuffle (seeded by --eval-data.seed) before --eval-data.limit."""
    seed: int = 0
    """Seeds the shuffle (and the embedded generator)."""
    difficulty: int | None = None
    """Embedded held-out set only: None follows --data.difficulty."""
    phrasing: Phrasing | None = None
    """Embedded held-out set only: None follows --data.phrasing."""
    format: Format = "auto"
    """File format; auto = detected from the first record's fields."""

    def check(self, prefix: str = "eval-data") -> None:
        """Ranges, with each message naming the flag."""
        at_least(self.limit, 1, flag(prefix, "limit"), optional=True)
        at_least(self.difficulty, 1, flag(prefix, "difficulty"), optional=True)


def held_out_config(train: DataConfig, held: HeldOutConfig) -> tuple[DataConfig, str]:
    """The ``DataConfig`` of the held-out set and a sentence saying where it comes from (printed at start-up).

    Unless ``held.path`` is set, it follows ``train``: the embedded task's validation split at the same
    difficulty, the same folder's ``validation.jsonl``, or the ``validation.jsonl`` / ``test.jsonl`` beside
    a training file. A training file with no such sibling (e.g. an SFT jsonl) falls back to the embedded
    task, and the sentence says so.
    """
    common = dict(split="validation", limit=held.limit, shuffle=held.shuffle, seed=held.seed, format=held.format,
                  max_prompt_tokens=train.max_prompt_tokens)
    difficulty = train.difficulty if held.difficulty is None else held.difficulty
    if held.path is not None and held.path != EMBEDDED:
        return DataConfig(path=held.path, **common), f"held-out set: {held.path} (--eval-data.path)"
    phrasing = train.phrasing if held.phrasing is None else held.phrasing
    embedded = DataConfig(path=None, difficulty=difficulty, phrasing=phrasing, **common)
    if held.path == EMBEDDED or train.path is None:
        return embedded, (f"held-out set: embedded task, validation split, difficulty {difficulty}"
                          + ("" if phrasing == "plain" else f", {phrasing} phrasing"))
    p = Path(train.path).expanduser()
    folder = p if p.is_dir() else p.parent
    for name in ("validation.jsonl", "test.jsonl"):
        if (folder / name).is_file() and (folder / name) != p:
            target = str(folder if p.is_dir() else folder / name)
            return DataConfig(path=target, **common), f"held-out set: {folder / name} (beside --data.path)"
    return embedded, (f"held-out set: embedded task, validation split, difficulty {difficulty} -- no validation.jsonl "
                      f"or test.jsonl beside --data.path {train.path}; set --eval-data.path to evaluate on other data")


CHARS_PER_TOKEN_BOUND = 32
"""No token of the tokenizers used here spans more characters: a text longer than ``limit × this`` is over
``limit`` tokens without being tokenised (a 50 MB "problem" must not reach the tokenizer)."""


def within_token_limit(texts: Sequence[str], tokenizer: Any, limit: int) -> list[bool]:
    """Whether each text is at most ``limit`` tokens; texts over ``limit × 32`` characters are refused
    without tokenising them."""
    short = [i for i, text in enumerate(texts) if len(text) <= limit * CHARS_PER_TOKEN_BOUND]
    out = [False] * len(texts)
    if short:  # one batched call: the fast tokenizers encode a batch in parallel
        for i, ids in zip(short, tokenizer([texts[i] for i in short], add_special_tokens=False)["input_ids"]):
            out[i] = len(ids) <= limit
    return out


def keep_within_context(items: Sequence[T], texts: Sequence[str], tokenizer: Any, *, limit: int, what: str) -> list[T]:
    """The items whose text (``texts[i]``: a formatted prompt, or prompt + response) is at most ``limit`` tokens;
    the others are skipped, counted and reported (a 50 MB "problem" is refused before it is tokenised).
    Raises ``DataError`` when nothing is left."""
    if not items:
        raise DataError(f"{what}: there are none to use")
    if limit < 1:
        raise DataError(f"{what}: no room for a prompt ({limit} tokens; lower the response budget or raise --data.max-prompt-tokens)")
    fits = within_token_limit(texts, tokenizer, limit)
    kept = [item for item, ok in zip(items, fits) if ok]
    if len(kept) < len(items):
        print(f"{what}: skipped {len(items) - len(kept)} of {len(items)} whose prompt is over {limit} tokens "
              "(--data.max-prompt-tokens, or the model's context)", flush=True)
    if not kept:
        raise DataError(f"{what}: every prompt is over {limit} tokens (--data.max-prompt-tokens, or the model's context)")
    return kept


def questions_within_context(dataset: Dataset, template: Any, tokenizer: Any, *, limit: int, what: str) -> Dataset:
    """:func:`keep_within_context` of a question set, on its prompts as ``template`` formats them."""
    kept = keep_within_context(list(dataset.examples), [template.format(ex.question) for ex in dataset.examples],
                               tokenizer, limit=limit, what=what)
    if len(kept) == len(dataset):
        return dataset
    return dataclasses.replace(dataset, examples=tuple(kept), skipped=dataset.skipped + len(dataset) - len(kept))


def load_dataset(cfg: DataConfig, *, split: Split | None = None) -> Dataset:
    """The examples ``cfg`` describes; ``split`` overrides ``cfg.split``."""
    split = split or cfg.split
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"limit must be a positive integer or None, not {cfg.limit}")
    if cfg.path is None or cfg.path == EMBEDDED:
        return embedded_dataset(
            split=split, n=cfg.limit, difficulty=cfg.difficulty, seed=cfg.seed, shuffle=cfg.shuffle, phrasing=cfg.phrasing,
            solution_style=cfg.solution_style,
        )
    return load_jsonl_dataset(
        resolve_data_path(cfg.path, split),
        format=cfg.format,
        limit=cfg.limit,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
    )


def resolve_data_path(path: str | os.PathLike[str], split: str) -> Path:
    """The file behind a data path: the path itself, or ``<split>.jsonl`` of a folder (``test.jsonl``
    standing in for a missing ``validation.jsonl``)."""
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
