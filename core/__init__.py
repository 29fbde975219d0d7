"""reasoning-rl's functional core: pure tensor functions and pure grading.

Nothing here does I/O, holds global state, or imports ``shell``, wandb or vllm.
"""

from core._advantages import AdvantageEstimator
from core._advantages import compute_group_normalized_rewards
from core._advantages import compute_rloo_advantages
from core._advantages import group_normalized_advantages
from core._advantages import nonconstant_group_mask
from core._advantages import normalize_group_rewards
from core._advantages import overlong_penalty
from core._advantages import reward_statistics
from core._grading import extract_boxed
from core._grading import extract_r1_zero_answer
from core._grading import grade_answer
from core._grading import normalize_answer
from core._grading import question_only_reward_fn
from core._grading import r1_zero_reward_fn
from core._logprobs import compute_entropy
from core._logprobs import get_response_log_probs
from core._logprobs import label_log_probs
from core._losses import LENGTH_NORMALIZATIONS
from core._losses import LOSS_TYPES
from core._losses import LengthNormalization
from core._losses import LossType
from core._losses import compute_cispo_loss
from core._losses import compute_grpo_clip_loss
from core._losses import compute_gspo_loss
from core._losses import compute_kl_penalty
from core._losses import compute_naive_policy_gradient_loss
from core._losses import compute_policy_gradient_loss
from core._losses import sft_microbatch_loss
from core._losses import truncated_importance_weights
from core._masking import masked_mean
from core._masking import masked_normalize
from core._objective import ObjectiveInputs
from core._objective import ObjectiveSettings
from core._objective import POLICY_LOSS_TYPES
from core._objective import PolicyLossType
from core._objective import RATIO_LOSS_TYPES
from core._objective import grpo_microbatch_loss
from core._objective import policy_gradient_objective
from core._objective import sampler_mismatch
from core._statistics import bootstrap_ci
from core._statistics import majority_vote
from core._statistics import paired_bootstrap_ci
from core._statistics import pass_at_k
from core._tokenize import tokenize_prompt_and_output

__all__ = [
    "AdvantageEstimator",
    "LENGTH_NORMALIZATIONS",
    "LOSS_TYPES",
    "LengthNormalization",
    "LossType",
    "ObjectiveInputs",
    "ObjectiveSettings",
    "POLICY_LOSS_TYPES",
    "PolicyLossType",
    "RATIO_LOSS_TYPES",
    "bootstrap_ci",
    "compute_cispo_loss",
    "compute_entropy",
    "compute_group_normalized_rewards",
    "compute_grpo_clip_loss",
    "compute_gspo_loss",
    "compute_kl_penalty",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "compute_rloo_advantages",
    "extract_boxed",
    "extract_r1_zero_answer",
    "get_response_log_probs",
    "grade_answer",
    "group_normalized_advantages",
    "grpo_microbatch_loss",
    "label_log_probs",
    "majority_vote",
    "masked_mean",
    "masked_normalize",
    "nonconstant_group_mask",
    "normalize_answer",
    "normalize_group_rewards",
    "overlong_penalty",
    "paired_bootstrap_ci",
    "pass_at_k",
    "policy_gradient_objective",
    "question_only_reward_fn",
    "r1_zero_reward_fn",
    "reward_statistics",
    "sampler_mismatch",
    "sft_microbatch_loss",
    "tokenize_prompt_and_output",
    "truncated_importance_weights",
]
