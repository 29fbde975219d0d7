"""Data and prompt layer: jsonl loaders, error reporting, the embedded task, templates, SFT traces."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import extract_boxed
from shell.data import (
    DEFAULT_EMBEDDED_SIZES,
    DataConfig,
    DataError,
    DataFileNotFoundError,
    Example,
    arithmetic_problem,
    embedded_dataset,
    load_dataset,
    load_jsonl_dataset,
    load_sft_examples,
    make_sft_examples,
    overlap,
    sft_examples_for,
)
from shell.prompts import PROMPT_NAMES, PromptName, load_prompt

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer "
    "here </answer>.\nUser: {question}\nAssistant: <think>"
)


def write_jsonl(path: Path, rows: list[object | str]) -> Path:
    """Rows are dumped as JSON; str rows are written verbatim (for blank/malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- loaders


def test_math_with_answer(tmp_path: Path) -> None:
    rec = {"problem": "1+1?", "solution": r"It is $\boxed{2}$.", "answer": "2", "subject": "Algebra",
           "level": "Level ?", "unique_id": "train/a/1.json"}
    ds = load_jsonl_dataset(write_jsonl(tmp_path / "m.jsonl", [rec]))
    assert ds.format == "math" and ds.skipped == 0 and len(ds) == 1
    ex = ds[0]
    assert (ex.question, ex.answer, ex.solution) == ("1+1?", "2", r"It is $\boxed{2}$.")
    assert ex.meta["level"] == "Level ?" and ex.meta["unique_id"] == "train/a/1.json"
    assert ex.meta["line"] == 1 and ex.meta["source"].endswith("m.jsonl")


def test_math_answer_from_last_boxed_of_solution_by_the_graders_rule(tmp_path: Path) -> None:
    rows = [
        {"problem": "p1", "solution": r"Try \boxed{1}; no: $\boxed{\frac{a}{b+{c}}}$."},
        {"problem": "p2", "solution": r"so $\boxed 5$"},  # no braces: not an answer to core.extract_boxed
        {"problem": "p3", "solution": r"$\boxed{7}$", "answer": ""},  # empty answer falls back to the box
        {"problem": "p4", "solution": r"\boxed{3} and a broken \boxed{4"},  # the last box never closes
    ]
    ds = load_jsonl_dataset(write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.answers == [r"\frac{a}{b+{c}}", "7"] and ds.skipped == 2
    assert ds.answers == [extract_boxed(r["solution"]) for r in rows if extract_boxed(r["solution"])]


def test_gsm8k(tmp_path: Path) -> None:
    rec = {"question": "How many?", "answer": "He has 1,000 + 234 = <<1000+234=1234>>1,234 coins.\n#### 1,234"}
    ds = load_jsonl_dataset(write_jsonl(tmp_path / "g.jsonl", [rec]))
    assert ds.format == "gsm8k"
    assert ds[0].answer == "1234"
    assert ds[0].solution == "He has 1,000 + 234 = 1,234 coins."


def test_sft_file(tmp_path: Path) -> None:
    rows = [{"prompt": "P1", "response": "R1"}, {"prompt": "P2", "response": "R2", "ground_truth": "7"},
            {"prompt": "P3", "response": "R3", "answer": "8"}]
    p = write_jsonl(tmp_path / "sft.jsonl", rows)
    got = load_sft_examples(p)
    assert [(e.prompt, e.response, e.ground_truth) for e in got] == [
        ("P1", "R1", None), ("P2", "R2", "7"), ("P3", "R3", "8")]
    assert sft_examples_for(DataConfig(path=str(p), limit=2)) == got[:2]
    with pytest.raises(DataError, match="load_sft_examples"):
        load_dataset(DataConfig(path=str(p)))


def test_blank_lines_ignored_and_counted_in_line_numbers(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "m.jsonl", ["", {"problem": "a", "answer": "1"}, "   ", {"problem": 3}])
    with pytest.raises(DataError) as e:
        load_jsonl_dataset(p)
    assert str(e.value) == f"{p}:4: field 'problem' must be a string, got int"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r":2: invalid JSON"),
        ("[1, 2]", r":2: expected a JSON object, got list"),
        ({"problem": "q"}, r":2: field 'answer' is missing"),
        ({"problem": "q", "answer": 5}, r":2: field 'answer' must be a string"),
    ],
)
def test_malformed_records_name_file_line_field(tmp_path: Path, bad: object, message: str) -> None:
    p = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, bad])
    with pytest.raises(DataError, match=re.escape(str(p)) + message):
        load_jsonl_dataset(p)


