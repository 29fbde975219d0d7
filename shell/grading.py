"""Batch grading in a reusable pool of worker processes.

:func:`grade_batch` scores responses with a reward function from :mod:`core` (``"r1_zero"``,
``"question_only"``) or any picklable module-level callable, in worker processes started once and
reused across calls, and returns the rewards in input order with summary metadata.

* Start method: ``forkserver``, with ``core._grading`` preloaded in the fork server, so workers
  start in a fraction of a second and nothing is forked from the (torch / CUDA / vLLM) parent.
* Timeouts: each item gets ``timeout_s`` of wall time from the moment its worker starts on it.
  A worker past that is killed (SIGKILL) and replaced, and the item counts as wrong:
  ``answer_reward = reward = 0`` and ``format_reward`` from a cheap check done here in the parent
  (r1_zero: the ``"</think> <answer>"`` and ``"</answer>"`` tags; question_only: a usable
  ``\\boxed{}``; a custom callable: 0).  The same holds for an item whose reward function raised
  or whose worker died.  A worker that dies, busy or idle (the out-of-memory killer's SIGKILL, say),
  is replaced and its death logged; only the item it held (if any) counts as wrong.  The core
  graders are bounded on their own; the timeout is the backstop.
* ``num_workers=0`` grades in this process, sequentially, without timeouts.
* Shortcuts, exact because the core reward functions are pure: an r1_zero response without its
  answer tags scores all zeros in the parent, and identical (response, ground truth) pairs are
  graded once. A custom callable is called for every item.
* The pool is created lazily on first use, shared by all callers of this module (one batch at a
  time), resized to ``num_workers`` on demand, closed by :func:`close_pool` and at interpreter exit.
  As with any ``spawn`` / ``forkserver`` pool, workers import the caller's main module (as
  ``__mp_main__``): a script must keep its work under ``if __name__ == "__main__":``.
* Where no worker can be started (a daemonic process, no ``forkserver`` on the platform, workers
  that keep dying while starting) the batch is graded in this process instead.
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import core
from shell.progress import progress_bar, say

__all__ = ["answer_extractor_by_name", "close_pool", "grade_batch", "reward_fn_by_name"]

RewardFn = Callable[..., dict[str, float]]

_REWARD_FNS: dict[str, RewardFn] = {
    "r1_zero": core.r1_zero_reward_fn,
    "question_only": core.question_only_reward_fn,
}
_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "r1_zero": core.extract_r1_zero_answer,
    "question_only": core.extract_boxed,
}
_KEYS = ("format_reward", "answer_reward", "reward")

_DEFAULT_MAX_WORKERS = 8
_STARTUP_TIMEOUT_S = 180.0  # a worker's import + reward-function set-up (first start imports torch)
_MAX_START_FAILURES = 3  # per batch, before the rest of the batch is graded in this process
_PREFETCH_BYTES = 16_384  # queue a second item on a busy worker only while its pipe stays far from full
_PREFETCH_ITEMS = 4


def reward_fn_by_name(name: str) -> RewardFn:
    """The core reward function called ``name``.

    Args:
        name: ``"r1_zero"`` or ``"question_only"`` (the ``_reward_fn`` suffix is accepted too, as in
            ``PromptTemplate.reward_fn_name``).

    Returns:
        ``fn(response: str, ground_truth, fast: bool = True) -> {"format_reward", "answer_reward",
        "reward"}``.

    Raises:
        ValueError: for any other name.
    """
    key = name[: -len("_reward_fn")] if name.endswith("_reward_fn") else name
    if key not in _REWARD_FNS:
        raise ValueError(f"unknown reward function {name!r}; available: {', '.join(sorted(_REWARD_FNS))}")
    return _REWARD_FNS[key]


def answer_extractor_by_name(name: str) -> Callable[[str], str | None]:
    """The answer the reward function called ``name`` grades, as a function of the response (``None``: no
    answer): ``core.extract_r1_zero_answer`` for r1_zero, ``core.extract_boxed`` for question_only.

    Raises:
        ValueError: for any other name (as :func:`reward_fn_by_name`).
    """
    reward_fn_by_name(name)  # validates
    return _EXTRACTORS[name[: -len("_reward_fn")] if name.endswith("_reward_fn") else name]


def _canonical_name(reward_fn: str | RewardFn) -> str | None:
    if isinstance(reward_fn, str):
        reward_fn_by_name(reward_fn)  # validates
        return reward_fn[: -len("_reward_fn")] if reward_fn.endswith("_reward_fn") else reward_fn
    for name, fn in _REWARD_FNS.items():
        if reward_fn is fn:
            return name
    return None


def _cheap_format_reward(name: str | None, response: Any) -> float:
    """The format reward without grading: what a timed-out / failed item keeps."""
    if not isinstance(response, str):
        return 0.0
    if name == "r1_zero":
        return float("</think> <answer>" in response and "</answer>" in response)
    if name == "question_only":
        return float(core.extract_boxed(response) is not None)
    return 0.0


def _failed(name: str | None, response: Any) -> dict[str, float]:
    return {"format_reward": _cheap_format_reward(name, response), "answer_reward": 0.0, "reward": 0.0}


def _as_rewards(out: Any) -> dict[str, float]:
    return {key: float(out[key]) for key in _KEYS} | {
        key: float(value) for key, value in out.items() if key not in _KEYS and isinstance(value, (int, float))
    }


# ----------------------------------------------------------------------------------------------
# Worker side.


def _quiet_libraries() -> None:
    """Silence the graders' library chatter (pylatexenc / math-verify log lines, sympy warnings)."""
    for logger_name in ("pylatexenc", "math_verify", "latex2sympy2_extended"):
        logging.getLogger(logger_name).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")


