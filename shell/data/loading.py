"""What the entry points configure: ``DataConfig`` (the training or evaluated set) and ``HeldOutConfig``
(the held-out set of a training loop, which follows the training data unless set)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

from shell.config import at_least, flag, require
from shell.data.arithmetic import Phrasing, SolutionStyle, Split, embedded_dataset
from shell.data.jsonl import Format, load_jsonl_dataset
from shell.data.records import DataError, DataFileNotFoundError, Dataset, Example

CurriculumName = Literal["none", "level", "pass-rate", "online"]
"""--data.curriculum: how an RL loop chooses each step's problems (shell/data/curriculum.py)."""

__all__ = ["DATA_ROOT_ENV", "CurriculumName", "DataConfig", "HeldOutConfig", "check_data_path", "data_root",
           "held_out_config", "keep_within_context", "load_dataset", "overlap", "questions_within_context",
           "resolve_data_path", "shared_data", "within_token_limit"]

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
    difficulty_max: int | None = None
    """Embedded task only: a mix of every difficulty from --data.difficulty to this one, in equal shares (None: one
    difficulty)."""
    curriculum: CurriculumName = "none"
    """Which training problems each RL step takes (GRPO, expert iteration): "none" (uniform: a seeded permutation per
    epoch), "level" (MATH level / embedded difficulty, easy to hard), "pass-rate" (a pass_rate field from
    shell.pass_rates, easy to hard, optionally inside a band), "online" (each problem's running pass rate from the
    rollouts; too easy and too hard ones rest). See shell/data/curriculum.py."""
    curriculum_start: float = 0.25
    """level / pass-rate: the easiest fraction of the problems the first step draws from; the pool grows as
    sqrt (competence-based, Platanios et al. 2019) to all problems at --data.curriculum-steps (1: all from the start)."""
    curriculum_steps: int | None = None
    """level / pass-rate: the step from which every problem is in the pool (None: the loop's last step)."""
    curriculum_band_min: float | None = None
    """pass-rate: keep only problems whose pass_rate is >= this; online: sample problems whose running pass rate is
    >= this (None: 0.0 for pass-rate, 0.1 for online)."""
    curriculum_band_max: float | None = None
    """pass-rate: keep only problems whose pass_rate is <= this; online: sample problems whose running pass rate is
    <= this (None: 1.0 for pass-rate, 0.9 for online)."""
    curriculum_rest: int = 2
    """online: how many times a problem outside the band is passed over before it is tried again."""
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
        at_least(self.difficulty_max, self.difficulty, flag(prefix, "difficulty_max"), optional=True)
        require(0.0 < self.curriculum_start <= 1.0,
                f"{flag(prefix, 'curriculum_start')} must be in (0, 1], got {self.curriculum_start}")
        at_least(self.curriculum_steps, 1, flag(prefix, "curriculum_steps"), optional=True)
        at_least(self.curriculum_rest, 0, flag(prefix, "curriculum_rest"))
        for name in ("curriculum_band_min", "curriculum_band_max"):
            value = getattr(self, name)
            require(value is None or 0.0 <= value <= 1.0, f"{flag(prefix, name)} must be in [0, 1], got {value}")
        if self.curriculum == "pass-rate" and (self.path is None or not Path(self.path).expanduser().exists()):
            where = "needs" if self.path is None else f"{flag(prefix, 'path')} {self.path} does not exist; it needs"
            raise ValueError(f"{flag(prefix, 'curriculum')} pass-rate {where} a {flag(prefix, 'path')} whose records "
                             "carry pass_rate: make one with python -m shell.pass_rates --output FILE.jsonl (e.g. "
                             "python -m shell.pass_rates --preset h100 for MATH train)")
        lo, hi = self.curriculum_band_min, self.curriculum_band_max
        require(lo is None or hi is None or lo <= hi,
                f"{flag(prefix, 'curriculum_band_min')} ({lo}) must be <= {flag(prefix, 'curriculum_band_max')} ({hi})")
        check_data_path(self.path, self.split, flag(prefix, "path"))


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
    difficulty_max: int | None = None
    """Embedded held-out set only: a mix of difficulties up to this one; None follows --data.difficulty-max when
    --eval-data.difficulty follows --data.difficulty (otherwise one difficulty)."""
    phrasing: Phrasing | None = None
    """Embedded held-out set only: None follows --data.phrasing."""
    format: Format = "auto"
    """File format; auto = detected from the first record's fields."""

    def check(self, prefix: str = "eval-data") -> None:
        """Ranges, with each message naming the flag."""
        at_least(self.limit, 1, flag(prefix, "limit"), optional=True)
        at_least(self.difficulty, 1, flag(prefix, "difficulty"), optional=True)
        at_least(self.difficulty_max, self.difficulty or 1, flag(prefix, "difficulty_max"), optional=True)
        check_data_path(self.path, "validation", flag(prefix, "path"))


def check_data_path(path: str | None, split: str, flag_name: str) -> None:
    """A data path names a file, or a folder with the split's file, before anything loads: ``DataError`` naming
    ``flag_name`` (the embedded task, ``None`` or ``"embedded"``, needs nothing)."""
    if path is None or path == EMBEDDED:
        return
    try:
        resolve_data_path(path, split)
    except DataFileNotFoundError as e:
        hint = (f"; the presets read {DATA_ROOT_ENV} (now {data_root()}): set it to the folder holding math/"
                if str(path).startswith(data_root()) else "")
        raise DataFileNotFoundError(f"{flag_name} {path}: {e}{hint}") from None


DATA_ROOT_ENV = "REASONING_RL_DATA"
"""The environment variable naming the folder the presets read their data from (``math/train.jsonl``, ...)."""


def data_root() -> str:
    """Where the presets look for data: ``$REASONING_RL_DATA``, else ``../shared/data`` (relative to the working
    directory: a checkout beside the course's shared folder)."""
    return os.environ.get(DATA_ROOT_ENV) or "../shared/data"


def shared_data(relative: str) -> str:
    """A preset's data path: ``relative`` (e.g. ``"math/validation.jsonl"``) under :func:`data_root`."""
    return os.path.join(data_root(), relative)


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
    difficulty_max = held.difficulty_max if held.difficulty_max is not None else (
        train.difficulty_max if held.difficulty is None else None)
    shown = f"{difficulty}-{difficulty_max}" if difficulty_max not in (None, difficulty) else f"{difficulty}"
    if held.path is not None and held.path != EMBEDDED:
        return DataConfig(path=held.path, **common), f"held-out set: {held.path} (--eval-data.path)"
    phrasing = train.phrasing if held.phrasing is None else held.phrasing
    embedded = DataConfig(path=None, difficulty=difficulty, difficulty_max=difficulty_max, phrasing=phrasing, **common)
    if held.path == EMBEDDED or train.path is None:
        return embedded, (f"held-out set: embedded task, validation split, difficulty {shown}"
                          + ("" if phrasing == "plain" else f", {phrasing} phrasing"))
    p = Path(train.path).expanduser()
    folder = p if p.is_dir() else p.parent
    for name in ("validation.jsonl", "test.jsonl"):
        if (folder / name).is_file() and (folder / name) != p:
            target = str(folder if p.is_dir() else folder / name)
            return DataConfig(path=target, **common), f"held-out set: {folder / name} (beside --data.path)"
    return embedded, (f"held-out set: embedded task, validation split, difficulty {shown} -- no validation.jsonl "
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
            solution_style=cfg.solution_style, difficulty_max=cfg.difficulty_max,
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