def test_undetectable_format(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "x.jsonl", ["", {"text": "hi"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: cannot detect the data format from fields ['text']")):
        load_jsonl_dataset(p)


def test_missing_field_message_exact(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:2: field 'question' is missing")):
        load_jsonl_dataset(p)
    p2 = write_jsonl(tmp_path / "g2.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=re.escape(f"{p2}:1: field 'answer' has no '#### <answer>'")):
        load_jsonl_dataset(p2)
    p3 = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "response": None}])
    with pytest.raises(DataError, match=re.escape(f"{p3}:1: field 'response' must be a string")):
        load_sft_examples(p3)


def test_format_override(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "m.jsonl", [{"problem": "q", "answer": "1"}])
    with pytest.raises(DataError, match=re.escape(f"{p}:1: field 'question' is missing")):
        load_jsonl_dataset(p, format="gsm8k")


def test_missing_file_names_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataFileNotFoundError, match=re.escape(str(p))) as e:
        load_dataset(DataConfig(path=str(p)))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(FileNotFoundError, match="validation.jsonl or test.jsonl"):
        load_dataset(DataConfig(path=str(tmp_path), split="validation"))


def test_empty_answers_skipped_and_counted(tmp_path: Path) -> None:
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "", "solution": r"\boxed{}"},
            {"problem": "c", "answer": "  "}, {"problem": "d", "answer": "4"}]
    ds = load_jsonl_dataset(write_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.questions == ["a", "d"] and ds.skipped == 2 and ds.skipped_lines == (2, 3)


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=re.escape(f"{empty}: no usable examples")):
        load_jsonl_dataset(empty)
    skipped = write_jsonl(tmp_path / "s.jsonl", [{"problem": "a", "answer": ""}])
    with pytest.raises(DataError, match=r"no usable examples \(1 records skipped"):
        load_jsonl_dataset(skipped)


def test_limit_and_seeded_shuffle(tmp_path: Path) -> None:
    rows = [{"problem": f"q{i}", "answer": str(i)} for i in range(20)]
    p = str(write_jsonl(tmp_path / "m.jsonl", rows))
    assert load_dataset(DataConfig(path=p, limit=3)).questions == ["q0", "q1", "q2"]
    a = load_dataset(DataConfig(path=p, limit=5, shuffle=True, seed=1)).questions
    assert a == load_dataset(DataConfig(path=p, limit=5, shuffle=True, seed=1)).questions
    assert a != load_dataset(DataConfig(path=p, limit=5, shuffle=True, seed=2)).questions
    assert sorted(load_dataset(DataConfig(path=p, shuffle=True)).questions) == sorted(f"q{i}" for i in range(20))
    with pytest.raises(ValueError, match="limit"):
        load_dataset(DataConfig(path=p, limit=0))


def test_directory_layout(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "t", "answer": "1"}])
    write_jsonl(tmp_path / "test.jsonl", [{"question": "v", "answer": "#### 2"}])
    cfg = DataConfig(path=str(tmp_path))
    assert load_dataset(cfg).questions == ["t"]
    assert load_dataset(cfg, split="validation").questions == ["v"]
    assert load_dataset(cfg.with_split("validation")).format == "gsm8k"


# ------------------------------------------------------------------------------------------- embedded task


def test_embedded_is_deterministic_and_seeded() -> None:
    a = embedded_dataset(n=50, seed=3)
    assert a.examples == embedded_dataset(n=50, seed=3).examples
    assert a.questions != embedded_dataset(n=50, seed=4).questions
    assert len(load_dataset(DataConfig())) == DEFAULT_EMBEDDED_SIZES["train"]
    assert len(load_dataset(DataConfig(), split="validation")) == DEFAULT_EMBEDDED_SIZES["validation"]
    assert load_dataset(DataConfig(limit=7, difficulty=2)).examples == embedded_dataset(n=7, difficulty=2).examples


@given(
    seed_a=st.integers(0, 2**31), seed_b=st.integers(0, 2**31),
    diff_a=st.integers(1, 6), diff_b=st.integers(1, 6),
)
def test_embedded_splits_are_disjoint(seed_a: int, seed_b: int, diff_a: int, diff_b: int) -> None:
    train = embedded_dataset(split="train", n=200, seed=seed_a, difficulty=diff_a)
    val = embedded_dataset(split="validation", n=100, seed=seed_b, difficulty=diff_b)
    assert overlap(train, val) == 0
    assert not {e.meta["expression"] for e in train} & {e.meta["expression"] for e in val}
    assert len(set(train.questions)) == len(train)


def _check_solution(ex: Example) -> None:
    # Every "x op y = z." step is true arithmetic, and the last result is the answer.
    steps = re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)\.", ex.solution or "")
    assert steps and " ".join(f"{lhs} = {rhs}." for lhs, rhs in steps) == ex.solution
    for lhs, rhs in steps:
        assert eval(lhs) == int(rhs)  # noqa: S307 -- digits and + - * only
    assert steps[-1][1] == ex.answer