def _worker_main(conn: Connection) -> None:
    """Worker loop: ``("fn", payload, fast)`` configures, ``("item", index, response, truth)`` grades."""
    # Ctrl-C reaches the whole process group: the parent decides what to do (finish the step, then stop);
    # a worker that died of it would fail its items as wrong answers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _quiet_libraries()
    conn.send(("ready", os.getpid()))
    fn: RewardFn | None = None
    fast = True
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        kind = message[0]
        if kind == "fn":
            try:
                payload = message[1]
                fn = reward_fn_by_name(payload) if isinstance(payload, str) else pickle.loads(payload)
                fast = bool(message[2])
                conn.send(("fn_ok",))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                conn.send(("fn_err", f"{type(exc).__name__}: {exc}"))
        elif kind == "item":
            _, index, response, truth = message
            try:
                assert fn is not None, "no reward function configured"
                result: tuple[Any, ...] = ("res", index, _as_rewards(fn(response, truth, fast=fast)))
            except Exception as exc:  # noqa: BLE001 - the item counts as failed
                result = ("err", index, f"{type(exc).__name__}: {exc}")
            conn.send(result)


# ----------------------------------------------------------------------------------------------
# Parent side.


class _Worker:
    """One worker process, its pipe end, and what it is doing."""

    def __init__(self, ctx: Any) -> None:
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_end,), daemon=True, name="grader")
        self.process.start()
        child_end.close()
        self.conn: Connection = parent_end
        self.state = "starting"  # starting -> configuring -> idle <-> busy
        self.config: tuple[Any, bool] | None = None  # the reward function it has loaded
        self.requested: tuple[Any, bool] | None = None  # the one it is loading
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        self.in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (index, bytes)
        self.head_started = 0.0

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(timeout=2)
        except Exception:  # noqa: BLE001
            pass
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class _StartFailure(RuntimeError):
    pass


