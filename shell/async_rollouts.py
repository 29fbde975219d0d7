"""Asynchronous rollouts (``--async-staleness K``): a producer thread makes the rollout batches of steps
t+1 … t+K while the policy trains on step t, through a bounded hand-over; the trainer pushes its weights into
the sampler between the producer's batches, never during one. It imports nothing from ``shell``.

Versions. A *policy version* is the number of GRPO steps whose updates a set of weights holds: 0 is the policy
as RL starts (after any warm start), a run resumed from step c starts at version c. Step t trains the weights of
version t − 1. The batch of step t carries the version v of the sampler's weights that drew it, and its
*staleness* is (t − 1) − v, which :meth:`RolloutProducer.take` holds to 0 … K (a ``RuntimeError`` otherwise: a bug).

The producer makes the batches in step order (so questions, curricula and seeds follow step order as in the
synchronous loop). Before the batch of step s it waits until the sampler holds version ≥ s − 1 − K, which is
what keeps it at most K batches ahead of training; then, holding the sampler, it makes the batch with the
weights the sampler has (the newest pushed). The trainer, after its step t, pushes version t
(:meth:`RolloutProducer.publish`: it waits for the producer's batch in flight to end, then copies, and may
evaluate the new weights while it still holds the sampler).

Times (seconds, per batch / step):

* ``wait_for_weights``: the producer's idle time before the batch: from the end of its previous batch (or its
  start) until it begins this one (waiting for the weights the bound needs, or for the trainer holding the
  sampler to push weights or evaluate).
* ``wait_for_rollouts``: the trainer blocked on the hand-over for this step's batch.
* ``weight_sync``: the trainer's push after a step: waiting for the batch in flight to end, plus the copy.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Produced", "RolloutProducer"]

T = TypeVar("T")


@dataclass(frozen=True)
class Produced(Generic[T]):
    """A batch from the producer: the step it is for, the version of the weights that drew it, what
    ``produce(step)`` returned, the producer's idle time before it and the seconds it took to make."""

    step: int
    version: int
    value: T
    wait_for_weights: float
    seconds: float


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class RolloutProducer(Generic[T]):
    """A background thread calling ``produce(s)`` for s = ``first_step`` … ``last_step``, in order, at most
    ``staleness`` versions ahead of the trainer (see the module). ``version``: the version of the weights the
    sampler holds as it starts (the step the run starts after). Use as a context manager: entering starts the
    thread, leaving stops it after the batch in flight (which is dropped) and joins it.

    ``produce`` runs in the producer's thread, with the sampler held (after ``on_start()``, once); an exception
    either raises is raised again by the trainer's next :meth:`take`."""

    def __init__(self, produce: Callable[[int], T], *, staleness: int, first_step: int, last_step: int,
                 version: int, on_start: Callable[[], object] | None = None) -> None:
        if staleness < 1:
            raise ValueError(f"a producer needs staleness >= 1, got {staleness} (0 is the synchronous loop)")
        self.staleness = staleness
        self.produce = produce
        self.on_start = on_start
        """Called first in the producer's thread (e.g. its own torch thread count)."""
        self.first_step, self.last_step = first_step, last_step
        self.version = version
        """The version of the weights the sampler holds (changed only with the sampler held)."""
        self.sampler = threading.Lock()
        """Held while a batch is made, while the trainer pushes weights and while it evaluates."""
        self.changed = threading.Condition()
        self.stopping = False
        self.handover: queue.Queue[Produced[T] | _Failed] = queue.Queue(maxsize=staleness + 1)
        """At most K + 1 batches: the bound lets the producer finish the batch of t + 1 + K once version t is
        pushed, before the trainer has taken the batch of t + 1."""
        self.thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def __enter__(self) -> RolloutProducer[T]:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop after the batch in flight (it is dropped) and join the thread."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    # ------------------------------------------------------------------------------------------ the producer

    def _run(self) -> None:
        idle_since = time.monotonic()
        try:
            if self.on_start is not None:
                self.on_start()
            for step in range(self.first_step, self.last_step + 1):
                with self.changed:  # the bound: the batch of `step` needs weights of version >= step - 1 - K
                    while not self.stopping and self.version < step - 1 - self.staleness:
                        self.changed.wait()
                if self.stopping:
                    return
                with self.sampler:
                    if self.stopping:
                        return
                    version, began = self.version, time.monotonic()
                    value = self.produce(step)
                    done = time.monotonic()
                if not self._put(Produced(step, version, value, began - idle_since, done - began)):
                    return
                idle_since = done
        except BaseException as error:  # noqa: BLE001 - handed to the trainer, which raises it
            self._put(_Failed(error))

    def _put(self, item: Produced[T] | _Failed) -> bool:
        while not self.stopping:
            try:
                self.handover.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------------------------------ the trainer

    def take(self, step: int) -> tuple[Produced[T], float]:
        """The batch of ``step`` and the seconds the trainer waited for it (``wait_for_rollouts``). Raises what
        ``produce`` raised; ``RuntimeError`` when the batch is for another step or more than K versions old."""
        began = time.monotonic()
        item = self.handover.get()
        waited = time.monotonic() - began
        if isinstance(item, _Failed):
            raise item.error
        if item.step != step:
            raise RuntimeError(f"asynchronous rollouts: the trainer wants step {step}'s batch, the producer gave {item.step}'s")
        staleness = (step - 1) - item.version
        if not 0 <= staleness <= self.staleness:
            raise RuntimeError(f"asynchronous rollouts: step {step}'s batch was drawn by version {item.version}, "
                               f"{staleness} versions before the trainer's {step - 1} (the bound is {self.staleness})")
        return item, waited

    def publish(self, version: int, load: Callable[[], object], *,
                then: Callable[[float], object] | None = None) -> float:
        """Push the trainer's weights of ``version`` into the sampler: wait for the producer's batch in flight to
        end, call ``load()`` (the copy), then ``then(seconds)`` with the sampler still held (e.g. log the step and
        evaluate these weights), and let the producer go on. Returns the seconds until the copy was done
        (``weight_sync``: the wait and the copy)."""
        began = time.monotonic()
        with self.sampler:
            load()
            took = time.monotonic() - began
            with self.changed:
                self.version = version
                self.changed.notify_all()
            if then is not None:
                then(took)
        return took

