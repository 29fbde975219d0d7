"""reasoning-rl's imperative shell: train steps, samplers, loops, logging and checkpoints.

Importing ``shell`` imports neither vllm nor wandb; entry points are ``python -m shell.<name>``.
"""

from shell._steps import grpo_microbatch_train_step
from shell._steps import make_train_step
from shell._steps import sft_microbatch_train_step

__all__ = [
    "grpo_microbatch_train_step",
    "make_train_step",
    "sft_microbatch_train_step",
]