class _Pool:
    """Worker processes owned by one parent process."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.ctx = multiprocessing.get_context("forkserver")
        # Import the graders once in the fork server; workers fork from it already loaded.
        self.ctx.set_forkserver_preload(["core._grading", "shell.grading"])
        self.workers: list[_Worker] = []

    def close(self, graceful: bool = True) -> None:
        """Stop every worker: ask them to exit (``graceful``) or kill them outright."""
        workers, self.workers = self.workers, []
        for worker in workers:
            if graceful:
                worker.stop()
            else:
                worker.kill()

    def resize(self, n: int) -> None:
        while len(self.workers) > n:
            self.workers.pop().stop()
        while len(self.workers) < n:
            self.workers.append(_Worker(self.ctx))

    def replace(self, worker: _Worker) -> None:
        worker.kill()
        self.workers[self.workers.index(worker)] = _Worker(self.ctx)

    def run(
        self,
        messages: list[bytes],
        payload: Any,
        fast: bool,
        timeout_s: float,
        tick: Callable[[int], None] = lambda n: None,
    ) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
        """Grade pre-pickled item messages; returns (results by index, failures by index -> why).
        ``tick(k)`` is called as ``k`` more items are done."""
        config = (payload, fast)
        pending = collections.deque(range(len(messages)))
        results: dict[int, dict[str, float]] = {}
        failures: dict[int, str] = {}
        start_failures = 0

        def finish_head(worker: _Worker, now: float) -> None:
            worker.in_flight.popleft()
            worker.head_started = now
            if not worker.in_flight:
                worker.state = "idle"

        done = 0
        while len(results) + len(failures) < len(messages):
            if len(results) + len(failures) > done:
                tick(len(results) + len(failures) - done)
                done = len(results) + len(failures)
            now = time.monotonic()
            # 1. hand out work
            for worker in list(self.workers):
                unsent: int | None = None
                try:
                    if worker.state == "idle" and worker.config != config:
                        worker.conn.send(("fn", payload, fast))
                        worker.requested = config
                        worker.state, worker.deadline = "configuring", now + _STARTUP_TIMEOUT_S
                        continue
                    while pending and worker.state in ("idle", "busy") and len(worker.in_flight) < _PREFETCH_ITEMS:
                        index = pending[0]
                        size = len(messages[index])
                        queued = sum(b for _, b in worker.in_flight)
                        if worker.in_flight and queued + size > _PREFETCH_BYTES:
                            break
                        pending.popleft()
                        if not worker.in_flight:
                            worker.head_started = now
                        worker.in_flight.append((index, size))
                        worker.state = "busy"
                        unsent = index
                        worker.conn.send_bytes(messages[index])
                        unsent = None
                except (OSError, EOFError):  # it died since the last look (idle, or between items): a broken pipe
                    if unsent is not None:  # never reached it: graded by another worker
                        worker.in_flight.pop()
                        pending.appendleft(unsent)
                    self._drop(worker, pending, failures, "worker died")
            # 2. wait for results, deaths or the nearest deadline
            deadlines = [
                w.head_started + timeout_s if w.state == "busy" else w.deadline
                for w in self.workers
                if w.state != "idle"
            ]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.05
            ready = set(wait([w.conn for w in self.workers] + [w.process.sentinel for w in self.workers], wait_s))
            now = time.monotonic()
            for worker in list(self.workers):
                dead = worker.process.sentinel in ready
                try:
                    while worker.conn.poll():
                        message = worker.conn.recv()
                        kind = message[0]
                        if kind == "ready":
                            worker.state = "idle"
                        elif kind == "fn_ok":
                            # may answer a request of an earlier batch: step 1 then reconfigures
                            worker.config, worker.state = worker.requested, "idle"
                        elif kind == "fn_err":
                            raise ValueError(f"the grading workers cannot load the reward function: {message[1]}")
                        elif kind in ("res", "err"):
                            index = message[1]
                            if kind == "res":
                                results[index] = message[2]
                            else:
                                failures[index] = "error: " + message[2]
                            finish_head(worker, now)
                except (EOFError, OSError):
                    dead = True
                if dead or not worker.process.is_alive():
                    if worker.state in ("starting", "configuring"):
                        start_failures += 1
                    self._drop(worker, pending, failures, "worker died")
                    continue
                if worker.state == "busy" and now > worker.head_started + timeout_s:
                    self._drop(worker, pending, failures, "timeout")
                elif worker.state in ("starting", "configuring") and now > worker.deadline:
                    start_failures += 1
                    self._drop(worker, pending, failures, "start timeout")
            if start_failures > _MAX_START_FAILURES * max(1, len(self.workers)):
                raise _StartFailure("grading workers keep failing to start")
        tick(len(results) + len(failures) - done)
        return results, failures

    def _drop(self, worker: _Worker, pending: collections.deque[int], failures: dict[int, str], why: str) -> None:
        """Kill and replace ``worker``; its current item fails, the items queued behind it go back. A death
        (not a timeout: those are counted in the metadata) is logged with its cause."""
        held = bool(worker.in_flight)
        if worker.in_flight:
            head, _ = worker.in_flight.popleft()
            failures[head] = why
            for index, _ in reversed(worker.in_flight):
                pending.appendleft(index)
            worker.in_flight.clear()
        code = None
        if why == "worker died":
            try:
                worker.process.join(timeout=1.0)  # its end as the OS reports it, before replace() kills it
                code = worker.process.exitcode
            except Exception:  # noqa: BLE001
                pass
        self.replace(worker)
        if why == "worker died":
            say(f"grading: worker {worker.process.pid} died ({_exit_cause(code)}); replaced"
                + ("; its item counts as wrong" if held else "; it held no item"))


def _exit_cause(code: int | None) -> str:
    """How a worker process ended, in words (a negative exit code is the signal that ended it)."""
    if code is None:
        return "its pipe broke"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (", as the out-of-memory killer does" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def close_pool() -> None:
    """Stop the grading worker processes (a later :func:`grade_batch` starts new ones)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
        if pool is not None and pool.owner == os.getpid():
            pool.close()


