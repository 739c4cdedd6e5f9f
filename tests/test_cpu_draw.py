"""The CPU draw kernel (mlx_persona.backend.draw, native/draw.c) against its oracles.

* The distribution it draws from equals transformers' warpers (TemperatureLogitsWarper, TopK, TopP, MinP)
  applied to the same logits, and MLX's own ``warp``, within 1e-6: Gemma's vocabulary (a multiple of the
  kernel's blocks) and others, ties at the k-th value, banned (-inf) tokens, many settings.
* Its draws follow that distribution (chi-square), a seeded row's draw depends on its seed, counter and
  logits alone, and the greedy row is the first index of the maximum.
* generate, batch_generate and the sampler really use it on this CPU, and MLX_PERSONA_CPU_DRAW=0 turns it off.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_persona.backend import draw
from mlx_persona.sampling import GenerationConfig, HFSampler
from mlx_persona.sampling.warpers import warp

pytestmark = pytest.mark.skipif(not draw.available(), reason="the native layer is not loaded (no gcc?)")

SETTINGS = [(0.8, 50, 0.95, 0.0), (1.0, 5, 1.0, 0.0), (1.3, 40, 0.5, 0.05), (0.7, 200, 0.9, 0.1),
            (1.0, 1, 1.0, 0.0), (2.0, 64, 0.99, 0.0), (0.5, 3, 0.3, 0.2)]


def _logits(vocab: int, seed: int, ties: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=vocab).astype(np.float32) * 3
    if ties:  # a grid: many tokens share the k-th value (as bf16 logits do)
        x = np.round(x * 4) / 4
    x[rng.integers(0, vocab, 30)] = -np.inf  # banned tokens (repetition of an n-gram, min_new_tokens)
    return x


def _transformers(x: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    scores = chain(torch.zeros((1, 1), dtype=torch.long), torch.tensor(x)[None])
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("vocab", [262144, 50257, 1000, 70])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("settings", SETTINGS)
def test_the_distribution_is_transformers_warpers(vocab, ties, settings):
    temperature, top_k, top_p, min_p = settings
    if top_k >= vocab:
        pytest.skip("top_k covers the vocabulary")
    x = _logits(vocab, vocab + top_k, ties)
    got = draw.distribution([mx.array(x)], [draw.Settings(*settings, seed=1, counter=0)])[0]
    theirs = _transformers(x, *settings)
    if not ties:  # a tie straddling the top-p cut: transformers keeps part of it by sort order, we keep it all
        np.testing.assert_allclose(got, theirs, atol=1e-6)
    ours_mlx = np.array(mx.softmax(warp(mx.array(x)[None], temperature=temperature, top_k=top_k, top_p=top_p,
                                        min_p=min_p), axis=-1))[0]
    np.testing.assert_allclose(got, ours_mlx, atol=1e-6)
    assert (got > 0).sum() >= 1 and abs(got.sum() - 1) < 1e-5


def test_ties_at_the_kth_value_all_stay_in():
    x = np.zeros(4096, np.float32)
    x[:3] = [5.0, 4.0, 3.0]
    x[[100, 2000, 4000]] = 2.0  # top_k=4: the 4th value is tied three times; all three survive
    got = draw.distribution([mx.array(x)], [draw.Settings(1.0, 4, 1.0, 0.0, 0, 0)])[0]
    assert set(np.flatnonzero(got)) == {0, 1, 2, 100, 2000, 4000}
    assert got[100] == got[2000] == got[4000]


def _counts(x: np.ndarray, settings: draw.Settings, n: int) -> np.ndarray:
    row = mx.array(x)
    tokens = draw.draw([row] * n, [settings._replace(counter=c) for c in range(n)])
    return np.bincount(tokens, minlength=x.size)


@pytest.mark.parametrize("ties", [False, True])
def test_draws_follow_the_distribution(ties):
    x = _logits(4096, 7, ties)
    settings = draw.Settings(0.9, 12, 0.9, 0.0, seed=3, counter=0)
    probs = draw.distribution([mx.array(x)], [settings])[0].astype(np.float64)
    n = 20000
    counts = _counts(x, settings, n)
    assert counts[probs == 0].sum() == 0, "drew an excluded token"
    mask = probs * n >= 5
    expected = n * probs[mask]
    chi2 = (((counts[mask] - expected) ** 2) / expected).sum()
    df = max(int(mask.sum()) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, f"chi-square {chi2:.1f} with {df} dof"
    if ties:  # the tie slot's members are drawn evenly (the same probability each)
        assert (np.unique(probs[probs > 0]).size < (probs > 0).sum())


def test_a_seeded_draw_depends_on_seed_counter_and_logits_alone():
    rows = [mx.array(_logits(262144, s, False)) for s in range(6)]
    settings = [draw.Settings(0.8, 50, 0.95, 0.0, seed=s, counter=c) for s, c in zip(range(6), (0, 5, 9, 0, 2, 7))]
    together = draw.draw(rows, settings)
    alone = [draw.draw([r], [s])[0] for r, s in zip(rows, settings)]
    assert together.tolist() == alone
    assert draw.draw(rows[::-1], settings[::-1]).tolist() == together.tolist()[::-1]
    many = {int(draw.draw([rows[0]], [settings[0]._replace(counter=c)])[0]) for c in range(40)}
    assert len(many) > 5  # the counter moves the draw


def test_greedy_is_the_first_index_of_the_maximum():
    rng = np.random.default_rng(0)
    for vocab in (262144, 1000, 63):
        x = rng.normal(size=vocab).astype(np.float32)
        top = rng.choice(vocab, 3, replace=False)
        x[top] = 9.0
        x[rng.integers(0, vocab, 10)] = -np.inf
        got = draw.draw([mx.array(x)], [draw.Settings(0.0, 0, 1.0, 0.0, 0, 0)])[0]
        assert got == int(np.argmax(x)) == top.min()


def test_rows_of_a_batch_and_slices_are_read_in_place():
    x = mx.array(np.stack([_logits(5000, s, False) for s in range(4)]))
    rows = [x[i] for i in range(4)]  # views into one array
    settings = [draw.Settings(0.0, 0, 1.0, 0.0, 0, 0)] * 4
    assert draw.draw(rows, settings).tolist() == np.argmax(np.array(x), axis=-1).tolist()
    with pytest.raises(ValueError, match="top_k"):
        draw.draw(rows[:1], [draw.Settings(1.0, 5000, 1.0, 0.0, 0, 0)])


def test_generation_uses_it_and_the_switch_turns_it_off(tiny_path, monkeypatch):
    from mlx_persona.batch_generation import batch_generate
    from mlx_persona.generation import end_token_ids, generate
    from mlx_persona.models import load_model

    model, tok = load_model(tiny_path)
    ends = end_token_ids(tok, tiny_path)
    cfg = GenerationConfig(temperature=0.9, top_k=20, max_new_tokens=6, min_new_tokens=6, seed=1)
    before = draw.calls()
    one = generate(model, tok, "Hi!", cfg, end_ids=ends)
    assert draw.calls() - before == 6
    both = batch_generate(model, tok, ["Hi!", "Dad?"], [cfg, dataclasses.replace(cfg, seed=2)], end_ids=ends)
    assert both[0].tokens == one.tokens  # the same row, batched or alone
    monkeypatch.setenv(draw.ENV, "0")
    before = draw.calls()
    assert HFSampler(cfg).cpu_draw(1000) is False
    generate(model, tok, "Hi!", cfg, end_ids=ends)
    assert draw.calls() == before


def test_unseeded_draws_come_from_mlx_global_generator():
    x = mx.array(_logits(5000, 1, False))[None]
    cfg = GenerationConfig(temperature=1.0, top_k=200)

    def draws():
        sampler = HFSampler(cfg)
        assert sampler.cpu_draw(5000)
        return [int(sampler(x).item()) for _ in range(30)]

    mx.random.seed(5)
    a = draws()
    mx.random.seed(5)
    assert draws() == a  # reproducible under mx.random.seed, as the MLX path is
    assert len(set(a)) > 5 and draws() != a  # and random otherwise


def test_nan_logits_do_not_break_the_kernel():
    x = np.full(4096, np.nan, np.float32)
    x[[3, 70, 900]] = [1.0, 2.0, 3.0]  # fewer finite logits than top_k
    token = draw.draw([mx.array(x)], [draw.Settings(1.0, 50, 1.0, 0.0, 0, 0)])[0]
    assert token in (3, 70, 900)
