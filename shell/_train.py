"""Pieces shared by the training loops: batching, the policy forward (with an optional shared
prompt prefix), optimizer, autocast, evaluation with weight sync, and curves."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core import get_response_log_probs, tokenize_prompt_and_output


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the optimizer step."""

    lr: float = 1e-5
    """Learning rate (constant after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    compile: bool = False
    """torch.compile the microbatch forward + loss."""
    autocast_bf16: bool = True
    """bf16 autocast with float32 master weights (GPU and CPUs with bf16 support)."""
    share_prompt_prefix: bool = False
    """CPU speed-up: run the prompt prefix common to the whole microbatch (e.g. the r1_zero
    boilerplate) once, without gradient, and train on the rest. Drops only the gradient paths
    through that shared prefix's keys and values."""
    checkpoint_above_tokens: int | None = 4096
    """Activation checkpointing for a microbatch of more than this many (padded) tokens: each layer
    is recomputed in backward instead of keeping its activations (SmolLM2, 8 × 2,000 tokens: 20.7 GB
    peak without, 7.8 GB with, no slower on a 2-core CPU). Such a microbatch does not share its prompt
    prefix. 0: always; None: never."""


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2), fused=None,
    )
    warm = max(0, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def autocast(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    device = next(model.parameters()).device.type
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def batch_indices(n: int, batch_size: int, step: int, *, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: epochs of seeded permutations, a pure function of
    ``(n, batch_size, step, seed)`` so a resumed run sees exactly the batches it would have seen."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


class _WithPrefix(torch.nn.Module):
    """Runs ``model`` on the suffix of a batch after a precomputed (no-grad) prefix KV cache."""

    def __init__(self, model: torch.nn.Module, prefix_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.prefix_ids = prefix_ids

    def forward(self, input_ids: torch.Tensor) -> Any:
        from shell.sampling import _cache_kwarg

        kw = _cache_kwarg(self.model)
        with torch.no_grad():
            out = self.model(self.prefix_ids, use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(input_ids.shape[0])
        p = self.prefix_ids.shape[1]
        positions = torch.arange(p, p + input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return self.model(input_ids, position_ids=positions, use_cache=True, **{kw: cache})


def tokenize_batch(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """``tokenize_prompt_and_output`` on ``device`` plus the length of the prompt prefix shared by
    the whole batch that may be precomputed (``prefix_len``, never covering a response label)."""
    batch = tokenize_prompt_and_output(list(prompts), list(responses), tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    prefix = min(common_prefix_len(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    out = {k: v.to(device) for k, v in batch.items()}
    out["prefix_len"] = max(0, prefix)
    return out


@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool):
    """Within the block, ``model`` (a transformers model) recomputes each layer's activations in backward."""
    if not enabled:
        yield
        return
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    try:
        yield
    finally:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def policy_log_probs(
    model: torch.nn.Module, batch: dict[str, Any], *, share_prompt_prefix: bool, return_token_entropy: bool = False,
    checkpoint_above_tokens: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Log-probs (and entropy) of ``batch['labels']``; with a shared prefix, only of the positions after it.

    A training forward of more than ``checkpoint_above_tokens`` (padded) tokens runs with activation
    checkpointing and without prefix sharing. Returns ``(outputs, response_mask, start)``: ``outputs``
    and ``response_mask`` cover positions ``start:`` of the batch (``start`` = 0 without prefix sharing).
    """
    checkpoint = (
        checkpoint_above_tokens is not None and batch["input_ids"].numel() > checkpoint_above_tokens
        and model.training and torch.is_grad_enabled() and getattr(model, "supports_gradient_checkpointing", False)
    )
    p = batch["prefix_len"] if share_prompt_prefix and batch["input_ids"].shape[0] > 1 and not checkpoint else 0
    if p < 2:
        with activation_checkpointing(model, checkpoint):
            out = get_response_log_probs(model, batch["input_ids"], batch["labels"], return_token_entropy)
        return out, batch["response_mask"], 0
    wrapped = _WithPrefix(model, batch["input_ids"][:1, :p])
    out = get_response_log_probs(wrapped, batch["input_ids"][:, p:], batch["labels"][:, p:], return_token_entropy)
    return out, batch["response_mask"][:, p:], p


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float) -> float:
    """Clip the global gradient norm, take the optimizer step, zero the gradients; returns the pre-clip norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def finite_or_raise(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}: training diverged (lower the learning rate)")
    return value


def write_curves(run_dir: Path, *, extra_panels: Sequence[tuple[str, str]] = ()) -> Path:
    from shell.runlog import plot_curves

    panels = [("train/loss", "train_step"), ("eval/answer_reward", "eval_step"), ("eval/format_reward", "eval_step"), *extra_panels]
    return plot_curves([run_dir], run_dir / "curves.png", panels=panels)


def restore_or_refuse(run_dir: Path, *, resume: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Any) -> tuple[int, float]:
    """With ``resume``: load the run's last checkpoint (weights, optimizer, scheduler, RNG) and return
    ``(step, elapsed seconds)``; without: refuse to overwrite a run that has checkpoints. ``(0, 0.0)``
    when starting fresh."""
    from shell.checkpoint import load_latest_checkpoint

    if not resume:
        if run_dir.exists() and any((run_dir / "checkpoints").glob("step_*")):
            raise SystemExit(f"{run_dir} already holds checkpoints: pass --resume to continue it or choose another --run.name")
        return 0, 0.0
    ckpt = load_latest_checkpoint(run_dir, model=model, optimizer=optimizer)
    if ckpt is None:
        print(f"--resume: no checkpoint in {run_dir}; starting from scratch")
        return 0, 0.0
    scheduler.load_state_dict(ckpt.state["extra"]["scheduler"])
    print(f"resumed from {ckpt.path} (step {ckpt.step})")
    return ckpt.step, float(ckpt.state["extra"].get("elapsed", 0.0))
