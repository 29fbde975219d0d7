"""Math answer grading: core's r1_zero / question_only rewards and shell.grading's process pool.

The expected decisions are those of the Dr. GRPO grader (``drgrpo_grader.r1_zero_reward_fn``), the
yardstick of the MATH reasoning-RL literature; every hand-written case below was checked against it.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core import extract_boxed, grade_answer, question_only_reward_fn, r1_zero_reward_fn
from shell.grading import close_pool, grade_batch, reward_fn_by_name

CORRECT = {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}
WRONG = {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
UNFORMATTED = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}

# Generous per-call bound: the graders take well under a second on every input; the machine is
# shared, so the tests leave room for a slow neighbour.
CALL_BOUND_S = 10.0


def r1(answer: str) -> str:
    return f"<think> Let me work it out. </think> <answer> {answer} </answer>"


# (answer, ground truth) pairs the reference grades correct
EQUIVALENT = [
    # fractions
    ("\\frac{1}{2}", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("-\\frac{2}{3}", "-\\frac{2}{3}"),
    ("\\frac{-2}{3}", "-\\frac{2}{3}"),
    ("1\\frac{2}{3}", "1\\frac{2}{3}"),
    # radicals
    ("\\sqrt2", "\\sqrt{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("3\\sqrt{5}", "3 \\sqrt 5"),
    # intervals and tuples
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("[2, 5)", "[2,5)"),
    ("\\left( 3, \\frac{1}{2} \\right)", "(3,\\frac{1}{2})"),
    ("(1, -2)", "(1,-2)"),
    ("(0.5, 2)", "(\\frac{1}{2}, 2)"),
    # matrices
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    # degrees, units, money, percentages
    ("90^\\circ", "90"),
    ("90", "90^\\circ"),
    ("90^{\\circ}", "90^\\circ"),
    ("5 \\text{ cm}", "5"),
    ("12 inches", "12"),
    ("18 \\text{ dollars}", "18"),
    ("\\$18", "18"),
    ("\\$18.00", "18"),
    ("25\\%", "25"),
    ("25%", "25\\%"),
    # thousands separators and trailing zeros
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("109,200,000", "109200000"),
    ("1{,}000", "1000"),
    ("18.0", "18"),
    ("18.00", "18"),
    # negatives
    ("-5", "-5"),
    ("- 5", "-5"),
    # equations and variables
    ("x = 3", "3"),
    ("k=3", "3"),
    ("x^2+2x+1", "(x+1)^2"),
    ("3\\pi", "3\\pi"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    # text answers
    ("\\text{(C)}", "\\text{(C)}"),
    ("C", "\\text{C}"),
    ("\\text{Monday}", "Monday"),
    # a box inside the answer tags
    ("\\boxed{5}", "5"),
    ("$\\boxed{\\frac{3}{4}}$", "\\frac34"),
    ("\\boxed{1} \\text{ or maybe } \\boxed{7}", "7"),
]

# (answer, ground truth) pairs the reference grades wrong
DIFFERENT = [
    ("6", "5"),
    ("-5", "5"),
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("\\frac{2}{4}", "\\frac{1}{2}"),  # unreduced fractions only match as written
    ("0.33", "\\frac{1}{3}"),
    ("(2, 5)", "[2,5)"),
    ("(1,2)", "(1,2,3)"),
    ("2.5", "25"),
    ("x+1", "x-1"),
    ("\\sqrt{3}", "3"),
    ("5.5", "5"),
    ("", "5"),
    ("The final answer is 7", "7"),  # prose inside the tags is graded wrong
    ("7 apples and 3 pears", "7"),
    ("\\boxed{5", "5"),  # a box that never closes
    ("\\boxed 5", "5"),  # no braces
]


@pytest.mark.parametrize(("answer", "truth"), EQUIVALENT)
def test_equivalent_answers_are_correct(answer: str, truth: str) -> None:
    assert r1_zero_reward_fn(r1(answer), truth) == CORRECT
    if "boxed" not in answer:
        assert question_only_reward_fn(f"So the answer is $\\boxed{{{answer}}}$.", truth) == CORRECT


@pytest.mark.parametrize(("answer", "truth"), DIFFERENT)
def test_different_answers_are_wrong(answer: str, truth: str) -> None:
    assert r1_zero_reward_fn(r1(answer), truth) == WRONG


@pytest.mark.parametrize(
    "response",
    [
        "<think> x </think><answer> 5 </answer>",  # no space between the tags
        "<think> x </think>  <answer> 5 </answer>",  # two spaces
        "<think> x </think> <answer> 5",  # no closing tag
        "<answer> 5 </answer>",  # no </think>
        "5",
        "",
    ],
)
def test_format_failures_get_nothing(response: str) -> None:
    assert r1_zero_reward_fn(response, "5") == UNFORMATTED


def test_answer_is_after_the_last_answer_tag() -> None:
    response = "<think> maybe <answer> 4 </answer> </think> <answer> 5 </answer>"
    assert r1_zero_reward_fn(response, "5") == CORRECT
    assert r1_zero_reward_fn(response, "4") == WRONG
    # text after </answer> stays part of the answer, as in the reference
    assert r1_zero_reward_fn("</think> <answer> 5 </answer> and more", "5") == WRONG


def test_ground_truth_types() -> None:
    assert r1_zero_reward_fn(r1("18"), 18) == CORRECT
    assert r1_zero_reward_fn(r1("18"), 18.0) == CORRECT
    assert r1_zero_reward_fn(r1("\\frac{1}{2}"), 0.5) == CORRECT
    assert r1_zero_reward_fn(r1("17"), 18) == WRONG
    assert r1_zero_reward_fn(r1("6"), ["5", "6"]) == CORRECT
    assert r1_zero_reward_fn(r1("7"), ["5", "6"]) == WRONG
    assert r1_zero_reward_fn(r1("7"), []) == WRONG
    assert r1_zero_reward_fn(r1("7"), ["5", 7]) == CORRECT  # numbers in a list are accepted too
    assert r1_zero_reward_fn(r1("5"), "The answer is $\\boxed{5}$.") == CORRECT  # a boxed truth is reduced
    assert r1_zero_reward_fn(r1("5"), "\\boxed{6}") == WRONG
    assert r1_zero_reward_fn(r1("5"), None) == WRONG  # type: ignore[arg-type] - unknown types never match


def test_empty_answer_matches_empty_truth() -> None:
    # two MATH train records have an empty answer; the reference grades an empty answer correct there
    assert r1_zero_reward_fn(r1(""), "") == CORRECT


def test_question_only() -> None:
    assert question_only_reward_fn("2 + 3 = 5, so the answer is $\\boxed{5}$.", "5") == CORRECT
    assert question_only_reward_fn("first \\boxed{4}, then \\boxed{5}", "5") == CORRECT
    assert question_only_reward_fn("the answer is \\boxed{6}", "5") == WRONG
    assert question_only_reward_fn("the answer is 5", "5") == UNFORMATTED
    assert question_only_reward_fn("the answer is \\boxed{5", "5") == UNFORMATTED
    assert question_only_reward_fn("\\boxed{1,000}", 1000) == CORRECT


def test_extract_boxed() -> None:
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} and \\boxed{\\{2\\}}") == "\\{2\\}"
    assert extract_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{open") is None
    assert extract_boxed("\\boxed 5") is None


def test_grade_answer() -> None:
    assert grade_answer("\\frac{1}{2}", "0.5")
    assert grade_answer("1,000", ["999", "1000"])
    assert not grade_answer("2", "3")
    # fast=False also asks math-verify, which knows more equivalences (here: 1/3 as a decimal)
    assert not grade_answer("0.333333333333", "\\frac{1}{3}")
    assert grade_answer("0.333333333333", "\\frac{1}{3}", fast=False)


def test_reference_quirks_are_kept() -> None:
    # an integer ground truth only matches an integer-looking answer (no simplification)
    assert not grade_answer("5!", "120")
    assert not grade_answer("2^{10}", "1024")
    # symbolic answers do simplify
    assert grade_answer("n! \\cdot n", "n \\cdot n!")
    assert grade_answer("x^2 \\cdot x", "x^3")
    # thousands separators inside tuples are not element separators
    assert grade_answer("(1,000, 2)", "(1000,2)")


# ----------------------------------------------------------------------------------------------
# Robustness: bounded time, never raises, any thread.

ADVERSARIAL = {
    "200k chars": ("<think>" + "x" * 200_000 + "</think> <answer>" + "7" * 200_000 + "</answer>", "7"),
    "200k boxed": ("</think> <answer>\\boxed{" + "1+" * 100_000 + "1}</answer>", "7"),
    "deep braces": ("</think> <answer>" + "{" * 5000 + "1" + "}" * 5000 + "</answer>", "1"),
    "deep braces boxed": ("</think> <answer>\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}</answer>", "1"),
    "deep parens": ("</think> <answer>" + "(" * 3000 + "1" + ")" * 3000 + "</answer>", "1"),
    "deep fractions": ("</think> <answer>" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "</answer>", "1"),
    "tower": ("</think> <answer>10^{10^{10^{10}}}</answer>", "10"),
    "python tower": ("</think> <answer>9**9**9</answer>", "1"),
    "factorial": ("</think> <answer>100000!</answer>", "1"),
    "nested factorial": ("</think> <answer>(5!)!!</answer>", "1"),
    "float exponent": ("</think> <answer>1e999999x</answer>", "x"),
    "degree blow-up": ("</think> <answer>((((x+1)^9)^9)^9)^9</answer>", "x"),
    "list bomb": ("</think> <answer>[1]*10**9</answer>", "1"),
    "falling factorial": ("</think> <answer>ff(10**6,10**6)</answer>", "1"),
    "lone surrogates": ("</think> <answer>\ud800\udfff\ud800</answer>", "\ud800"),
    "nul": ("</think> <answer>1\x002</answer>", "1\x002"),
    "many texts": ("</think> <answer>" + "\\text{ " * 30_000 + "}</answer>", "1"),
    "many boxes": ("</think> <answer>" + "\\boxed{" * 20_000 + "</answer>", "1"),
    "repetitive": ("</think> <answer>" + "ab" * 1500 + "</answer>", "ab" * 1500 + "c"),
    "big radicand": ("</think> <answer>\\sqrt{" + "9" * 300 + "}</answer>", "3" * 150),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_are_bounded(name: str) -> None:
    response, truth = ADVERSARIAL[name]
    for fast in (True, False):
        t0 = time.perf_counter()
        out = r1_zero_reward_fn(response, truth, fast=fast)
        assert time.perf_counter() - t0 < CALL_BOUND_S, (name, fast)
        assert set(out) == {"format_reward", "answer_reward", "reward"}
        t0 = time.perf_counter()
        question_only_reward_fn(response, truth, fast=fast)
        assert time.perf_counter() - t0 < CALL_BOUND_S, (name, fast)


def test_adversarial_decisions() -> None:
    assert r1_zero_reward_fn(*ADVERSARIAL["nul"]) == CORRECT  # identical strings match
    assert r1_zero_reward_fn(*ADVERSARIAL["tower"]) == WRONG
    assert r1_zero_reward_fn(*ADVERSARIAL["lone surrogates"]) == WRONG
    assert r1_zero_reward_fn(*ADVERSARIAL["many boxes"]) == WRONG


def test_grading_from_worker_threads() -> None:
    # signal.alarm-based graders raise or hang off the main thread; this one must not
    cases = [ADVERSARIAL[k] for k in ("tower", "python tower", "deep braces", "float exponent")]
    cases += [(r1("\\frac{1}{2}"), "0.5"), (r1("x = 3"), "3")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(r1_zero_reward_fn, resp, truth, fast) for resp, truth in cases for fast in (True, False)]
        results = [f.result(timeout=60) for f in futures]
    assert results[-4:] == [CORRECT] * 4


_LATEXISH = st.sampled_from(
    ["1", "2", "0", "-", "+", "^", "{", "}", "(", ")", "[", "]", ",", ".", "/", "\\frac", "\\sqrt", "\\boxed{",
     "\\text{", " ", "x", "\\pi", "\\circ", "\\%", "$", "=", "!", "**", "e", "\\left(", "\\right)", "\\\\",
     "</think> <answer>", "</answer>", "<answer>", "\ud800", "\x00", "\n", "9", "10^{", "\\infty"]
)  # fmt: skip
_TEXT = st.one_of(
    st.lists(_LATEXISH, max_size=30).map("".join),
    st.text(max_size=60),
)


@given(
    response=_TEXT,
    truth=st.one_of(_TEXT, st.integers(), st.floats(allow_nan=True), st.lists(_TEXT, max_size=3)),
    fast=st.booleans(),
)
def test_never_raises_and_rewards_are_binary(response: str, truth: object, fast: bool) -> None:
    for fn in (r1_zero_reward_fn, question_only_reward_fn):
        out = fn(response, truth, fast=fast)
        assert set(out) == {"format_reward", "answer_reward", "reward"}
        assert all(isinstance(v, float) and v in (0.0, 1.0) for v in out.values())
        assert out["reward"] == out["answer_reward"] <= out["format_reward"]


@given(answer=st.lists(_LATEXISH, min_size=1, max_size=20).map("".join).filter(lambda a: "\\boxed" not in a))
def test_an_answer_matches_itself(answer: str) -> None:
    # identical answers are equal under every normalisation (a boxed truth would be reduced first)
    assert grade_answer(answer, answer)


# ----------------------------------------------------------------------------------------------
# shell.grading


def sleepy_reward(response: str, ground_truth: object, fast: bool = True) -> dict[str, float]:
    """Test reward function (module level, so worker processes can load it): ``"sleep"`` hangs."""
    if response.startswith("sleep"):
        time.sleep(120)
    return {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


def failing_reward(response: str, ground_truth: object, fast: bool = True) -> dict[str, float]:
    """Test reward function that raises on ``"boom"``."""
    if response == "boom":
        raise RuntimeError("boom")
    return {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}


def _mixed_batch() -> tuple[list[str], list[object]]:
    responses, truths = [], []
    for i in range(30):
        responses.append(r1(str(i)) if i % 3 else r1(str(i + 1)))
        truths.append(str(i) if i % 2 else i)
    responses += [r1("\\frac{1}{2}"), "no tags", "\\boxed{3}", ADVERSARIAL["tower"][0]]
    truths += ["0.5", "1", "3", "10"]
    return responses, truths


def test_reward_fn_by_name() -> None:
    assert reward_fn_by_name("r1_zero") is r1_zero_reward_fn
    assert reward_fn_by_name("question_only_reward_fn") is question_only_reward_fn
    with pytest.raises(ValueError):
        reward_fn_by_name("alpaca")


def test_grade_batch_in_process_matches_direct_calls() -> None:
    responses, truths = _mixed_batch()
    rewards, meta = grade_batch(responses, truths, num_workers=0)
    assert rewards == [r1_zero_reward_fn(r, t) for r, t in zip(responses, truths)]
    assert meta["timeouts"] == 0.0
    assert meta["reward_mean"] == pytest.approx(sum(r["reward"] for r in rewards) / len(rewards))
    assert meta["num_items"] == float(len(responses))
    assert {"format_reward_mean", "answer_reward_mean", "grading_seconds"} <= set(meta)
    empty, meta = grade_batch([], [], num_workers=0)
    assert empty == [] and meta["reward_mean"] == 0.0
    with pytest.raises(ValueError):
        grade_batch(["a"], [], num_workers=0)


def test_grade_batch_pool_preserves_order() -> None:
    responses, truths = _mixed_batch()
    expected, _ = grade_batch(responses, truths, num_workers=0)
    rewards, meta = grade_batch(responses, truths, num_workers=2)
    assert rewards == expected
    assert meta["timeouts"] == 0.0 and meta["num_workers"] == 2.0
    again, _ = grade_batch(responses[::-1], truths[::-1], reward_fn="r1_zero", num_workers=2)  # pool reused
    assert again == expected[::-1]
    qo, _ = grade_batch(responses, truths, reward_fn="question_only", num_workers=2)
    assert qo == [question_only_reward_fn(r, t) for r, t in zip(responses, truths)]


def test_grade_batch_shortcuts_are_exact() -> None:
    """Unformatted r1_zero items (scored in the parent) and repeated (response, truth) pairs (graded
    once) get exactly what the reward function gives each item; equal text with a differently typed
    truth is not merged."""
    responses, truths = _mixed_batch()
    n = len(responses)
    responses = responses * 3 + [r1("5"), r1("5"), r1("5"), "no tags", "no tags"]
    truths = truths * 3 + ["5", 5, [5, "6"], "5", 5]
    expected = [r1_zero_reward_fn(r, t) for r, t in zip(responses, truths)]
    for workers in (0, 2):
        rewards, meta = grade_batch(responses, truths, num_workers=workers)
        assert rewards == expected
        assert meta["num_items"] == float(len(responses))
        rewards[1]["reward"] = 7.0  # each item owns its dict, copies included
        assert rewards[n + 1] == expected[n + 1] == expected[1]
    qo, _ = grade_batch(responses, truths, reward_fn="question_only", num_workers=2)
    assert qo == [question_only_reward_fn(r, t) for r, t in zip(responses, truths)]


def test_grade_batch_duplicates_of_a_timed_out_item_count_as_timeouts() -> None:
    rewards, meta = grade_batch(["sleep", "a", "sleep"], ["1"] * 3, reward_fn=sleepy_reward, timeout_s=1.0,
                                num_workers=2)
    # a custom callable is not deduplicated: both hang, both time out
    assert meta["timeouts"] == 2.0 and [r["reward"] for r in rewards] == [0.0, 1.0, 0.0]


def test_grade_batch_counts_and_survives_timeouts() -> None:
    responses = ["a", "sleep 1", "b", "c", "sleep 2", "d"]
    t0 = time.perf_counter()
    rewards, meta = grade_batch(responses, ["1"] * 6, reward_fn=sleepy_reward, timeout_s=1.0, num_workers=2)
    assert time.perf_counter() - t0 < 60
    assert meta["timeouts"] == 2.0
    assert [r["reward"] for r in rewards] == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert rewards[1] == UNFORMATTED  # a custom reward function's timed-out items get all zeros
    # the hung workers were replaced: the pool still grades
    rewards, meta = grade_batch(["a", "b"], ["1", "1"], reward_fn=sleepy_reward, timeout_s=5.0, num_workers=2)
    assert meta["timeouts"] == 0.0 and [r["reward"] for r in rewards] == [1.0, 1.0]


def test_grade_batch_errors_count_as_wrong() -> None:
    rewards, meta = grade_batch(["ok", "boom", "ok"], ["1"] * 3, reward_fn=failing_reward, num_workers=1)
    assert [r["reward"] for r in rewards] == [1.0, 0.0, 1.0]
    assert meta["errors"] == 1.0 and meta["timeouts"] == 0.0
    with pytest.raises(ValueError):
        grade_batch(["a"], ["1"], reward_fn=lambda r, t, fast=True: {}, num_workers=1)  # not picklable
    close_pool()
