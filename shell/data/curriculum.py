"""Which training problems an RL step takes (``--data.curriculum``): pure, seeded samplers over a data set's
indices, each with ``state_dict()`` / ``load_state_dict()`` so that the loop's checkpoint holds them and
``--resume`` continues exactly.

- ``none`` (:class:`Uniform`): consecutive slices of one seeded permutation per epoch (``batch_indices``), the
  loops' behaviour without a curriculum.
- ``level`` and ``pass-rate`` (:class:`Staged`): problems ranked easy to hard (MATH ``level`` / embedded
  ``difficulty``; or ``1 - pass_rate`` from ``shell.pass_rates``), ties in a seeded order. Step ``t`` draws its
  problems from the easiest ``c(t)`` fraction, with the competence schedule of Platanios et al. 2019
  ("Competence-based curriculum learning", NAACL): ``c(t) = min(1, sqrt(c0² + (1 - c0²) (t - 1) / T))``,
  ``c0`` = ``--data.curriculum-start``, ``T`` = ``--data.curriculum-steps``. ``pass-rate`` first keeps only the
  problems whose pass rate lies in ``[--data.curriculum-band-min, --data.curriculum-band-max]`` (the "train on
  what the model solves 20–80% of the time" filter, when the band is 0.2–0.8).
- ``online`` (:class:`Online`): each problem's running pass rate from the rollouts themselves (an average of its
  groups' answer rewards, the newest weighted ``ONLINE_WEIGHT``); the uniform order is walked and a problem whose
  rate lies outside the band (too easy or too hard) is passed over ``--data.curriculum-rest`` times before it is
  tried again, as difficulty pools do (prime-rl's easy/normal/hard pools; DAPO's dynamic sampling drops such
  groups only after sampling them).

Every sampler answers ``indices(step, n, round=0)`` (GRPO step or EI step ``step`` ≥ 1; ``round`` > 0: dynamic
sampling's further rounds of the same step) and takes ``observe(indices, pass_rates, step=)`` after grading.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

from shell.data.loading import DataConfig
from shell.data.records import DataError, Dataset, Example
from shell.seeds import batch_indices, derive_seed, seeded_permutation

__all__ = ["MATH_PASS_RATES", "ONLINE_WEIGHT", "Online", "QuestionSampler", "Staged", "Uniform", "competence", "difficulty_of",
           "group_pass_rates", "make_curriculum", "restore_curriculum"]

ONLINE_WEIGHT = 0.5
"""Weight of a problem's newest group pass rate in its running rate (the rest: its previous running rate)."""

MATH_PASS_RATES = "data/math_train_pass_rates.jsonl"
"""Where ``python -m shell.pass_rates --preset h100`` writes MATH train's pass rates under Qwen2.5-Math-1.5B (the
``leaderboard`` GRPO preset trains on it)."""