atexit.register(close_pool)


def _default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes on this machine
    return max(1, min(cores // ranks_here, _DEFAULT_MAX_WORKERS))


def _plan(name: str | None, responses: Sequence[Any], truths: Sequence[Any],
          out: list[dict[str, float] | None]) -> tuple[list[int], dict[int, list[int]]]:
    """What actually needs grading, for the core reward functions (pure, so both shortcuts are exact):

    * an r1_zero response without the ``"</think> <answer>"`` and ``"</answer>"`` tags gets the
      reward function's own answer, all zeros, here (no worker round trip);
    * identical ``(response, ground truth)`` pairs are graded once (GRPO groups repeat responses).

    Fills ``out`` for the first kind; returns the indices to grade and, per graded index, the later
    indices that copy its result. A custom callable is graded item by item, as given.
    """
    if name is None:
        return list(range(len(responses))), {}
    todo: list[int] = []
    first: dict[tuple[str, str, str], int] = {}
    copies: dict[int, list[int]] = {}
    for i, (response, truth) in enumerate(zip(responses, truths)):
        if name == "r1_zero" and _cheap_format_reward(name, response) == 0.0:
            out[i] = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
            continue
        try:
            key = (response if isinstance(response, str) else repr(response), type(truth).__name__, repr(truth))
        except Exception:  # noqa: BLE001 - an object whose repr fails is graded on its own
            todo.append(i)
            continue
        j = first.setdefault(key, i)
        if j == i:
            todo.append(i)
        else:
            copies.setdefault(j, []).append(i)
    return todo, copies


def _grade_here(fn: RewardFn, responses: Sequence[Any], truths: Sequence[Any], fast: bool,
                indices: Sequence[int], out: list[dict[str, float] | None],
                tick: Callable[[int], None] = lambda n: None) -> dict[int, str]:
    """Grade ``indices`` in this process into ``out``; returns the failed ones (index -> ``"error"``)."""
    failures: dict[int, str] = {}
    for i in indices:
        try:
            out[i] = _as_rewards(fn(responses[i], truths[i], fast=fast))
        except Exception:  # noqa: BLE001 - an item whose reward function raises is wrong
            failures[i] = "error"
        tick(1)
    return failures


def grade_batch(
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    reward_fn: str | RewardFn = "r1_zero",
    fast: bool = True,
    timeout_s: float = 5.0,
    num_workers: int | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Grade ``responses`` against ``ground_truths`` in worker processes, in order.

    Under torchrun every rank calls it with the same items: each grades its share (item ``i`` on rank
    ``i mod N``) and every rank gets every reward; the counts in the metadata are summed over ranks.

    Args:
        responses: model completions.
        ground_truths: one ground truth per response (str, int, float or a list of alternatives).
        reward_fn: ``"r1_zero"`` / ``"question_only"`` (see :func:`reward_fn_by_name`) or a
            picklable module-level callable ``fn(response, ground_truth, fast=...) -> dict`` with
            the three reward keys.
        fast: passed to the reward function (False: also math-verify).
        timeout_s: wall-time limit per item; an item past it counts as wrong (answer and reward 0,
            format from the cheap parent-side check, see the module docstring) and its worker is
            replaced.
        num_workers: worker processes; None: one per available core (at most 8); 0: grade in this
            process sequentially, without timeouts.
        progress: show a progress bar (on a terminal) over the items that need grading.

    Returns:
        ``(rewards, metadata)``: ``rewards[i]`` is the float dict for ``responses[i]``; metadata
        holds ``timeouts`` (items past ``timeout_s``), ``errors`` (items whose reward function
        raised or whose worker died), ``format_reward_mean``, ``answer_reward_mean``,
        ``reward_mean``, ``grading_seconds``, ``num_items`` and ``num_workers``, all floats.

    Raises:
        ValueError: different lengths, a non-positive timeout, an unknown reward name, or a
            callable the workers cannot load.
    """
    from shell import world as ranks

    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    kw = dict(reward_fn=reward_fn, fast=fast, timeout_s=timeout_s, num_workers=num_workers, progress=progress)
    if not ranks.active():
        return _grade_batch_here(responses, ground_truths, **kw)
    t0 = time.perf_counter()
    mine = ranks.share(range(len(responses)))
    rewards, meta = _grade_batch_here([responses[i] for i in mine], [ground_truths[i] for i in mine], **kw)
    rewards = ranks.unshare(rewards)
    counts = ranks.sum_over_ranks({k: meta[k] for k in ("timeouts", "errors", "num_workers")})
    return rewards, _metadata(rewards, **counts, seconds=time.perf_counter() - t0)


def _metadata(rewards: Sequence[dict[str, float]], *, timeouts: float, errors: float, num_workers: float,
              seconds: float) -> dict[str, float]:
    n = len(rewards)

    def mean(key: str) -> float:
        return sum(r[key] for r in rewards) / n if n else 0.0

    return {
        "timeouts": float(timeouts),
        "errors": float(errors),
        "format_reward_mean": mean("format_reward"),
        "answer_reward_mean": mean("answer_reward"),
        "reward_mean": mean("reward"),
        "grading_seconds": seconds,
        "num_items": float(n),
        "num_workers": float(num_workers),
    }


def _grade_batch_here(
    responses: Sequence[str], ground_truths: Sequence[Any], *, reward_fn: str | RewardFn, fast: bool, timeout_s: float,
    num_workers: int | None, progress: bool,
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """:func:`grade_batch` of all the items in this process (and its workers)."""
    t0 = time.perf_counter()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    name = _canonical_name(reward_fn)
    fn = reward_fn_by_name(reward_fn) if isinstance(reward_fn, str) else reward_fn
    n = len(responses)
    workers = _default_workers() if num_workers is None else max(0, int(num_workers))
    out: list[dict[str, float] | None] = [None] * n
    todo, copies = _plan(name, responses, ground_truths, out)
    failures: dict[int, str] = {}  # graded index -> why it failed ("timeout", or an error)
    bar = progress_bar(total=len(todo), desc="grading", unit="item", enabled=progress and bool(todo))
    if todo and workers == 0:
        failures = _grade_here(fn, responses, ground_truths, fast, todo, out, bar.update)
    elif todo:
        try:
            payload: Any = name if name is not None else pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - lambdas, closures, bound local objects
            raise ValueError(
                f"reward_fn {fn!r} cannot be sent to worker processes ({exc}); pass a module-level "
                "function or use num_workers=0"
            ) from exc
        messages = [pickle.dumps(("item", i, responses[i], ground_truths[i])) for i in todo]
        results, pool_failures = _run_in_pool(messages, payload, fast, timeout_s, workers, bar.update)
        if results is None:  # no pool could be started here: grade in this process
            failures = _grade_here(fn, responses, ground_truths, fast, todo, out, bar.update)
        else:
            for i, rewards in results.items():
                out[i] = rewards
            failures = pool_failures
    bar.close()
    for i in failures:
        out[i] = _failed(name, responses[i])
    for i, dups in copies.items():
        for j in dups:
            out[j] = dict(out[i]) if out[i] is not None else None
    # A failed item counts once for itself and once for each repeat that copied its result.
    timeouts = sum(1 + len(copies.get(i, ())) for i, why in failures.items() if why == "timeout")
    errors = sum(1 + len(copies.get(i, ())) for i, why in failures.items() if why != "timeout")
    rewards = [r if r is not None else _failed(name, responses[i]) for i, r in enumerate(out)]
    return rewards, _metadata(rewards, timeouts=timeouts, errors=errors, num_workers=workers,
                              seconds=time.perf_counter() - t0)


def _run_in_pool(
    messages: list[bytes], payload: Any, fast: bool, timeout_s: float, workers: int, tick: Callable[[int], None]
) -> tuple[dict[int, dict[str, float]], dict[int, str]] | tuple[None, None]:
    global _POOL
    with _POOL_LOCK:
        try:
            if _POOL is None or _POOL.owner != os.getpid():
                _POOL = _Pool()  # a pool inherited through fork belongs to the parent: leave it
            _POOL.resize(workers)
        except Exception:  # noqa: BLE001 - e.g. inside a daemonic process: no children allowed
            return None, None
        try:
            return _POOL.run(messages, payload, fast, timeout_s, tick)
        except _StartFailure:
            _POOL.close(graceful=False)
            _POOL = None
            return None, None
        except BaseException:
            # a batch cut short (bad callable, KeyboardInterrupt) leaves workers mid-item
            _POOL.close(graceful=False)
            _POOL = None
            raise
