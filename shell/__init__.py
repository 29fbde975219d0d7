"""reasoning-rl's imperative shell: train steps, samplers, loops, logging and checkpoints.

Importing ``shell`` imports neither vllm nor wandb; entry points are ``python -m shell.<name>``
(``evaluate``, ``sft``, ``expert_iteration``, ``grpo``, ``report``, ``make_sft_data``), each a thin loop
on the shared pieces: :mod:`shell.loop` (the run skeleton), :mod:`shell.rollout`, :mod:`shell.update`,
:mod:`shell.evaluation`, :mod:`shell.sampling`, :mod:`shell.data`.
"""

from shell.steps import grpo_microbatch_train_step
from shell.steps import make_train_step
from shell.steps import sft_microbatch_train_step

__all__ = [
    "grpo_microbatch_train_step",
    "make_train_step",
    "sft_microbatch_train_step",
]
