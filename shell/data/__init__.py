"""Data: MATH / GSM8K / SFT jsonl loaders, the embedded arithmetic task, and SFT traces.

Every entry point loads data through ``load_dataset(DataConfig)``:

- ``DataConfig()`` (``path=None``) is the embedded task: seeded arithmetic word problems with exact integer
  answers, generated in-process (no download), with disjoint ``train`` and ``validation`` splits.
- ``DataConfig(path="x.jsonl")`` loads that file, its format detected from the first record's fields:
  ``math``, ``gsm8k`` or ``sft`` (see :mod:`shell.data.jsonl`).
- ``DataConfig(path="dir")`` loads ``dir/<split>.jsonl`` (the course layout: train.jsonl, validation.jsonl;
  a GSM8K-style ``test.jsonl`` stands in for a missing validation.jsonl).

A training entry point holds ``data: DataConfig`` and ``eval_data: HeldOutConfig``; the held-out set
follows the training data unless ``--eval-data.path`` is given (:func:`held_out_config`), so
``--data.path ../shared/data/math`` trains on ``math/train.jsonl`` and evaluates on
``math/validation.jsonl``, and no flag at all uses the embedded task for both.

Malformed input raises ``DataError`` naming the file, the 1-based line and the field. Records without a
usable ground truth (MATH's two empty answers) are skipped and counted in ``Dataset.skipped``.
"""

from shell.data.arithmetic import DEFAULT_EMBEDDED_SIZES
from shell.data.arithmetic import Phrasing
from shell.data.arithmetic import SolutionStyle
from shell.data.arithmetic import Split
from shell.data.arithmetic import arithmetic_problem
from shell.data.arithmetic import arithmetic_split
from shell.data.arithmetic import embedded_dataset
from shell.data.arithmetic import example_record
from shell.data.curriculum import MATH_PASS_RATES
from shell.data.curriculum import QuestionSampler
from shell.data.curriculum import group_pass_rates
from shell.data.curriculum import make_curriculum
from shell.data.curriculum import restore_curriculum
from shell.data.jsonl import FORMATS
from shell.data.jsonl import Format
from shell.data.jsonl import PASS_RATE_FIELDS
from shell.data.jsonl import detect_format
from shell.data.jsonl import load_jsonl_dataset
from shell.data.jsonl import load_sft_examples
from shell.data.jsonl import read_jsonl
from shell.data.loading import DATA_ROOT_ENV
from shell.data.loading import CurriculumName
from shell.data.loading import DataConfig
from shell.data.loading import check_data_path
from shell.data.loading import data_root
from shell.data.loading import keep_within_context
from shell.data.loading import HeldOutConfig
from shell.data.loading import held_out_config
from shell.data.loading import load_dataset
from shell.data.loading import overlap
from shell.data.loading import questions_within_context
from shell.data.loading import resolve_data_path
from shell.data.loading import shared_data
from shell.data.loading import within_token_limit
from shell.data.records import DataError
from shell.data.records import DataFileNotFoundError
from shell.data.records import Dataset
from shell.data.records import Example
from shell.data.records import SFTExample
from shell.data.traces import make_sft_examples
from shell.data.traces import sft_examples_for
from shell.data.traces import sft_response

__all__ = [
    "DATA_ROOT_ENV",
    "CurriculumName",
    "DEFAULT_EMBEDDED_SIZES",
    "DataConfig",
    "DataError",
    "DataFileNotFoundError",
    "Dataset",
    "Example",
    "FORMATS",
    "Format",
    "HeldOutConfig",
    "MATH_PASS_RATES",
    "Phrasing",
    "QuestionSampler",
    "SFTExample",
    "SolutionStyle",
    "Split",
    "arithmetic_problem",
    "arithmetic_split",
    "check_data_path",
    "data_root",
    "detect_format",
    "embedded_dataset",
    "example_record",
    "group_pass_rates",
    "held_out_config",
    "keep_within_context",
    "load_dataset",
    "load_jsonl_dataset",
    "load_sft_examples",
    "make_curriculum",
    "make_sft_examples",
    "overlap",
    "PASS_RATE_FIELDS",
    "questions_within_context",
    "read_jsonl",
    "resolve_data_path",
    "shared_data",
    "restore_curriculum",
    "sft_examples_for",
    "sft_response",
    "within_token_limit",
]
