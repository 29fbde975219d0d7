"""The records every loader returns, and the one error type for unusable data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "DataFileNotFoundError", "Dataset", "Example", "SFTExample"]


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

