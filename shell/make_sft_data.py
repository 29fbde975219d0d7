"""Write an SFT jsonl ({prompt, response, ground_truth}) from a question/solution data set.

    python -m shell.make_sft_data --input ../shared/data/math/train.jsonl --output data/sft_math.jsonl
    python -m shell.make_sft_data --output data/sft_arith.jsonl     # the embedded task's train split

Responses continue the template's prompt: for r1_zero, `` {solution} </think> <answer> {answer} </answer>``.
The file is written atomically (temp file, then os.replace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shell.data import DataConfig, load_dataset, make_sft_examples
from shell.files import atomic_write_jsonl
from shell.prompts import PromptName


@dataclass(frozen=True)
class MakeSFTDataConfig:
    """Make SFT traces (prompt + reasoning + answer) from a data set with solutions."""

    output: str = "data/sft.jsonl"
    """Where to write the {prompt, response, ground_truth} jsonl."""
    input: str | None = None
    """A MATH/GSM8K .jsonl file or a directory of split files; omitted: the embedded arithmetic task."""
    split: Literal["train", "validation"] = "train"
    """Split of the embedded task (or file picked in a directory)."""
    template: PromptName = "r1_zero"
    """Prompt template the traces are formatted for."""
    limit: int | None = None
    """Write at most this many examples (after shuffling, if on); embedded task default: 5000."""
    shuffle: bool = False
    """Shuffle (seeded) before --limit."""
    seed: int = 0
    """Seed of the shuffle and of the embedded generator."""
    difficulty: int = 1
    """Embedded task difficulty (1 = 2-digit +/-)."""
    format: Literal["auto", "math", "gsm8k"] = "auto"
    """Input format; auto = detected from the first record."""


def main(cfg: MakeSFTDataConfig) -> dict[str, int]:
    """Write the file; returns {"written", "skipped_no_answer", "skipped_no_solution"}."""
    data = load_dataset(
        DataConfig(
            path=cfg.input,
            split=cfg.split,
            limit=cfg.limit,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            difficulty=cfg.difficulty,
            format=cfg.format,
        )
    )
    sft = make_sft_examples(data, cfg.template)
    written = atomic_write_jsonl(cfg.output, (ex.to_json() for ex in sft), ensure_ascii=False)
    stats = {
        "written": written,
        "skipped_no_answer": data.skipped,
        "skipped_no_solution": len(data) - len(sft),
    }
    print(
        f"wrote {written} {cfg.template} SFT examples from {data.source} to {cfg.output}; "
        f"skipped {stats['skipped_no_answer']} without an answer, "
        f"{stats['skipped_no_solution']} without a solution"
    )
    return stats


def check_config(cfg: MakeSFTDataConfig) -> None:
    """--input exists (a file, or a folder with the split's file) and --output's folder can be written, before
    anything is read; each message names the flag."""
    from pathlib import Path

    from shell.config import at_least, check_output_folder
    from shell.data import check_data_path

    at_least(cfg.limit, 1, "--limit", optional=True)
    check_data_path(cfg.input, cfg.split, "--input")
    check_output_folder(Path(cfg.output).parent, "--output")


if __name__ == "__main__":
    import sys

    import tyro

    config = tyro.cli(MakeSFTDataConfig, prog="python -m shell.make_sft_data")
    try:
        check_config(config)
        main(config)
    except ValueError as e:  # bad input (DataError included): the message names the flag or file:line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, a folder that cannot be made: the message names the path
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
