"""LoRA fine-tuning through ``peft``: ``--lora.rank r`` (0: off, every weight trains) in every training loop.

A loaded policy is wrapped in place (:func:`apply_lora`): peft replaces each targeted projection with a
``lora.Linear`` that holds the frozen base weight and a trainable pair ``A`` (r × in), ``B`` (out × r), and the
policy object stays the same transformers model (its forward, config, KV cache and activation checkpointing as
before), so the loops, the compiled steps and the shared prompt prefix need nothing new. Only the adapter
parameters require grad, so AdamW (which takes the parameters that require grad) holds only theirs.

What a LoRA run keeps where:

* checkpoints: the adapter (``adapter/``, peft's format) and its optimizer state, not the frozen base
  (:func:`save_adapter`, :func:`load_adapter`);
* ``final/``: a merged Hugging Face folder (``W + (alpha / r) B A`` for every targeted projection) that
  ``shell.evaluate`` and vLLM load as is, with the adapter beside it in ``final/adapter/`` (:func:`save_merged`);
* the sampler: the merged weights at each sync (:func:`merged_state_dict`; the HF sampler's generation copy and
  vLLM's engine are plain models);
* the KL reference: the frozen base, i.e. the policy with its adapter switched off (:func:`adapter_disabled`),
  no second copy of the model.

Under torchrun (FSDP2) LoRA is refused before anything loads (:meth:`LoraConfig.check`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shell.checkpoint import WeightFiles
from shell.config import at_least, flag, require
from shell.progress import say
from shell.sampling.weights import lora_layers, merged_state_dict

__all__ = ["ADAPTER_DIR", "LoraConfig", "adapter_disabled", "apply_lora", "is_lora", "load_adapter", "lora_layers",
           "merged_state_dict", "parameter_counts", "save_adapter", "save_merged"]

ADAPTER_DIR = "adapter"
"""The adapter's folder inside a checkpoint and inside ``final/``."""

ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of Llama/Qwen-style decoders (SmolLM2, Qwen2.5)."""

_UNTARGETABLE = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (peft) on the policy's projections instead of training every weight."""

    rank: int = 0
    """LoRA rank r (0: off, full fine-tuning of every weight)."""
    alpha: float = 32.0
    """LoRA alpha: the update is (alpha / r) B A (a fixed alpha with the 1/r scaling keeps the best learning
    rate nearly independent of r, "LoRA without regret")."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: tuple[str, ...] = ATTENTION_AND_MLP
    """Module names that get an adapter (matched by name suffix): by default the attention and MLP projections."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self, prefix: str = "lora") -> None:
        at_least(self.rank, 0, flag(prefix, "rank"))
        if not self.enabled:
            return
        require(self.alpha > 0, f"{flag(prefix, 'alpha')} must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"{flag(prefix, 'dropout')} must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) > 0, f"{flag(prefix, 'target_modules')} must name at least one module")
        bad = [m for m in self.target_modules if m.split(".")[-1] in _UNTARGETABLE]
        require(not bad, f"{flag(prefix, 'target_modules')}: {', '.join(bad)} cannot take an adapter here (the tied "
                         f"embeddings would differ between the policy and its merged copy); target projections")
        from shell.world import launched_world_size

        require(launched_world_size() == 1,
                f"{flag(prefix, 'rank')} {self.rank}: LoRA is not supported under torchrun (FSDP2) yet; run one "
                f"process (python -m ...), or train every weight with {flag(prefix, 'rank')} 0")

    def peft(self) -> Any:
        """The equivalent ``peft.LoraConfig``."""
        import peft

        return peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------- wrapping


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, *, prefix: str = "lora") -> torch.nn.Module:
    """``model`` with LoRA adapters injected in place (``peft.get_peft_model``; the same object is returned, so
    a sampler that samples with the policy itself runs the adapter); ``model`` unchanged when ``cfg.rank`` is 0.
    Only the adapters require grad afterwards. ``ValueError`` naming the flag when no module matches."""
    if not cfg.enabled:
        return model
    import peft

    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = peft.get_peft_model(model, cfg.peft())
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"{flag(prefix, 'target_modules')} {' '.join(cfg.target_modules)}: {e} (the model's linear "
                         f"layers: {', '.join(names)})") from None
    inner = wrapped.base_model.model
    assert inner is model, "peft wraps in place"
    counts = parameter_counts(inner)
    say(f"LoRA rank {cfg.rank} (alpha {cfg.alpha:g}) on {', '.join(cfg.target_modules)}: "
        f"{counts['train/trainable_params']:,} of {counts['train/total_params']:,} parameters train")
    return inner