@given(index=st.integers(0, 10**9), difficulty=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_embedded_answers_are_correct(index: int, difficulty: int, seed: int) -> None:
    ex = arithmetic_problem(index, difficulty=difficulty, seed=seed)
    assert eval(ex.meta["expression"]) == int(ex.answer) >= 0  # noqa: S307
    _check_solution(ex)
    for number in re.findall(r"\d+", ex.meta["expression"]):
        assert number in ex.question


def test_embedded_difficulty_knob() -> None:
    easy = arithmetic_problem(0, difficulty=1)
    assert re.fullmatch(r"\d\d [-+] \d\d", easy.meta["expression"])
    assert len(easy.question) < 100
    assert "*" in arithmetic_problem(0, difficulty=4).meta["expression"]
    with pytest.raises(ValueError, match="difficulty"):
        load_dataset(DataConfig(difficulty=0))


# ------------------------------------------------------------------------------------------- prompts


def test_prompt_templates_are_the_course_templates() -> None:
    assert set(PROMPT_NAMES) == {"r1_zero", "question_only"} == set(PromptName.__args__)  # type: ignore[attr-defined]
    r1 = load_prompt("r1_zero")
    assert r1.text == R1_ZERO and r1.reward_fn_name == "r1_zero_reward_fn"
    assert r1.format("What is 1+1?").endswith("\nUser: What is 1+1?\nAssistant: <think>")
    assert load_prompt("question_only").format(r"Find $\{x\}$.") == r"Find $\{x\}$."
    with pytest.raises(ValueError, match="question_only, r1_zero"):
        load_prompt("nope")


@pytest.mark.parametrize("name", ["r1_zero", "question_only"])
def test_reward_fn_pairing(name: str) -> None:
    import core

    if not hasattr(core, f"{name}_reward_fn"):
        pytest.skip(f"core.{name}_reward_fn not written yet")
    tpl = load_prompt(name)
    ex = arithmetic_problem(1)
    sft = make_sft_examples([ex], tpl)[0]
    assert sft.prompt == tpl.format(ex.question)
    assert tpl.reward_fn(sft.response, ex.answer)["reward"] == 1.0


# ------------------------------------------------------------------------------------------- SFT traces


def test_make_sft_examples_r1_zero_format() -> None:
    ex = Example(question="Q?", answer="68", solution="23 + 45 = 68.")
    no_solution = Example(question="Q2?", answer="1")
    (sft,) = make_sft_examples([ex, no_solution], "r1_zero")
    assert sft.prompt == R1_ZERO.format(question="Q?")
    assert sft.response == " 23 + 45 = 68. </think> <answer> 68 </answer>"
    assert sft.ground_truth == "68"
    (qo,) = make_sft_examples([ex], "question_only")
    assert qo.prompt == "Q?" and qo.response.endswith(r"$\boxed{68}$.")


def test_make_sft_data_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shell.make_sft_data import MakeSFTDataConfig, main

    src = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "solution": r"Add: $\boxed{2}$.", "answer": "2"},
        {"problem": "bad", "solution": r"\boxed{}", "answer": ""},
        {"problem": "2+2?", "solution": r"$\boxed{4}$", "answer": "4"},
    ])
    out = tmp_path / "out" / "sft.jsonl"
    stats = main(MakeSFTDataConfig(input=str(src), output=str(out)))
    assert stats == {"written": 2, "skipped_no_answer": 1, "skipped_no_solution": 0}
    assert "wrote 2" in capsys.readouterr().out
    got = load_sft_examples(out)
    assert [e.ground_truth for e in got] == ["2", "4"]
    assert got[0].response == r" Add: $\boxed{2}$. </think> <answer> 2 </answer>"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft.jsonl"]  # no temp file left

    emb = tmp_path / "emb.jsonl"
    assert main(MakeSFTDataConfig(output=str(emb), limit=5))["written"] == 5
    assert [e.ground_truth for e in load_sft_examples(emb)] == embedded_dataset(n=5).answers


