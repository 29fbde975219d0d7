"""Prompt templates, shipped as package data (``shell/prompts/<name>.prompt``).

The ``.prompt`` files are byte-for-byte the CS336 (Spring 2025) assignment 5 templates: each holds one
``{question}`` placeholder and no trailing newline, so a formatted ``r1_zero`` prompt ends exactly with
``"Assistant: <think>"`` and the model's response continues it.

Each template is paired with the reward function that grades responses to it, by name:
``<name>.prompt`` is graded by ``core.<name>_reward_fn``. The pairing is resolved lazily (``.reward_fn``),
so this module imports without the grader.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Literal

__all__ = ["PROMPT_NAMES", "PromptName", "PromptTemplate", "load_prompt"]

PromptName = Literal["r1_zero", "question_only"]
"""The shipped template names, as a type for tyro configs (``prompt: PromptName = "r1_zero"``)."""

_SUFFIX = ".prompt"


def _discover() -> tuple[str, ...]:
    root = resources.files(__name__)
    return tuple(
        sorted(p.name[: -len(_SUFFIX)] for p in root.iterdir() if p.name.endswith(_SUFFIX))
    )


PROMPT_NAMES: tuple[str, ...] = _discover()
"""Names of the templates shipped in this package, sorted."""


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template and the name of the ``core`` reward function that grades responses to it."""

    name: str
    text: str
    reward_fn_name: str

    def format(self, question: str) -> str:
        """The prompt for ``question`` (``str.format`` semantics, as in the course code)."""
        return self.text.format(question=question)

    @property
    def reward_fn(self) -> Callable[..., dict[str, Any]]:
        """``core.<reward_fn_name>``, imported on first use: ``fn(response, ground_truth) -> dict``."""
        import core

        fn = getattr(core, self.reward_fn_name, None)
        if fn is None:
            raise AttributeError(
                f"prompt {self.name!r} is graded by core.{self.reward_fn_name}, "
                "which this version of core does not provide"
            )
        return fn


def load_prompt(name: str) -> PromptTemplate:
    """The shipped template called ``name`` (one of ``PROMPT_NAMES``); unknown names raise ValueError."""
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt {name!r}; available: {', '.join(PROMPT_NAMES)}")
    text = resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    return PromptTemplate(name=name, text=text, reward_fn_name=f"{name}_reward_fn")