def is_lora(model: torch.nn.Module) -> bool:
    """Does ``model`` carry LoRA adapters (:func:`apply_lora`)?"""
    return bool(lora_layers(model))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``train/trainable_params`` (what AdamW updates) and ``train/total_params`` (adapters included)."""
    params = list(model.parameters())
    return {"train/trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "train/total_params": sum(p.numel() for p in params)}


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block ``model`` is its frozen base: every adapter layer switched off (what peft's
    ``PeftModel.disable_adapter`` does, on the model itself), switched back on afterwards."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# ---------------------------------------------------------------------------------------------- files


def save_adapter(model: torch.nn.Module, folder: Path | str) -> Path:
    """The adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``: what
    ``PeftModel.from_pretrained`` and a vLLM ``LoRARequest`` read) in ``folder``."""
    import peft
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"]
    config.save_pretrained(str(folder))
    state = peft.get_peft_model_state_dict(model)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return folder


def load_adapter(model: torch.nn.Module, folder: Path | str) -> None:
    """Copy the adapter saved by :func:`save_adapter` in ``folder`` into ``model``'s adapters, in place;
    ``RuntimeError`` naming the folder when it does not fit (another rank or target modules)."""
    import peft
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter weights (a LoRA checkpoint holds {ADAPTER_DIR}/)")
    saved = json.loads((folder / "adapter_config.json").read_text())
    config = model.peft_config["default"]
    if saved.get("r") != config.r or sorted(saved.get("target_modules") or []) != sorted(config.target_modules):
        raise RuntimeError(f"{folder}: adapter of rank {saved.get('r')} on {saved.get('target_modules')}, the model's is "
                           f"rank {config.r} on {sorted(config.target_modules)}")
    state = load_file(str(path))
    expected = set(peft.get_peft_model_state_dict(model))
    if set(state) != expected:
        raise RuntimeError(f"{folder}: adapter tensors do not match the model's (missing {sorted(expected - set(state))[:3]}, "
                           f"unexpected {sorted(set(state) - expected)[:3]})")
    result = peft.set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"{folder}: unexpected adapter tensors {unexpected[:3]}")


def save_merged(model: torch.nn.Module, tokenizer: Any, folder: Path | str) -> Path:
    """A plain Hugging Face folder of the merged model (config, ``model.safetensors`` with ``lm_head.weight``,
    tokenizer), loadable by ``shell.evaluate`` and vLLM as is, with the adapter in ``folder/adapter/``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(model)
    model.save_pretrained(str(folder), state_dict={k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    for stray in ("adapter_config.json", "adapter_model.safetensors"):  # a peft-aware save_pretrained's files
        (folder / stray).unlink(missing_ok=True)
    weights = folder / "model.safetensors"
    if weights.is_file():  # lm_head.weight written out even when tied (what vLLM's weight reload expects)
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys} if "lm_head.weight" not in keys else None
        if tensors is not None:
            from shell.models import full_state_dict

            dtype = next(iter(tensors.values())).dtype
            tensors["lm_head.weight"] = full_state_dict(model)["lm_head.weight"].detach().to("cpu", dtype).clone().contiguous()
            save_file(tensors, str(weights), metadata={"format": "pt"})
    save_adapter(model, folder / ADAPTER_DIR)
    return folder


def adapter_files(model: torch.nn.Module, tokenizer: Any) -> WeightFiles | None:
    """How a LoRA policy's checkpoints hold it: the adapter alone in ``<checkpoint>/adapter/`` (the frozen base
    is not saved), ``final/`` merged with the adapter beside it (:func:`save_merged`); None for a policy without
    adapters (its checkpoints hold every weight)."""
    if not is_lora(model):
        return None
    return WeightFiles(save=lambda folder: save_adapter(model, folder / ADAPTER_DIR),
                       load=lambda folder: load_adapter(model, folder / ADAPTER_DIR),
                       final=lambda folder: save_merged(model, tokenizer, folder))