def test_tyro_configs() -> None:
    import tyro

    from shell.make_sft_data import MakeSFTDataConfig

    cfg = tyro.cli(MakeSFTDataConfig, args=["--input", "x.jsonl", "--output", "y.jsonl", "--limit", "3"])
    assert (cfg.input, cfg.output, cfg.limit, cfg.template) == ("x.jsonl", "y.jsonl", 3, "r1_zero")

    @dataclass(frozen=True)
    class TrainConfig:
        train_data: DataConfig = DataConfig()
        eval_data: DataConfig = field(default_factory=lambda: DataConfig(split="validation", limit=20))

    t = tyro.cli(TrainConfig, args=["--train-data.path", "a.jsonl", "--eval-data.difficulty", "2"])
    assert t.train_data.path == "a.jsonl" and t.eval_data == DataConfig(split="validation", limit=20, difficulty=2)


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_real_data_counts() -> None:
    math_dir = SHARED / "math"
    train = load_dataset(DataConfig(path=str(math_dir)))
    assert (len(train), train.skipped, train.format) == (7498, 2, "math")
    assert {"Level ?"} <= {ex.meta["level"] for ex in train}
    assert len(load_dataset(DataConfig(path=str(math_dir)), split="validation")) == 5000
    assert len(load_jsonl_dataset(math_dir / "math500.jsonl")) == 500
    gsm_train = load_jsonl_dataset(SHARED / "gsm8k" / "train.jsonl")
    gsm_test = load_dataset(DataConfig(path=str(SHARED / "gsm8k"), split="validation"))
    assert (len(gsm_train), len(gsm_test), gsm_train.skipped) == (7473, 1319, 0)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", ex.answer) for ex in gsm_train)
    assert not any("<<" in (ex.solution or "") for ex in gsm_train)
    assert gsm_train[0].answer == "72"


# ---------------------------------------------------------------- the held-out set follows the training data


def test_held_out_set_follows_the_training_data(tmp_path):
    from shell.data import HeldOutConfig, held_out_config

    cfg, note = held_out_config(DataConfig(difficulty=3), HeldOutConfig())
    assert (cfg.path, cfg.split, cfg.difficulty, cfg.limit) == (None, "validation", 3, 128) and "difficulty 3" in note
    folder = tmp_path / "math"
    folder.mkdir()
    for name in ("train.jsonl", "validation.jsonl"):
        (folder / name).write_text('{"problem": "1+1", "answer": "2"}\n')
    cfg, note = held_out_config(DataConfig(path=str(folder / "train.jsonl")), HeldOutConfig())
    assert cfg.path == str(folder / "validation.jsonl") and "beside --data.path" in note
    cfg, _ = held_out_config(DataConfig(path=str(folder)), HeldOutConfig(limit=None))
    assert load_dataset(cfg).source == str(folder / "validation.jsonl")
    sft = tmp_path / "data" / "sft.jsonl"
    sft.parent.mkdir()
    sft.write_text('{"prompt": "p", "response": "r"}\n')
    cfg, note = held_out_config(DataConfig(path=str(sft)), HeldOutConfig())
    assert cfg.path is None and "set --eval-data.path" in note  # said at start-up, not silently
    cfg, _ = held_out_config(DataConfig(difficulty=3), HeldOutConfig(path="embedded", difficulty=1))
    assert (cfg.path, cfg.difficulty) == (None, 1)
    cfg, _ = held_out_config(DataConfig(), HeldOutConfig(path=str(folder)))
    assert cfg.path == str(folder)


def test_varied_phrasing_keeps_the_arithmetic_and_varies_the_words():
    plain = [arithmetic_problem(i) for i in range(200)]
    varied = [arithmetic_problem(i, phrasing="varied") for i in range(200)]
    for p, v in zip(plain, varied):
        assert (p.answer, p.solution, p.meta["expression"], p.meta["split"]) == (v.answer, v.solution, v.meta["expression"],
                                                                                 v.meta["split"])
        numbers = re.findall(r"\d+", p.meta["expression"])
        assert re.findall(r"\d+", v.question) == numbers  # the same numbers, in the same order
    openings = {v.question.split()[1] for v in varied}
    assert len(openings) > 10 and len({v.question.split("?")[0].split(".")[-1].split()[0] for v in varied}) > 3
    assert all(p.question.startswith(p.question.split()[0] + " has ") for p in plain)
    assert embedded_dataset(n=5, phrasing="varied").source.endswith("phrasing=varied)")


def test_stepwise_solutions_go_tens_then_ones():
    ex = arithmetic_problem(0, solution_style="stepwise")
    plain = arithmetic_problem(0)
    assert (ex.question, ex.answer) == (plain.question, plain.answer)
    left, op, right = plain.meta["expression"].split()
    a, b = int(left), int(right)
    sign = 1 if op == "+" else -1
    if b % 10 and b >= 10:
        mid = a + sign * (b - b % 10)
        assert ex.solution == f"{a} {op} {b - b % 10} = {mid}, {mid} {op} {b % 10} = {int(plain.answer)}."
    for i in range(300):
        e = arithmetic_problem(i, solution_style="stepwise", difficulty=2)
        equations = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", e.solution)
        assert equations and all(int(x) + (1 if o == "+" else -1) * int(y) == int(z) for x, o, y, z in equations)
        assert int(equations[-1][3]) == int(e.answer)
