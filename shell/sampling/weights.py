"""The weights a sampler gets from a policy: its plain (transformers) state dict, with a LoRA policy's adapters
merged in (:mod:`shell.lora`), so that a generation copy or a vLLM engine stays a plain model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["lora_layers", "merged_state_dict"]


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """The model's peft LoRA layers by module name (empty for a model without adapters)."""
    if not getattr(model, "peft_config", None):
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    r"""The plain (transformers) state dict of ``model`` with every adapter merged in:

    .. math::  W' = W + \frac{\alpha}{r}\, B A \qquad (B: \text{out} \times r,\; A: r \times \text{in})

    for each targeted projection (peft's ``get_delta_weight``), the other tensors by reference and the adapter
    tensors left out; names as the model had them before :func:`shell.lora.apply_lora` (``_orig_mod.`` of a compiled module
    dropped). A model without adapters: its ``state_dict()``. Detached; the model is not changed."""
    state = {name.replace("_orig_mod.", ""): t for name, t in model.state_dict().items()}
    layers = lora_layers(model)
    if not layers:
        return state
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor.detach()
    with torch.no_grad():
        for name, layer in layers.items():
            name = name.replace("_orig_mod.", "")
            base = layer.get_base_layer().weight
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            out[f"{name}.weight"] = (base + delta.to(base.dtype)).detach()
    return out
