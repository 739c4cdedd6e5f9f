"""mlx_persona.sampling against its oracle, transformers + torch (CPU).

* ``process_logits`` vs a ``LogitsProcessorList`` of transformers' own processors/warpers,
  each alone and combined (parametrised seeds plus a derandomised hypothesis search).
* The order and construction ``generate`` uses: a tiny random GPT-2 is run through
  ``model.generate(..., output_logits=True, output_scores=True)``; for every step, our
  ``process_logits`` on the raw logits must equal ``log_softmax`` of the scores generate drew from
  (its chain is built by ``GenerationMixin._get_logits_processor``, whose class order is also
  checked).
* The ``(sampler, processors)`` pair driven by the real ``mlx_lm.generate.generate_step`` (with a
  table-lookup stand-in for a model) gives the same log-probabilities as ``process_logits``.
* Seeded sampling is reproducible and its empirical distribution matches the processed
  probabilities.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from transformers import GenerationConfig as HFGenerationConfig
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_persona.sampling import (
    PRESETS,
    GenerationConfig,
    HFLogitsProcessor,
    HFSampler,
    make_sampler_and_processors,
    preset,
    process_logits,
)

# --------------------------------------------------------------------------------------------
# Oracle and helpers
# --------------------------------------------------------------------------------------------


def hf_chain(cfg: GenerationConfig, prompt_length: int, eos_ids) -> LogitsProcessorList:
    """transformers' chain, built with the constructors and conditions of
    ``GenerationMixin._get_logits_processor`` (transformers 5.x), for our settings."""
    chain = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.min_new_tokens > 0 and eos_ids:
        chain.append(
            MinNewTokensLengthLogitsProcessor(prompt_length, cfg.min_new_tokens, list(eos_ids))
        )
    if cfg.temperature > 0:  # do_sample=True: the warpers
        if cfg.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(cfg.temperature)))
        if cfg.top_k != 0:
            chain.append(TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
        if cfg.top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
        if cfg.min_p > 0:
            chain.append(MinPLogitsWarper(min_p=cfg.min_p, min_tokens_to_keep=1))
    return chain


def hf_logprobs(cfg, tokens, logits, prompt_length, eos_ids) -> np.ndarray:
    scores = hf_chain(cfg, prompt_length, eos_ids)(
        torch.tensor([list(tokens)], dtype=torch.long),
        torch.tensor(logits[None], dtype=torch.float32),
    )
    return torch.log_softmax(scores, dim=-1)[0].numpy()


def ours(cfg, tokens, logits, prompt_length, eos_ids) -> np.ndarray:
    out = process_logits(
        cfg, tokens, mx.array(logits), prompt_length=prompt_length, eos_token_ids=eos_ids
    )
    return np.array(out)


def assert_same_logprobs(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert not np.isnan(actual).any() and not np.isnan(expected).any()
    inf_a, inf_e = np.isneginf(actual), np.isneginf(expected)
    assert np.array_equal(inf_a, inf_e), (
        f"-inf differs at ids {np.flatnonzero(inf_a != inf_e).tolist()} "
        f"(ours -inf: {inf_a.sum()}, transformers -inf: {inf_e.sum()})"
    )
    np.testing.assert_allclose(actual[~inf_a], expected[~inf_e], rtol=0, atol=atol)


def random_case(seed: int):
    """Random vocab (50-300), logits of both signs, and a history with repeats and n-grams."""
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(50, 301))
    logits = rng.normal(size=vocab) * rng.uniform(0.5, 6.0) + rng.uniform(-3, 3)
    logits = logits.astype(np.float32)
    length = int(rng.integers(1, 60))
    # Half the tokens from a small alphabet so that repeats and repeated n-grams occur.
    small = rng.integers(0, vocab, size=6)
    from_small = rng.random(length) < 0.5
    tokens = np.where(
        from_small, rng.choice(small, size=length), rng.integers(0, vocab, size=length)
    ).tolist()
    prompt_length = int(rng.integers(0, length + 1))
    eos_ids = sorted(set(int(i) for i in rng.choice(vocab, size=2, replace=False)))
    # Put the end ids and history tokens among the likely ones sometimes.
    if rng.random() < 0.5:
        logits[eos_ids] += 3.0
    return vocab, logits, tokens, prompt_length, eos_ids


def compare(cfg, seed):
    vocab, logits, tokens, prompt_length, eos_ids = random_case(seed)
    assert_same_logprobs(
        ours(cfg, tokens, logits, prompt_length, eos_ids),
        hf_logprobs(cfg, tokens, logits, prompt_length, eos_ids),
    )


SEEDS = range(6)

# --------------------------------------------------------------------------------------------
# process_logits vs transformers: each step alone
# --------------------------------------------------------------------------------------------

SINGLE = {
    "repetition_penalty>1": dict(repetition_penalty=1.3),
    "repetition_penalty<1": dict(repetition_penalty=0.7),
    "repetition_penalty_greedy": dict(repetition_penalty=1.5, temperature=0.0),
    "ngram1": dict(no_repeat_ngram_size=1),
    "ngram2": dict(no_repeat_ngram_size=2),
    "ngram3": dict(no_repeat_ngram_size=3, temperature=0.0),
    "temperature0.6": dict(temperature=0.6),
    "temperature1.7": dict(temperature=1.7),
    "top_k1": dict(top_k=1),
    "top_k7": dict(top_k=7),
    "top_k49": dict(top_k=49),  # vocab - 1 for the smallest vocab
    "top_k300": dict(top_k=300),  # >= vocab: a no-op
    "top_k1000": dict(top_k=1000),  # larger than any vocab here
    "top_p1e-6": dict(top_p=1e-6),  # keeps only the top token (min_tokens_to_keep)
    "top_p1e-9": dict(top_p=1e-9),  # 1 - top_p == 1.0 in float32: min_tokens_to_keep decides
    "top_k5_top_p1e-9": dict(top_k=5, top_p=1e-9),
    "top_p0.3": dict(top_p=0.3),
    "top_p0.9": dict(top_p=0.9),
    "top_p0.999": dict(top_p=0.999),
    "top_p1": dict(top_p=1.0),
    "min_p0.05": dict(min_p=0.05),
    "min_p0.3": dict(min_p=0.3, temperature=0.7),
    "min_p1": dict(min_p=1.0),
    "greedy": dict(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2),  # warpers ignored
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(SINGLE))
def test_single_step_matches_transformers(name, seed):
    compare(GenerationConfig(**SINGLE[name]), seed)


@pytest.mark.parametrize("n_new", [0, 1, 4, 5, 6, 9])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_min_new_tokens_bans_every_end_id_until_threshold(n_new, temperature):
    rng = np.random.default_rng(n_new)
    vocab, prompt_len = 64, 7
    logits = rng.normal(size=vocab).astype(np.float32) * 3
    eos_ids = [1, 50]  # e.g. Gemma's <eos> and <end_of_turn>
    logits[eos_ids] = [8.0, 9.0]  # the most likely tokens
    tokens = rng.integers(2, vocab, size=prompt_len + n_new).tolist()
    cfg = GenerationConfig(min_new_tokens=5, temperature=temperature)
    got = ours(cfg, tokens, logits, prompt_len, eos_ids)
    assert_same_logprobs(got, hf_logprobs(cfg, tokens, logits, prompt_len, eos_ids))
    banned = n_new < 5
    assert np.isneginf(got[eos_ids]).tolist() == [banned, banned]
    assert np.isneginf(got).sum() == (2 if banned else 0)


def test_min_new_tokens_counts_only_new_tokens():
    # A long prompt does not count towards min_new_tokens (MinNewTokens, not MinLength).
    logits = np.zeros(50, np.float32)
    got = ours(GenerationConfig(min_new_tokens=3), list(range(40)), logits, 40, [0, 1])
    assert np.isneginf(got[[0, 1]]).all()


def test_repetition_penalty_covers_whole_prompt_once_per_token():
    # mlx-lm's own penalty only looks at the last 20 tokens; transformers' at all of them, once.
    vocab = 60
    logits = np.linspace(-3, 3, vocab).astype(np.float32)
    tokens = [2, 2, 2, 55] + list(range(10, 40)) + [55]
    cfg = GenerationConfig(repetition_penalty=2.0, temperature=0.0)
    got = ours(cfg, tokens, logits, len(tokens), [])
    assert_same_logprobs(got, hf_logprobs(cfg, tokens, logits, len(tokens), []))
    processed = got - got[0] + logits[0]  # undo the normalisation via an unpenalised token
    assert processed[2] == pytest.approx(logits[2] * 2.0, abs=1e-5)  # negative: multiplied once
    assert processed[55] == pytest.approx(logits[55] / 2.0, abs=1e-5)  # positive: divided once


def test_top_k_keeps_all_ties_with_kth_value():
    # bf16 logits (Metal) make ties common; TopKLogitsWarper keeps every tie of the k-th value.
    logits = np.array([4.0, 3.0, 2.0, 0.5, 2.0, 2.0, 1.0, 2.0] + [0.0] * 42, np.float32)
    for cfg in [
        GenerationConfig(top_k=3),
        GenerationConfig(top_k=3, top_p=0.97),
        GenerationConfig(top_k=3, top_p=0.6),
    ]:
        got = ours(cfg, [9], logits, 1, [])
        assert_same_logprobs(got, hf_logprobs(cfg, [9], logits, 1, []))
    kept = np.flatnonzero(np.isfinite(ours(GenerationConfig(top_k=3), [9], logits, 1, [])))
    assert kept.tolist() == [0, 1, 2, 4, 5, 7]


@pytest.mark.parametrize("seed", range(10))
def test_bf16_grid_logits_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    vocab = 200
    logits = np.round(rng.normal(size=vocab) * 12) / 4  # many exact ties, like bf16 logits
    logits = logits.astype(np.float32)
    tokens = rng.integers(0, vocab, size=30).tolist()
    for cfg in [
        GenerationConfig(top_k=int(rng.integers(1, 40))),
        GenerationConfig(top_k=int(rng.integers(1, 40)), min_p=0.1, temperature=0.8),
        GenerationConfig(repetition_penalty=1.2, no_repeat_ngram_size=2, temperature=0.0),
    ]:
        assert_same_logprobs(
            ours(cfg, tokens, logits, 10, [1, 2]), hf_logprobs(cfg, tokens, logits, 10, [1, 2])
        )


def test_top_k_candidates_by_blocks_are_the_k_largest():
    # Gemma-sized vocabularies take warpers._top_k_indices' block pass; its candidates must be the k largest
    # values (any of the entries tied with the k-th), however the large values fall into blocks.
    from mlx_persona.sampling.warpers import BLOCK, _top_k_candidates

    k, vocab = 50, 4 * 50 * BLOCK
    rng = np.random.default_rng(7)
    concentrated = np.zeros(vocab, np.float32)
    concentrated[3 * BLOCK : 4 * BLOCK] = np.arange(BLOCK) + 10.0  # the top 50 in one block
    spread_ties = np.full(vocab, -1.0, np.float32)
    spread_ties[5::BLOCK] = 2.0  # 800 blocks whose maximum is the k-th value
    spread_ties[rng.choice(vocab, 20, replace=False)] = 3.0 + rng.normal(size=20).astype(np.float32)
    for x in (concentrated, spread_ties, rng.normal(size=vocab).astype(np.float32),
              np.where(rng.random(vocab) < 0.99, -np.inf, rng.normal(size=vocab)).astype(np.float32)):
        idx, cand, kth = (np.array(a)[0] for a in _top_k_candidates(mx.array(x)[None], k))
        assert len(set(idx.tolist())) == k and (x[idx] == cand).all()
        np.testing.assert_array_equal(np.sort(cand), np.sort(x)[-k:])
        assert kth == np.sort(x)[-k]


@pytest.mark.parametrize("seed", range(3))
def test_top_k_over_a_large_vocabulary_matches_transformers(seed):
    # The block pass of warpers._top_k_indices; exact ties only for top-k alone (a tie group straddling the
    # top-p cut is a known, documented difference).
    rng = np.random.default_rng(300 + seed)
    smooth = (rng.normal(size=16384) * 3).astype(np.float32)
    tied = (np.round(smooth * 8) / 8).astype(np.float32)
    for cfg, logits in [(GenerationConfig(top_k=50), tied), (GenerationConfig(top_k=7), tied),
                        (GenerationConfig(top_k=40, top_p=0.9, temperature=0.7), smooth),
                        (GenerationConfig(top_k=60, min_p=0.05), smooth)]:
        assert_same_logprobs(ours(cfg, [1], logits, 1, []), hf_logprobs(cfg, [1], logits, 1, []))


# --------------------------------------------------------------------------------------------
# process_logits vs transformers: combined
# --------------------------------------------------------------------------------------------

COMBINED = {
    "persona": preset("persona"),
    "persona_min_p": dataclasses.replace(preset("persona"), min_p=0.05, no_repeat_ngram_size=3),
    "everything": GenerationConfig(
        min_new_tokens=20,
        temperature=1.3,
        top_k=40,
        top_p=0.8,
        min_p=0.02,
        repetition_penalty=1.25,
        no_repeat_ngram_size=2,
    ),
    "top_p_without_top_k": GenerationConfig(temperature=0.7, top_p=0.85, repetition_penalty=0.9),
    "greedy_with_processors": GenerationConfig(
        temperature=0.0, min_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2
    ),
}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("name", list(COMBINED))
def test_combined_matches_transformers(name, seed):
    compare(COMBINED[name], 1000 + seed)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])  # no time limits: the machine may be loaded
@given(
    seed=st.integers(0, 2**31 - 1),
    min_new_tokens=st.integers(0, 40),
    temperature=st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.6]),
    top_k=st.sampled_from([0, 1, 2, 10, 50, 299, 400]),
    top_p=st.sampled_from([1e-9, 1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0]),
    min_p=st.sampled_from([0.0, 0.01, 0.2, 1.0]),
    repetition_penalty=st.sampled_from([0.5, 1.0, 1.1, 2.0]),
    no_repeat_ngram_size=st.integers(0, 4),
)
def test_random_settings_match_transformers(seed, **settings_):
    compare(GenerationConfig(**settings_), seed)


# --------------------------------------------------------------------------------------------
# The chain exactly as transformers' generate builds and applies it
# --------------------------------------------------------------------------------------------

GEN_VOCAB = 97
GEN_EOS = [3, 7]


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=GEN_VOCAB, n_positions=128, n_embd=32, n_layer=1, n_head=2,
            bos_token_id=0, eos_token_id=GEN_EOS[0],
        )
    ).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(40)  # logits with a spread like a trained model's
    return model


GENERATE_CASES = {
    "persona": dataclasses.replace(preset("persona"), max_new_tokens=14, min_new_tokens=8),
    "all": GenerationConfig(
        max_new_tokens=14, min_new_tokens=6, temperature=1.4, top_k=20, top_p=0.9, min_p=0.05,
        repetition_penalty=1.3, no_repeat_ngram_size=2,
    ),
    "top_p_only": GenerationConfig(max_new_tokens=14, temperature=0.9, top_p=0.7),
    "greedy": GenerationConfig(
        max_new_tokens=14, min_new_tokens=10, temperature=0.0, repetition_penalty=1.4,
        no_repeat_ngram_size=3,
    ),
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_generate_applies_the_same_chain(tiny_gpt2, name):
    cfg = GENERATE_CASES[name]
    hf_kwargs = cfg.to_hf_generation_config()
    prompt = torch.tensor([[5, 9, 11, 5, 9, 20, 21, 30, 5, 9]])
    prompt_len = prompt.shape[1]

    # The class order GenerationMixin._get_logits_processor builds for these settings.
    gen_cfg = HFGenerationConfig(**hf_kwargs, eos_token_id=GEN_EOS, pad_token_id=0)
    tiny_gpt2._prepare_special_tokens(gen_cfg, True, device="cpu")
    chain = tiny_gpt2._get_logits_processor(
        gen_cfg, input_ids_seq_length=prompt_len, encoder_input_ids=prompt, device="cpu",
        model_kwargs={"attention_mask": torch.ones_like(prompt)},
    )
    expected_order = [type(p).__name__ for p in hf_chain(cfg, prompt_len, GEN_EOS)]
    assert [type(p).__name__ for p in chain] == expected_order

    for run_seed in range(3):
        torch.manual_seed(run_seed)
        out = tiny_gpt2.generate(
            prompt, attention_mask=torch.ones_like(prompt), eos_token_id=GEN_EOS, pad_token_id=0,
            return_dict_in_generate=True, output_scores=True, output_logits=True, **hf_kwargs,
        )
        seq = out.sequences[0].tolist()
        assert len(out.scores) >= min(cfg.min_new_tokens + 1, cfg.max_new_tokens)
        for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
            history = seq[: prompt_len + step]
            got = ours(cfg, history, raw[0].numpy(), prompt_len, GEN_EOS)
            assert_same_logprobs(got, torch.log_softmax(scores[0], -1).numpy())
            if not cfg.do_sample:
                assert int(np.argmax(got)) == seq[prompt_len + step]
            else:
                assert np.isfinite(got[seq[prompt_len + step]])  # drawn token allowed by us too


# --------------------------------------------------------------------------------------------
# (sampler, processors) driven by mlx-lm's generate_step
# --------------------------------------------------------------------------------------------


class TableModel:
    """Stand-in for a model: next-token logits depend only on the last input token.

    Enough for ``generate_step`` (it only needs ``make_cache`` and ``__call__``), and it makes
    the logits independent of how much of the prompt mlx-lm was given.
    """

    def __init__(self, table: np.ndarray):
        self.table = mx.array(table)

    def make_cache(self):
        return []

    def __call__(self, inputs, cache=None):
        return self.table[inputs[:, -1]][:, None, :]


PAIR_VOCAB = 80
PAIR_EOS = [1, 50]


def make_table(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = (rng.normal(size=(PAIR_VOCAB, PAIR_VOCAB)) * 2.5).astype(np.float32)
    table[:, PAIR_EOS] += 3.0  # end ids are likely, so min_new_tokens matters
    return table


def run_generate_step(cfg, prompt, table, *, mlx_prompt=None, prefill_step_size=2048, dtype=None):
    sampler, processors = make_sampler_and_processors(
        cfg, prompt_tokens=prompt, eos_token_ids=PAIR_EOS
    )
    model = TableModel(table if dtype is None else table.astype(dtype))
    tokens, logprobs = [], []
    for tok, lp in generate_step(
        mx.array(prompt if mlx_prompt is None else mlx_prompt),
        model,
        max_tokens=cfg.max_new_tokens,
        sampler=sampler,
        logits_processors=processors,
        prefill_step_size=prefill_step_size,
    ):
        tokens.append(tok)
        logprobs.append(np.array(lp))
    return tokens, logprobs, sampler


PAIR_CASES = {
    "persona": dataclasses.replace(preset("persona"), max_new_tokens=30, min_new_tokens=12, seed=3),
    "all": GenerationConfig(
        max_new_tokens=30, min_new_tokens=8, temperature=1.2, top_k=15, top_p=0.85, min_p=0.05,
        repetition_penalty=1.3, no_repeat_ngram_size=2, seed=5,
    ),
    "top_p_only": GenerationConfig(max_new_tokens=30, temperature=0.9, top_p=0.8, seed=7),
    "greedy": GenerationConfig(
        max_new_tokens=30, min_new_tokens=10, temperature=0.0, repetition_penalty=1.5,
        no_repeat_ngram_size=3,
    ),
}


@pytest.mark.parametrize("name", list(PAIR_CASES))
def test_pair_in_generate_step_matches_process_logits(name):
    cfg = PAIR_CASES[name]
    table = make_table(11)
    rng = np.random.default_rng(12)
    prompt = rng.integers(2, PAIR_VOCAB, size=33).tolist()  # longer than mlx-lm's 20-token window
    tokens, logprobs, sampler = run_generate_step(cfg, prompt, table, prefill_step_size=8)
    assert len(tokens) == cfg.max_new_tokens
    processed_only = dataclasses.replace(cfg, temperature=0.0)
    for step, tok in enumerate(tokens):
        history = prompt + tokens[:step]
        raw = table[history[-1]]
        expected = ours(cfg, history, raw, len(prompt), PAIR_EOS)
        # generate_step yields the processed log-probs (the sampler's input) ...
        processed = ours(processed_only, history, raw, len(prompt), PAIR_EOS)
        assert_same_logprobs(logprobs[step], processed)
        # ... and the sampler's warpers turn them into what process_logits returns.
        warped = _log_softmax_np(np.array(sampler.warp(mx.array(logprobs[step])[None]))[0])
        assert_same_logprobs(warped, expected)
        assert np.isfinite(expected[tok]), f"step {step}: drew excluded token {tok}"
        if step < cfg.min_new_tokens:
            assert tok not in PAIR_EOS
        if not cfg.do_sample:
            assert tok == int(np.argmax(expected))


def _log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    return (x - m - np.log(np.exp(x - m).sum())).astype(np.float32)


def test_pair_with_reused_cache_sees_the_whole_prompt():
    # With a KV cache holding most of the prompt, mlx-lm only sees its tail; the penalty and
    # n-grams must still cover all of prompt_tokens, and min_new_tokens count only new tokens.
    cfg = PAIR_CASES["all"]
    table = make_table(21)
    prompt = np.random.default_rng(22).integers(2, PAIR_VOCAB, size=40).tolist()
    full = run_generate_step(cfg, prompt, table)
    tail = run_generate_step(cfg, prompt, table, mlx_prompt=prompt[-3:])
    assert full[0] == tail[0]
    for a, b in zip(full[1], tail[1]):
        np.testing.assert_array_equal(a, b)


def test_processor_upcasts_bf16_logits_like_transformers():
    # transformers processes float32 copies of the logits; on Metal mlx-lm hands us bf16.
    cfg = PAIR_CASES["all"]
    prompt = [5, 6, 7, 5, 6]
    logits16 = mx.array(make_table(31)[:1]).astype(mx.bfloat16)
    _, (proc,) = make_sampler_and_processors(cfg, prompt_tokens=prompt, eos_token_ids=PAIR_EOS)
    out = proc(mx.array(prompt), logits16)
    assert out.dtype == mx.float32 and out.shape == (1, PAIR_VOCAB)
    raw32 = np.array(logits16.astype(mx.float32))[0]
    expected = ours(dataclasses.replace(cfg, temperature=0.0), prompt, raw32, len(prompt), PAIR_EOS)
    assert_same_logprobs(_log_softmax_np(np.array(out)[0]), expected)


def test_processor_rejects_a_history_that_is_not_the_prompt():
    _, (proc,) = make_sampler_and_processors(
        GenerationConfig(repetition_penalty=1.2), prompt_tokens=[1, 2, 3], eos_token_ids=[0]
    )
    with pytest.raises(ValueError, match="suffix"):
        proc(mx.array([4, 5]), mx.zeros((1, 10)))


def test_pair_manual_loop_counts_new_tokens_from_first_call():
    # Driving the pair by hand the way generate_step does: first call on the prompt.
    cfg = GenerationConfig(min_new_tokens=2, temperature=0.0)
    sampler, (proc,) = make_sampler_and_processors(cfg, prompt_tokens=[4, 5, 6], eos_token_ids=[1])
    assert isinstance(proc, HFLogitsProcessor) and isinstance(sampler, HFSampler)
    logits = mx.zeros((1, 10)).at[:, 1].add(5.0)  # <eos> by far the most likely
    history = mx.array([4, 5, 6])
    picked = []
    for _ in range(4):
        x = proc(history, logits)
        tok = sampler(x - mx.logsumexp(x, keepdims=True))
        picked.append(tok.item())
        history = mx.concatenate([history, tok.astype(mx.int32)])
    assert picked[0] != 1 and picked[1] != 1 and picked[2:] == [1, 1]


# --------------------------------------------------------------------------------------------
# Sampling: greedy, reproducibility, distribution
# --------------------------------------------------------------------------------------------


def test_greedy_is_argmax_first_index_on_ties(draw_path):
    sampler = HFSampler(preset("greedy"))
    lp = mx.array([[0.1, 2.0, -1.0, 2.0, 0.5]])
    assert sampler(lp).tolist() == [1]
    assert sampler(lp[0]).item() == 1


def _fixed_logprobs(vocab=30, seed=0):
    x = np.random.default_rng(seed).normal(size=(1, vocab)).astype(np.float32) * 2
    return mx.array(x) - mx.logsumexp(mx.array(x), keepdims=True)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=0.9), dict(temperature=0.9, top_k=8, top_p=0.9), dict(top_p=0.8, min_p=0.05)],
)
def test_seeded_sampling_is_reproducible_and_seed_dependent(kwargs, draw_path):
    lp = _fixed_logprobs()

    def draws(seed, disturb_global_rng=False):
        sampler = HFSampler(GenerationConfig(seed=seed, **kwargs))
        out = []
        for i in range(150):
            if disturb_global_rng:  # other code using MLX's global RNG must not matter
                mx.random.seed(1000 + i)
                mx.eval(mx.random.uniform(shape=(7,)))
            out.append(sampler(lp).item())
        return out

    a = draws(0)
    assert draws(0) == a
    assert draws(0, disturb_global_rng=True) == a
    assert draws(1) != a
    assert len(set(a)) > 1


def _check_distribution(counts: np.ndarray, probs: np.ndarray, n: int) -> None:
    assert counts[probs == 0].sum() == 0, "drew a token transformers excludes"
    tv = 0.5 * np.abs(counts / n - probs).sum()
    assert tv < (0.02 if n >= 20000 else 0.06), f"total variation {tv:.4f}"
    mask = probs * n >= 5
    expected = n * probs[mask]
    chi2 = (((counts[mask] - expected) ** 2) / expected).sum()
    df = max(int(mask.sum()) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, f"chi-square {chi2:.1f} with {df} dof"


TIES = np.array([4.0, 3.0, 2.0, 0.5, 2.0, 2.0, 1.0, 2.0, -1.0, 3.5, 0.0, 2.0], np.float32)

DIST_CASES = {
    "temperature": (GenerationConfig(temperature=0.7), None),
    "top_p": (GenerationConfig(temperature=1.3, top_p=0.8), None),
    "top_k_top_p_min_p": (GenerationConfig(temperature=1.1, top_k=5, top_p=0.95, min_p=0.02), None),
    "top_k_ties": (GenerationConfig(top_k=3), TIES),  # k-th value tied 5 ways, 4 left out
    "top_k_ties_top_p": (GenerationConfig(top_k=4, top_p=0.99, temperature=2.0), TIES),
    "top_k_ties_cut_by_top_p": (GenerationConfig(top_k=4, top_p=0.7), TIES),
    "top_k_min_p": (GenerationConfig(top_k=8, min_p=0.3, temperature=1.5), None),
    "top_k_ties_min_p": (GenerationConfig(top_k=4, min_p=0.2), TIES),  # drops the tie group
}


@pytest.mark.parametrize("name", list(DIST_CASES))
def test_empirical_distribution_matches_processed_probabilities(name, draw_path):
    cfg, logits = DIST_CASES[name]
    cfg = dataclasses.replace(cfg, seed=123)
    if logits is None:
        logits = np.random.default_rng(5).normal(size=12).astype(np.float32) * 1.5
    probs = np.exp(ours(cfg, [0], logits, 1, []).astype(np.float64))
    probs /= probs.sum()
    lp = mx.array(logits)[None]
    lp = lp - mx.logsumexp(lp, keepdims=True)
    n = 20000
    draws = np.array(HFSampler(cfg)(mx.broadcast_to(lp, (n, logits.size))))  # one batched call
    _check_distribution(np.bincount(draws, minlength=logits.size), probs, n)


def test_sequential_seeded_draws_follow_the_distribution(draw_path):
    # The per-call key chain (as mlx-lm drives it: one [1, vocab] row per call).
    cfg, logits = DIST_CASES["top_k_ties_top_p"]
    cfg = dataclasses.replace(cfg, seed=9)
    probs = np.exp(ours(cfg, [0], logits, 1, []).astype(np.float64))
    probs /= probs.sum()
    sampler = HFSampler(cfg)
    lp = mx.array(logits)[None]
    draws = []
    for _ in range(5):  # evaluate in chunks: fewer host syncs, the same key chain
        draws += mx.concatenate([sampler(lp) for _ in range(200)]).tolist()
    _check_distribution(np.bincount(draws, minlength=logits.size), probs, len(draws))


# --------------------------------------------------------------------------------------------
# GenerationConfig
# --------------------------------------------------------------------------------------------


def test_defaults_and_presets():
    cfg = GenerationConfig()
    assert cfg.to_dict() == dict(
        max_new_tokens=256, min_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, stop=[], seed=None,
    )
    p = preset("persona")
    assert p == GenerationConfig(
        max_new_tokens=256, min_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95,
        repetition_penalty=1.1,
    )
    assert preset("greedy").temperature == 0.0 and not preset("greedy").do_sample
    p.top_k = 3
    p.stop.append("x")
    assert PRESETS["persona"].top_k == 50 and PRESETS["persona"].stop == []
    with pytest.raises(ValueError, match="persona"):
        preset("nope")


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("min_new_tokens", -1),
        ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("min_p", -0.01), ("min_p", 1.5),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("no_repeat_ngram_size", -2),
        ("stop", "END"), ("stop", [""]), ("seed", -1), ("seed", 1.5),
    ],
)
def test_validate_rejects_impossible_values(field_name, value):
    cfg = dataclasses.replace(GenerationConfig(), **{field_name: value})
    with pytest.raises(ValueError, match=field_name):
        cfg.validate()


def test_dict_round_trip_and_unknown_keys():
    cfg = dataclasses.replace(preset("persona"), stop=["<end>"], seed=4, min_p=0.1)
    d = cfg.to_dict()
    assert GenerationConfig.from_dict(d) == cfg
    assert GenerationConfig.from_dict({"temperature": 1}).temperature == 1
    with pytest.raises(ValueError, match="'top_kk'"):
        GenerationConfig.from_dict({"top_kk": 5})
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig.from_dict({"top_p": 2})


def test_hf_generation_config_export():
    d = preset("persona").to_hf_generation_config()
    assert d == dict(
        do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
        no_repeat_ngram_size=0, min_new_tokens=50, max_new_tokens=256,
    )
    with_min_p = dataclasses.replace(preset("persona"), min_p=0.05)
    assert with_min_p.to_hf_generation_config()["min_p"] == 0.05
    # top_k=0 must be explicit: transformers would default a missing top_k to 50.
    assert GenerationConfig(temperature=0.7).to_hf_generation_config()["top_k"] == 0
    g = preset("greedy").to_hf_generation_config()
    assert g["do_sample"] is False and not {"temperature", "top_k", "top_p", "min_p"} & set(g)
    for cfg in [preset("persona"), preset("greedy"), COMBINED["everything"]]:
        HFGenerationConfig(**cfg.to_hf_generation_config()).validate(strict=True)
