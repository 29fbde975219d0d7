"""Data strategies: mixed embedded difficulties, embedded records through jsonl, each curriculum's order and state,
shell.pass_rates (the pass-rate equation, the band filter, append + resume), and an exact resume of a curriculum run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shell.data import (
    DataConfig, DataError, Example, embedded_dataset, example_record, group_pass_rates, held_out_config, HeldOutConfig,
    load_dataset, make_curriculum, restore_curriculum,
)
from shell.data.curriculum import Online, Staged, Uniform, competence, difficulty_of
from shell.data.records import Dataset
from shell.sampling.api import Completion
from shell.safe_state import load_state
from shell.seeds import batch_indices, derive_seed


# ------------------------------------------------------------------------------------------------ data


def test_mixed_difficulties_take_turns_and_the_held_out_set_follows():
    ds = embedded_dataset(n=7, difficulty=1, difficulty_max=3)
    assert [ex.meta["difficulty"] for ex in ds] == [1, 2, 3, 1, 2, 3, 1]
    single = [embedded_dataset(n=3, difficulty=d).examples for d in (1, 2, 3)]
    assert ds.examples[:3] == (single[0][0], single[1][0], single[2][0])
    assert load_dataset(DataConfig(limit=7, difficulty_max=3)).examples == ds.examples
    held, note = held_out_config(DataConfig(difficulty_max=3), HeldOutConfig(limit=6))
    val = load_dataset(held)
    assert [ex.meta["difficulty"] for ex in val] == [1, 2, 3, 1, 2, 3] and "difficulty 1-3" in note
    assert {ex.meta["split"] for ex in val} == {"validation"}
    held, _ = held_out_config(DataConfig(difficulty_max=3), HeldOutConfig(difficulty=2))
    assert (held.difficulty, held.difficulty_max) == (2, None)
    with pytest.raises(ValueError, match="--data.difficulty-max"):
        DataConfig(difficulty=3, difficulty_max=2).check()


def test_embedded_records_load_back_as_the_same_problems(tmp_path):
    ds = embedded_dataset(n=6, difficulty=1, difficulty_max=2, solution_style="stepwise")
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({**example_record(ex), "pass_rate": 0.5, "num_samples": 2, "num_correct": 1})
                            + "\n" for ex in ds))
    back = load_dataset(DataConfig(path=str(path)))
    assert back.format == "embedded"
    assert [(e.question, e.answer, e.solution) for e in back] == [(e.question, e.answer, e.solution) for e in ds]
    assert [e.meta["difficulty"] for e in back] == [1, 2, 1, 2, 1, 2]
    assert all(e.meta["pass_rate"] == 0.5 and e.meta["num_correct"] == 1 for e in back)
    path.write_text(json.dumps({**example_record(ds[0]), "pass_rate": 1.5}) + "\n")
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'pass_rate' must be in \[0, 1\]"):
        load_dataset(DataConfig(path=str(path)))


# ------------------------------------------------------------------------------------------------ curricula


def _dataset(levels, rates=None) -> Dataset:
    exs = tuple(Example(question=f"q{i}", answer=str(i), meta={"level": f"Level {d}", **(
        {} if rates is None else {"pass_rate": rates[i]})}) for i, d in enumerate(levels))
    return Dataset(examples=exs, source="test", format="math")


def test_uniform_is_the_loops_old_order():
    u = Uniform(50, seed=3, rounds_per_step=3)
    assert u.indices(4, 8) == batch_indices(50, 8, 3, seed=3)
    assert u.indices(4, 8, round=2) == batch_indices(50, 8, 3 * 3 + 2, seed=3, stream="dynamic-sampling")
    assert make_curriculum(DataConfig(), _dataset([1] * 50), seed=3, total_steps=9, rounds_per_step=3).indices(2, 8) == \
        batch_indices(50, 8, 1, seed=3)


def test_competence_schedule_hand_worked():
    assert competence(1, start=0.25, steps=10) == 0.25
    assert competence(6, start=0.25, steps=10) == pytest.approx(math.sqrt(0.0625 + 0.9375 * 0.5))  # 0.7289
    assert competence(11, start=0.25, steps=10) == 1.0 and competence(50, start=0.25, steps=10) == 1.0


def test_level_curriculum_goes_easy_to_hard():
    levels = [3, 1, 2, 5, 4, 1, 2, 3, 4, 5, 1, 2]  # 12 problems, 3 at level 1
    ds = _dataset(levels)
    cur = make_curriculum(DataConfig(curriculum="level", curriculum_start=0.25, curriculum_steps=4), ds, seed=0,
                          total_steps=100)
    assert [levels[i] for i in cur.pool(1, 1)] == [1, 1, 1]  # ceil(0.25 * 12) = 3: the level-1 problems
    assert all(levels[i] == 1 for step in range(5) for i in cur.indices(1, 2, round=step))
    assert sorted(levels[i] for i in cur.pool(5, 1)) == sorted(levels)  # all from step steps + 1 = 5
    assert [levels[i] for i in cur.order] == sorted(levels)
    assert cur.indices(3, 4) == cur.indices(3, 4)  # a pure function of the step
    assert difficulty_of(Example("q", "1", meta={"level": "Level ?"})) is None
    with pytest.raises(DataError, match="--data.curriculum level"):
        make_curriculum(DataConfig(curriculum="level"), Dataset((Example("q", "1"),), "x", "gsm8k"), seed=0, total_steps=1)


def test_pass_rate_curriculum_orders_by_rate_and_keeps_the_band():
    rates = [0.0, 0.5, 1.0, 0.25, 0.75, 0.5, 0.125, 1.0]
    ds = _dataset([1] * 8, rates)
    cur = make_curriculum(DataConfig(curriculum="pass-rate", curriculum_start=1.0), ds, seed=0, total_steps=5)
    assert [rates[i] for i in cur.order] == sorted(rates, reverse=True)  # easy (high pass rate) first
    band = make_curriculum(DataConfig(curriculum="pass-rate", curriculum_band_min=0.2, curriculum_band_max=0.8,
                                      curriculum_start=1.0), ds, seed=0, total_steps=5)
    assert sorted(rates[i] for i in band.order) == [0.25, 0.5, 0.5, 0.75]
    assert all(0.2 <= rates[i] <= 0.8 for s in range(1, 6) for i in band.indices(s, 3))
    with pytest.raises(DataError, match="no problem's pass_rate lies in"):
        make_curriculum(DataConfig(curriculum="pass-rate", curriculum_band_min=0.9, curriculum_band_max=0.95), ds,
                        seed=0, total_steps=5)
    with pytest.raises(ValueError, match="--data.curriculum pass-rate needs a --data.path"):
        DataConfig(curriculum="pass-rate").check()
    with pytest.raises(ValueError, match="--data.curriculum-band-min"):
        DataConfig(curriculum="online", curriculum_band_min=0.7, curriculum_band_max=0.3).check()
    with pytest.raises(DataError, match="have no 'pass_rate'.*shell.pass_rates"):
        make_curriculum(DataConfig(curriculum="pass-rate"), _dataset([1, 2]), seed=0, total_steps=5)


def test_online_rests_problems_outside_the_band_and_takes_them_back():
    cur = Online(4, seed=0, low=0.1, high=0.9, rest=1)
    epoch = [cur._at(p) for p in range(4)]
    first = cur.indices(1, 2)
    assert first == epoch[:2]
    cur.observe(first, [1.0, 0.5], step=1)  # first[0] too easy
    second = cur.indices(2, 2)
    cur.observe(second, [0.0, 0.5], step=2)  # second[0] too hard
    resting = {first[0], second[0]}
    assert all(cur.resting(i) for i in resting) and not cur.resting(first[1])
    third = cur.indices(3, 2)  # epoch 2: the two resting problems are passed over once
    assert set(third) == {first[1], second[1]}
    assert not any(cur.resting(i) for i in resting)  # passed over once (rest=1): they come back
    assert sorted(cur.indices(4, 2) + cur.indices(5, 2)) == [0, 1, 2, 3]  # epoch 3 takes every problem
    cur.observe([first[0], second[0]], [0.5, 0.5], step=5)
    assert cur.rate[first[0]] == pytest.approx(0.75) and cur.rate[second[0]] == pytest.approx(0.25)  # 1/2 old + 1/2 new


def test_online_fills_the_batch_when_everything_rests():
    cur = Online(3, seed=1, low=0.1, high=0.9, rest=5)
    cur.observe([0, 1, 2], [1.0, 1.0, 0.0], step=1)
    picked = cur.indices(2, 2)
    assert len(picked) == 2 and len(set(picked)) == 2


def _rate(i: int, step: int) -> float:
    return (derive_seed(0, i, step) % 9) / 8


@given(seed=st.integers(0, 1000), stop=st.integers(1, 7), n=st.integers(1, 6))
def test_online_state_round_trip_continues_exactly(seed, stop, n):
    def steps(cur, first, last):
        out = []
        for s in range(first, last + 1):
            idx = cur.indices(s, n)
            cur.observe(idx, [_rate(i, s) for i in idx], step=s)
            out.append(idx)
        return out

    straight = steps(Online(10, seed=seed, low=0.2, high=0.8, rest=2), 1, 8)
    a = Online(10, seed=seed, low=0.2, high=0.8, rest=2)
    head = steps(a, 1, stop)
    state = json.loads(json.dumps(a.state_dict()))  # the state survives serialisation (keys become strings)
    b = Online(10, seed=seed, low=0.2, high=0.8, rest=2)
    assert restore_curriculum(b, state) is None
    assert head + steps(b, stop + 1, 8) == straight


def test_restore_refuses_another_curriculum():
    online = Online(10, seed=0, low=0.1, high=0.9, rest=2)
    assert "starts afresh" in restore_curriculum(online, Uniform(10, seed=0).state_dict())
    assert "starts afresh" in restore_curriculum(online, None)
    assert restore_curriculum(Uniform(10, seed=0), None) is None  # an old checkpoint, uniform sampling: nothing to say
    assert "over 10 problems" in restore_curriculum(Uniform(11, seed=0), Uniform(10, seed=0).state_dict())


def test_group_pass_rates():
    scores = [{"reward": r} for r in (1, 0, 0, 0, 1, 1, 1, 0)]
    assert group_pass_rates(scores, group_size=4) == [0.25, 0.75]
    with pytest.raises(ValueError):
        group_pass_rates(scores[:3], group_size=2)


# ------------------------------------------------------------------------------------------------ shell.pass_rates


class _Scripted:
    """A sampler whose sample j of the problem keyed k answers correctly iff a hash of (seed, k, j) says so, with
    the problem's own odds (k % 5 of 4): deterministic, and different per problem."""

    def __init__(self, answers: dict[str, str], fail_after: int | None = None) -> None:
        self.answers, self.calls, self.fail_after = answers, 0, fail_after

    def generate(self, prompts, params, *, keys=None, progress=False):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        out = []
        for prompt, key in zip(prompts, keys):
            truth = next(a for q, a in self.answers.items() if q in prompt)
            group = []
            for j in range(params.n):
                ok = derive_seed(params.seed, key, j) % 4 < key % 5
                text = f" x </think> <answer> {truth if ok else 'wrong'} </answer>"
                group.append(Completion(text=text, token_ids=[1, 2], logprobs=None, entropies=None, finish_reason="stop"))
            out.append(group)
        return out

    def load_weights(self, model):
        pass

    def sleep(self):
        pass

    def close(self):
        pass