class QuestionSampler(Protocol):
    """What the loops ask of a curriculum."""

    def indices(self, step: int, n: int, *, round: int = 0) -> list[int]: ...

    def observe(self, indices: Sequence[int], pass_rates: Sequence[float], *, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> str: ...


def _check_state(kind: str, size: int, state: dict[str, Any]) -> None:
    if state.get("kind") != kind or state.get("size") != size:
        raise ValueError(f"--data.curriculum: the checkpoint's curriculum is {state.get('kind')!r} over "
                         f"{state.get('size')} problems, this run's {kind!r} over {size}")


class Uniform:
    """``--data.curriculum none``: step ``t``'s problems are slice ``t - 1`` of the seeded per-epoch permutations
    (``batch_indices``); round ``r`` > 0 of a step draws from its own stream (``dynamic-sampling``), at position
    ``(t - 1) * rounds_per_step + r``. Stateless."""

    def __init__(self, size: int, *, seed: int, rounds_per_step: int = 1) -> None:
        self.size, self.seed, self.rounds_per_step = size, seed, rounds_per_step

    def indices(self, step: int, n: int, *, round: int = 0) -> list[int]:
        if round == 0:
            return batch_indices(self.size, n, step - 1, seed=self.seed)
        return batch_indices(self.size, n, (step - 1) * self.rounds_per_step + round, seed=self.seed,
                             stream="dynamic-sampling")

    def observe(self, indices: Sequence[int], pass_rates: Sequence[float], *, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "none", "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state("none", self.size, state)

    def describe(self) -> str:
        return f"uniform over {self.size} problems"


def competence(step: int, *, start: float, steps: int) -> float:
    """The fraction of the problems (easiest first) step ``step`` (1-based) draws from:
    ``min(1, sqrt(start² + (1 - start²) (step - 1) / steps))``; 1 from step ``steps + 1`` on."""
    if steps < 1:
        return 1.0
    return min(1.0, math.sqrt(start**2 + (1.0 - start**2) * max(0, step - 1) / steps))


class Staged:
    """Problems ranked easy to hard by ``scores`` (lower: easier; ties in a seeded order); step ``t`` draws ``n`` of
    the easiest ``ceil(competence(t) · N)`` (at least ``n`` where there are that many) in a seeded order of its own.
    ``keep`` (the pass-rate band) leaves problems out altogether. Stateless: each step's problems are a pure
    function of the scores, the seed and the step."""

    def __init__(self, kind: str, scores: Sequence[float], *, seed: int, start: float, steps: int,
                 keep: Sequence[bool] | None = None) -> None:
        self.kind, self.size, self.seed, self.start, self.steps = kind, len(scores), seed, start, steps
        ties = seeded_permutation(len(scores), derive_seed(seed, "curriculum-ties"))
        rank = {i: r for r, i in enumerate(ties)}
        kept = [i for i in range(len(scores)) if keep is None or keep[i]]
        self.order = sorted(kept, key=lambda i: (scores[i], rank[i]))
        """Indices of the kept problems, easiest first."""

    def pool(self, step: int, n: int) -> list[int]:
        """The problems step ``step`` draws from, easiest first."""
        size = math.ceil(competence(step, start=self.start, steps=self.steps) * len(self.order))
        return self.order[: min(len(self.order), max(size, n, 1))]

    def indices(self, step: int, n: int, *, round: int = 0) -> list[int]:
        pool = self.pool(step, n)
        return [pool[i] for i in batch_indices(len(pool), n, 0, seed=derive_seed(self.seed, "curriculum", step, round))]

    def observe(self, indices: Sequence[int], pass_rates: Sequence[float], *, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self.kind, self.size, state)

    def describe(self) -> str:
        left = f" ({self.size - len(self.order)} of {self.size} outside the band left out)" if len(self.order) < self.size else ""
        if self.start >= 1.0:
            return f"{self.kind} curriculum over {len(self.order)} problems{left}, uniformly from the start"
        return (f"{self.kind} curriculum over {len(self.order)} problems{left}, easy to hard: the easiest "
                f"{self.start:.0%} at step 1, all from step {self.steps + 1}")


class Online:
    """Running pass rates from the rollouts; problems outside ``[low, high]`` rest.

    The walk follows the uniform order (one seeded permutation per epoch, position ``cursor``). A problem seen
    before whose running rate is outside the band is passed over (its pass count goes up) until it has been passed
    over ``rest`` times; then it is taken again (and re-measured). Problems never seen are always taken. When a
    whole epoch's walk finds fewer than ``n``, the passed-over ones fill the batch, in walk order.

    State (``state_dict``): the cursor, each seen problem's running rate, and its pass-over count."""

    def __init__(self, size: int, *, seed: int, low: float, high: float, rest: int) -> None:
        self.size, self.seed, self.low, self.high, self.rest = size, seed, low, high, rest
        self.cursor = 0
        self.rate: dict[int, float] = {}
        self.passed: dict[int, int] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return seeded_permutation(self.size, derive_seed(self.seed, "online", epoch))[offset]

    def resting(self, i: int) -> bool:
        """Is problem ``i`` seen, outside the band, and not yet passed over ``rest`` times?"""
        r = self.rate.get(i)
        return r is not None and not (self.low <= r <= self.high) and self.passed.get(i, 0) < self.rest

    def indices(self, step: int, n: int, *, round: int = 0) -> list[int]:
        taken: list[int] = []
        skipped: list[int] = []
        scanned = 0
        while len(taken) < n and scanned < self.size:
            i = self._at(self.cursor)
            self.cursor += 1
            scanned += 1
            if self.resting(i):
                self.passed[i] = self.passed.get(i, 0) + 1
                skipped.append(i)
            else:
                taken.append(i)
        taken += skipped[: n - len(taken)]
        while len(taken) < n:  # n > size: the walk goes on, as batch_indices would
            taken.append(self._at(self.cursor))
            self.cursor += 1
        return taken

    def observe(self, indices: Sequence[int], pass_rates: Sequence[float], *, step: int) -> None:
        if len(indices) != len(pass_rates):
            raise ValueError(f"observe: {len(indices)} indices but {len(pass_rates)} pass rates")
        for i, r in zip(indices, pass_rates):
            old = self.rate.get(i)
            self.rate[i] = float(r) if old is None else (1.0 - ONLINE_WEIGHT) * old + ONLINE_WEIGHT * float(r)
            self.passed[i] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "online", "size": self.size, "cursor": self.cursor, "rate": dict(self.rate),
                "passed": dict(self.passed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state("online", self.size, state)
        self.cursor = int(state["cursor"])
        self.rate = {int(k): float(v) for k, v in state["rate"].items()}
        self.passed = {int(k): int(v) for k, v in state["passed"].items()}

    def describe(self) -> str:
        return (f"online curriculum over {self.size} problems: running pass rates in [{self.low:g}, {self.high:g}] "
                f"are sampled, others rest {self.rest} pass(es)")


_LEVEL = re.compile(r"(\d+)\s*$")


def difficulty_of(example: Example) -> int | None:
    """An example's difficulty: the embedded task's ``difficulty``, or the number of MATH's ``level``
    ("Level 3" → 3); None when it has neither (MATH's "Level ?")."""
    d = example.meta.get("difficulty")
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    level = example.meta.get("level")
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and (m := _LEVEL.search(level)):
        return int(m.group(1))
    return None


def make_curriculum(cfg: DataConfig, dataset: Dataset, *, seed: int, total_steps: int,
                    rounds_per_step: int = 1) -> QuestionSampler:
    """The sampler ``--data.curriculum`` names, over ``dataset``'s indices. Raises ``DataError`` naming the flag
    when the data lacks what it needs (no level or difficulty; no pass_rate; an empty band)."""
    n = len(dataset)
    steps = cfg.curriculum_steps if cfg.curriculum_steps is not None else total_steps
    if cfg.curriculum == "none":
        return Uniform(n, seed=seed, rounds_per_step=rounds_per_step)
    if cfg.curriculum == "level":
        levels = [difficulty_of(ex) for ex in dataset]
        known = [d for d in levels if d is not None]
        if not known:
            raise DataError(f"--data.curriculum level: {dataset.source} has no MATH level or embedded difficulty")
        if len(known) < n:
            print(f"--data.curriculum level: {n - len(known)} of {n} problems have no level; they come last", flush=True)
        last = max(known) + 1
        return Staged("level", [float(last if d is None else d) for d in levels], seed=seed,
                      start=cfg.curriculum_start, steps=steps)
    if cfg.curriculum == "pass-rate":
        rates = [ex.meta.get("pass_rate") for ex in dataset]
        missing = [i for i, r in enumerate(rates) if r is None]
        if missing:
            ex = dataset[missing[0]]
            where = f"{ex.meta.get('file', ex.meta.get('source', dataset.source))}:{ex.meta.get('line', missing[0] + 1)}"
            raise DataError(f"--data.curriculum pass-rate: {len(missing)} of {n} problems have no 'pass_rate' (first: "
                            f"{where}); estimate them with python -m shell.pass_rates and train on its --output")
        low = 0.0 if cfg.curriculum_band_min is None else cfg.curriculum_band_min
        high = 1.0 if cfg.curriculum_band_max is None else cfg.curriculum_band_max
        keep = [low <= float(r) <= high for r in rates]  # type: ignore[arg-type]
        if not any(keep):
            raise DataError(f"--data.curriculum-band-min/--data.curriculum-band-max: no problem's pass_rate lies in "
                            f"[{low:g}, {high:g}] ({n} problems)")
        return Staged("pass-rate", [1.0 - float(r) for r in rates], seed=seed,  # type: ignore[arg-type]
                      start=cfg.curriculum_start, steps=steps, keep=keep)
    if cfg.curriculum == "online":
        low = 0.1 if cfg.curriculum_band_min is None else cfg.curriculum_band_min
        high = 0.9 if cfg.curriculum_band_max is None else cfg.curriculum_band_max
        return Online(n, seed=seed, low=low, high=high, rest=cfg.curriculum_rest)
    raise ValueError(f"--data.curriculum must be one of none, level, pass-rate, online; got {cfg.curriculum!r}")


def group_pass_rates(scores: Sequence[dict[str, float]], *, group_size: int) -> list[float]:
    """Each question's pass rate in a rollout batch grouped consecutively (``group_size`` rows a question): the mean
    of its responses' ``reward`` (1 for a correct, well-formatted answer), as ``shell.pass_rates`` counts them."""
    if len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores do not form groups of {group_size}")
    return [sum(s["reward"] for s in scores[g : g + group_size]) / group_size
            for g in range(0, len(scores), group_size)]


def restore_curriculum(sampler: QuestionSampler, state: dict[str, Any] | None) -> str | None:
    """Load a checkpoint's curriculum state into ``sampler``; a message (and a fresh start) when the checkpoint has
    none or one of another kind or size (a curriculum changed with --allow-config-change)."""
    if state is None:  # a checkpoint from before curricula: uniform sampling needs no state
        return None if isinstance(sampler, Uniform) else "--data.curriculum: the checkpoint has no curriculum state; it starts afresh here"
    try:
        sampler.load_state_dict(state)
    except ValueError as e:
        return f"{e}; it starts afresh here"
    return None
