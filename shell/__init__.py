"""reasoning-rl's imperative shell: train steps, samplers, loops, logging and checkpoints.

Importing ``shell`` imports neither vllm nor wandb; entry points are ``python -m shell.<name>``
(``evaluate``, ``sft``, ``expert_iteration``, ``grpo``, ``report``, ``make_sft_data``), each a thin loop
on the shared pieces: :mod:`shell.loop` (the run skeleton), :mod:`shell.rollout`, :mod:`shell.update`,
:mod:`shell.evaluation`, :mod:`shell.sampling`, :mod:`shell.data`.

Threads: unless ``REASONING_RL_OMP_DEFAULTS=1``, importing ``shell`` before torch sets
``OMP_WAIT_POLICY=PASSIVE`` (when unset): OpenMP threads that wait sleep instead of spinning, so a run
that shares the CPU with another job slows down gracefully instead of both spinning against each
other (measured in ``benchmarks/README.md``). ``REASONING_RL_THREADS=N`` sets torch's thread count.
"""

import os

if not os.environ.get("REASONING_RL_OMP_DEFAULTS"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from shell.steps import grpo_microbatch_train_step  # noqa: E402  (after the thread settings, before torch starts them)
from shell.steps import make_train_step  # noqa: E402
from shell.steps import sft_microbatch_train_step  # noqa: E402

if os.environ.get("REASONING_RL_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["REASONING_RL_THREADS"]))

__all__ = [
    "grpo_microbatch_train_step",
    "make_train_step",
    "sft_microbatch_train_step",
]