def _patch_sampler(monkeypatch, tmp_path, sampler):
    from doubles import tiny_policy
    from shell import pass_rates

    model, tok = tiny_policy()
    monkeypatch.setattr(pass_rates, "build_sampler", lambda *a, **k: (model, tok, sampler))


def _pr_args(out: Path, *extra: str) -> list[str]:
    return ["--data.limit", "10", "--data.difficulty-max", "2", "--samples-per-problem", "4", "--chunk-problems", "3",
            "--grading.workers", "0", "--output", str(out), *extra]


@given(correct=st.lists(st.booleans(), min_size=1, max_size=16))
def test_with_pass_rate_is_num_correct_over_num_samples(correct):
    from shell.pass_rates import with_pass_rate

    rec = with_pass_rate({"problem": "p", "pass_rate": 0.9}, [1.0 if c else 0.0 for c in correct])
    assert rec["num_samples"] == len(correct) and rec["num_correct"] == sum(correct)
    assert rec["pass_rate"] == rec["num_correct"] / rec["num_samples"] and rec["problem"] == "p"


def test_pass_rates_band_filter_resume_and_load_back(monkeypatch, tmp_path):
    from shell import pass_rates

    answers = {ex.question: ex.answer for ex in embedded_dataset(n=10, difficulty=1, difficulty_max=2)}
    _patch_sampler(monkeypatch, tmp_path, _Scripted(answers))
    full = tmp_path / "full.jsonl"
    pass_rates.main(_pr_args(full))
    recs = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(recs) == 10 and (tmp_path / "full.png").stat().st_size > 0
    assert not pass_rates.partial_path(full).exists()
    assert all(r["pass_rate"] == r["num_correct"] / r["num_samples"] and r["num_samples"] == 4 for r in recs)
    assert len({r["pass_rate"] for r in recs}) > 2  # the script gives different problems different rates
    assert [r["question"] for r in recs] == [ex.question for ex in embedded_dataset(n=10, difficulty=1, difficulty_max=2)]

    # The band: exactly the records in [0.25, 0.75], the rest kept in .all.jsonl.
    band = tmp_path / "band.jsonl"
    pass_rates.main(_pr_args(band, "--keep-min", "0.25", "--keep-max", "0.75"))
    kept = [json.loads(line) for line in band.read_text().splitlines()]
    assert kept == [r for r in recs if 0.25 <= r["pass_rate"] <= 0.75] and 0 < len(kept) < 10
    assert (tmp_path / "band.all.jsonl").read_text() == full.read_text()

    # Killed after the first chunk: the partial file holds it; a rerun without --resume refuses; --resume finishes
    # with the same records.
    cut = tmp_path / "cut.jsonl"
    _patch_sampler(monkeypatch, tmp_path, _Scripted(answers, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        pass_rates.main(_pr_args(cut))
    assert len(pass_rates.partial_path(cut).read_text().splitlines()) == 3 and not cut.exists()
    with pytest.raises(SystemExit) as e:
        pass_rates.main(_pr_args(cut))
    assert e.value.code == 2
    sampler = _Scripted(answers)
    _patch_sampler(monkeypatch, tmp_path, sampler)
    pass_rates.main(_pr_args(cut, "--resume"))
    assert cut.read_text() == full.read_text() and sampler.calls == 3  # chunks 2..4 of 3 problems only

    # Killed mid-write (a torn last line), resumed, killed again, resumed: the torn bytes are dropped before the
    # next chunk is appended (else they would glue onto it and break the second resume).
    torn = tmp_path / "torn.jsonl"
    _patch_sampler(monkeypatch, tmp_path, _Scripted(answers, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        pass_rates.main(_pr_args(torn))
    with open(pass_rates.partial_path(torn), "a", encoding="utf-8") as f:
        f.write('{"question": "half a rec')
    _patch_sampler(monkeypatch, tmp_path, _Scripted(answers, fail_after=1))
    with pytest.raises(KeyboardInterrupt):
        pass_rates.main(_pr_args(torn, "--resume"))
    assert len(pass_rates.partial_path(torn).read_text().splitlines()) == 6
    _patch_sampler(monkeypatch, tmp_path, _Scripted(answers))
    pass_rates.main(_pr_args(torn, "--resume"))
    assert torn.read_text() == full.read_text()

    # The output loads back: the same problems, with their pass rates for --data.curriculum pass-rate.
    back = load_dataset(DataConfig(path=str(full)))
    assert [ex.meta["pass_rate"] for ex in back] == [r["pass_rate"] for r in recs]
    cur = make_curriculum(DataConfig(path=str(full), curriculum="pass-rate", curriculum_start=1.0), back, seed=0,
                          total_steps=3)
    assert [recs[i]["pass_rate"] for i in cur.order] == sorted((r["pass_rate"] for r in recs), reverse=True)


def test_pass_rates_keeps_a_jsonl_record_whole(monkeypatch, tmp_path):
    from shell import pass_rates

    src = tmp_path / "math.jsonl"
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": f"Level {i % 5 + 1}", "subject": "A",
             "unique_id": f"u{i}"} for i in range(5)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _patch_sampler(monkeypatch, tmp_path, _Scripted({r["problem"]: r["answer"] for r in rows}))
    out = tmp_path / "out.jsonl"
    pass_rates.main(["--data.path", str(src), "--samples-per-problem", "2", "--grading.workers", "0", "--output", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in rows[0]} for r in recs] == rows
    back = load_dataset(DataConfig(path=str(out)))
    assert back.format == "math" and [ex.meta["level"] for ex in back] == [r["level"] for r in rows]


@pytest.mark.parametrize("args, message", [
    (["--keep-min", "0.8", "--keep-max", "0.2"], "--keep-min"),
    (["--keep-max", "1.5"], "--keep-max must be in"),
    (["--samples-per-problem", "0"], "--samples-per-problem"),
    (["--output", "x.json"], "--output must name a .jsonl"),
])
def test_pass_rates_flags_checked_first(args, message, capsys):
    from shell import pass_rates

    with pytest.raises(SystemExit) as e:
        pass_rates.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ exact resume


def _grpo_args(tiny: Path, runs: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "6", "--data.difficulty-max", "3",
        "--eval-data.limit", "4", "--eval.max-tokens", "6", "--grading.workers", "0",
        "--sampler.generation-dtype", "None", "--run.logger", "none", "--run.runs-dir", str(runs),
        "--run.name", name, "--n-grpo-steps", str(steps), "--rollout-batch-size", "8", "--group-size", "4",
        "--train-batch-size", "4", "--gradient-accumulation-steps", "2", "--loss-type", "grpo_clip",
        "--sampling.max-tokens", "6", "--eval-every", "2", "--optim.lr", "1e-3", "--warm-start.steps", "1",
        "--warm-start.batch-size", "6", *extra,
    ]


def test_online_curriculum_grpo_resume_equals_uninterrupted(tmp_path):
    """6 problems, 2 a step: at step 4 the walk is in its second epoch, where the tiny model's 0-rate problems
    rest; the resumed run must pick exactly what the uninterrupted one did."""
    from shell import grpo
    from shell.runlog import read_metrics

    from doubles import save_tiny_policy

    tiny = save_tiny_policy(tmp_path / "tiny")
    extra = ("--data.curriculum", "online", "--data.curriculum-rest", "1")
    grpo.main(_grpo_args(tiny, tmp_path, "straight", 4, *extra))
    grpo.main(_grpo_args(tiny, tmp_path, "resumed", 2, *extra))
    state = load_state(tmp_path / "resumed" / "checkpoints" / "step_000002")
    assert state["loop"]["curriculum"]["kind"] == "online" and state["loop"]["curriculum"]["cursor"] == 4
    grpo.main([*_grpo_args(tiny, tmp_path, "resumed", 4, *extra), "--resume"])
    drop = {"time/elapsed_s", "eval/seconds"}
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "straight")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed")]
    assert a == b and sorted({r["train_step"] for r in a if "train_step" in r}) == [1, 2, 3, 4]
    assert (tmp_path / "resumed" / "generations.jsonl").read_text() == (tmp_path / "straight" / "generations.jsonl").read_text()


def test_expert_iteration_takes_its_questions_from_the_curriculum(tmp_path, monkeypatch):
    """--data.curriculum level in EI: step 1 draws only from the easiest quarter (difficulty 1), and the
    checkpoint holds the curriculum's state."""
    from shell import expert_iteration as ei

    from doubles import save_tiny_policy

    seen: list[list[int]] = []
    real = ei.rollout

    def recording(sampler, questions, *a, **k):
        seen.append([q.meta["difficulty"] for q in questions])
        return real(sampler, questions, *a, **k)

    monkeypatch.setattr(ei, "rollout", recording)
    tiny = save_tiny_policy(tmp_path / "tiny")
    ei.main([
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "12", "--data.difficulty-max", "3",
        "--data.curriculum", "level", "--data.curriculum-steps", "2", "--eval-data.limit", "4", "--eval.max-tokens", "6",
        "--grading.workers", "0", "--sampler.generation-dtype", "None", "--run.logger", "none",
        "--run.runs-dir", str(tmp_path), "--run.name", "ei", "--n-ei-steps", "3", "--ei-batch-size", "3",
        "--group-size", "2", "--sampling.max-tokens", "6", "--sft-batch-size", "4", "--sft-gradient-accumulation-steps",
        "2", "--warm-start.steps", "0", "--eval-every", "3",
    ])
    assert seen[0] == [1, 1, 1]  # competence 0.25 of 12: the three easiest, all difficulty 1
    assert len(seen) == 3
    state = load_state(tmp_path / "ei" / "checkpoints" / "step_000003")
    assert state["loop"]["curriculum"] == {"kind": "level", "size": 12}


def test_leaderboard_preset_trains_on_the_pass_rate_band_and_names_the_file_it_needs(tmp_path, monkeypatch):
    from shell.config import cli
    from shell.grpo import PRESETS, GRPOConfig, check_config

    cfg = cli(GRPOConfig, PRESETS, description="", args=["--preset", "leaderboard"])
    assert (cfg.data.curriculum, cfg.data.curriculum_band_min, cfg.data.curriculum_band_max) == ("pass-rate", 0.1, 0.9)
    from shell.pass_rates import PRESETS as PR

    assert cfg.data.path == PR["h100"][1].output  # the file shell.pass_rates --preset h100 writes
    monkeypatch.chdir(tmp_path)  # no data/ here
    with pytest.raises(ValueError, match="shell.pass_rates --preset h100"):
        check_config(cfg)
