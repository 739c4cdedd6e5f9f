"""Known answers for mlx_persona.sampling at its edges, written to kill the mutants that the transformers-oracle
tests in test_sampling.py let live (`make mutate TARGETS=sampling-processors,sampling-warpers,sampling-sampler`;
mutation/RESULTS.md lists the survivors left as equivalent and why).

* processors: token ids outside the vocabulary, id 0, an n-gram history exactly n long, the bounds of
  prompt_length, [1, n] token arrays and the output's shape and dtype, each row processed by hand on a 4- to
  8-token vocabulary.
* warpers: top-p and min-p cuts exactly on a float32-exact boundary, top_p = 1 with probabilities that underflow,
  batches of several rows, and sample_top_k's draws against transformers' warpers' probabilities.
* sampler: which path draws (sample_top_k exactly when 0 < top_k < vocab), [vocab] rows against [1, vocab], a
  history shorter than the prompt.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_sampling import _check_distribution, hf_chain

from mlx_persona.sampling import (
    GenerationConfig,
    HFLogitsProcessor,
    HFSampler,
    make_sampler_and_processors,
    process_logits,
)
from mlx_persona.sampling.warpers import sample_top_k, warp

NEG = -math.inf


def _log_softmax(row):
    row = np.array(row, np.float64)
    finite = row[np.isfinite(row)]
    return row - (finite.max() + np.log(np.exp(finite - finite.max()).sum()))


def _run(cfg, tokens, logits, prompt_length=0, eos=None):
    return np.array(process_logits(cfg, tokens, mx.array(np.array(logits, np.float32)),
                                   prompt_length=prompt_length, eos_token_ids=eos))


def _same(got, want):
    want = _log_softmax(want)
    assert got.shape == want.shape and np.array_equal(np.isneginf(got), np.isneginf(want)), (got, want)
    # float32 log-softmax of values within 0..5: measured |error| <= 2.2e-7.
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=2e-6)


def test_repetition_penalty_ignores_ids_outside_the_vocabulary_and_counts_id_0():
    cfg = GenerationConfig(temperature=0.0, repetition_penalty=2.0)
    # Ids 4 and 7 are past the 4-token vocabulary (dropped, as transformers does); 0 and 2 are penalised
    # once each (2 appears twice); a negative logit is multiplied, a positive one divided.
    _same(_run(cfg, [0, 4, 7, 2, 2], [1.0, 2.0, 3.0, 4.0]), [0.5, 2.0, 1.5, 4.0])
    _same(_run(cfg, [0, 3], [-1.0, 2.0, 3.0, 4.0]), [-2.0, 2.0, 3.0, 2.0])
    # A history made only of out-of-vocabulary ids changes nothing.
    _same(_run(cfg, [4, 9], [1.0, 2.0, 3.0, 4.0]), [1.0, 2.0, 3.0, 4.0])


def test_min_new_tokens_bans_only_end_ids_in_the_vocabulary_until_reached():
    cfg = GenerationConfig(temperature=0.0, min_new_tokens=3)
    logits = [1.0, 2.0, 3.0, 4.0]
    # 2 new tokens (< 3): end ids 0 and 1 banned, 4 and -1 are not tokens of this vocabulary.
    _same(_run(cfg, [3, 3, 3], logits, prompt_length=1, eos=[4, 1, 0, -1]), [NEG, NEG, 3.0, 4.0])
    _same(_run(cfg, [3, 3, 3], logits, prompt_length=1, eos=4), logits)  # only an out-of-vocab end id
    _same(_run(cfg, [3, 3, 3, 3], logits, prompt_length=1, eos=[1]), logits)  # 3 new: no ban
    _same(_run(cfg, [3, 3, 3, 3], logits, prompt_length=2, eos=1), [1.0, NEG, 3.0, 4.0])  # an int end id
    _same(_run(cfg, [3, 3, 3], logits, prompt_length=1, eos=None), logits)


@pytest.mark.parametrize("n, tokens, banned", [
    (2, [5, 5], [5]),  # exactly n tokens: one complete window, and it matches
    (2, [1, 2, 1], [2]),
    (3, [1, 2, 1, 2], [1]),
    (3, [1, 2, 1], []),  # the suffix (2, 1) never started a window
    (3, [1, 2], []),  # shorter than n: nothing yet
    (2, [9, 3, 9], [3]),  # an out-of-vocabulary id may start a window...
    (2, [3, 9, 3], []),  # ...but is never banned itself
    (1, [6, 0, 6], [0, 6]),
])
def test_no_repeat_ngram_known_bans(n, tokens, banned):
    cfg = GenerationConfig(temperature=0.0, no_repeat_ngram_size=n)
    logits = [0.5 * i for i in range(8)]
    want = [NEG if i in banned else v for i, v in enumerate(logits)]
    _same(_run(cfg, tokens, logits), want)


def test_prompt_length_bounds_and_token_shapes():
    cfg = GenerationConfig(temperature=0.0, min_new_tokens=1)
    logits = [1.0, 2.0, 3.0, 4.0]
    _same(_run(cfg, [3, 2], logits, prompt_length=2, eos=[3]), [1.0, 2.0, 3.0, NEG])  # all prompt: 0 new
    _same(_run(cfg, [3, 2], logits, prompt_length=0, eos=[3]), logits)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=rf"prompt_length must be in \[0, len\(tokens\)=2\], got {bad}"):
            _run(cfg, [3, 2], logits, prompt_length=bad, eos=[3])
    # Tokens as [1, n] (mlx-lm's shape), numpy int64 or mx int64: the same as a list.
    want = _run(cfg, [3, 2], logits, prompt_length=2, eos=[3])
    for tokens in ([[3, 2]], np.array([3, 2], np.int64), mx.array([[3, 2]], mx.int64), mx.array([3, 2])):
        np.testing.assert_array_equal(_run(cfg, tokens, logits, prompt_length=2, eos=[3]), want)
    for tokens in ([[3, 2], [1, 0]], [[[3, 2]]], mx.array([[3], [2]])):
        with pytest.raises(ValueError, match="tokens must be 1-D"):
            _run(cfg, tokens, logits, prompt_length=0, eos=[3])


def test_output_shape_and_dtype_follow_the_logits():
    cfg = GenerationConfig(repetition_penalty=1.5)
    row = mx.array([1.0, -2.0, 3.0, 0.5], mx.bfloat16)
    flat = process_logits(cfg, [2], row, prompt_length=0, eos_token_ids=None)
    batch = process_logits(cfg, [2], row[None], prompt_length=0, eos_token_ids=None)
    assert flat.shape == (4,) and batch.shape == (1, 4) and flat.dtype == batch.dtype == mx.float32
    np.testing.assert_array_equal(np.array(batch[0]), np.array(flat))
    _same(np.array(flat), [1.0, -2.0, 2.0, 0.5])
    # Plain numpy logits are accepted too.
    got = process_logits(cfg, [2], np.array([1.0, -2.0, 3.0, 0.5], np.float32), prompt_length=0,
                         eos_token_ids=None)
    _same(np.array(got), [1.0, -2.0, 2.0, 0.5])


def test_no_repeat_ngram_never_scatters_an_id_past_the_vocabulary():
    """A history id equal to the logits width (a tokenizer with more ids than the head has rows) that would be
    banned must be skipped: MLX's scatter does not bound-check, and writing one past the row corrupted the
    heap (glibc: "corrupted size vs. prev_size", abort) when the guard was `<=` instead of `<`. Run in a
    child with glibc's heap checks on, so the corruption ends the child instead of this test process."""
    import os
    import subprocess
    import sys

    code = (
        "import mlx_persona.backend as b; b.setup()\n"
        "import mlx.core as mx\n"
        "from mlx_persona.sampling.processors import apply_no_repeat_ngram\n"
        "V = 8\n"
        "x = mx.arange(V, dtype=mx.float32)[None]\n"
        "for _ in range(50):\n"
        "    y = apply_no_repeat_ngram(x, mx.array([5, V, 5, 3, V + 2, 5, V, 5], dtype=mx.int32), 2)\n"
        "    mx.eval(y)\n"
        "assert y.tolist() == [[0.0, 1.0, 2.0, float('-inf'), 4.0, 5.0, 6.0, 7.0]], y.tolist()\n"
        "print('ok')\n")
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-1000:])


def test_apply_processors_takes_its_settings_by_keyword_only():
    """`penalty_ids` and `history` are both thunks: passed by position, swapping them would silently penalise the
    wrong tokens, so the signature keeps them keyword-only."""
    import inspect

    from mlx_persona.sampling.processors import apply_processors

    params = list(inspect.signature(apply_processors).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), [(p.name, p.kind) for p in params]


# --------------------------------------------------------------------------------------------------------------
# warpers.py (`make mutate TARGETS=sampling-warpers`): exact boundaries, batches, and sample_top_k's draw
# --------------------------------------------------------------------------------------------------------------

def _hf_warp(logits, **settings):
    """transformers' own warpers (hf_chain builds them as generate does) on a torch float32 batch."""
    chain = hf_chain(GenerationConfig(**settings), 0, [])
    rows = torch.tensor(np.asarray(logits, np.float32))
    return chain(torch.zeros((rows.shape[0], 1), dtype=torch.long), rows).numpy()


def _same_warp(logits, **settings):
    got = np.array(warp(mx.array(np.asarray(logits, np.float32)), **settings))
    want = _hf_warp(logits, **settings)
    assert got.shape == want.shape and np.array_equal(np.isneginf(got), np.isneginf(want)), (got, want)
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6, atol=0)
    return got


def test_entry_points_take_their_settings_by_keyword_only():
    """Numbers in a row (top_k an int between floats; prompt_length and the end ids) are too easy to pass in
    the wrong order: every setting after the data is keyword-only."""
    x, cfg = mx.zeros((1, 4)), GenerationConfig()
    for call in (lambda: warp(x, 1.0, 2, 1.0, 0.0), lambda: sample_top_k(x, None, 1.0, 2, 1.0, 0.0),
                 lambda: process_logits(cfg, [1], x, 0, None), lambda: HFLogitsProcessor(cfg, [1], None),
                 lambda: make_sampler_and_processors(cfg, [1], None)):
        with pytest.raises(TypeError, match="positional argument"):
            call()


def test_top_p_of_one_keeps_tokens_whose_probability_underflows():
    # temperature 0.01 spreads the logits over 400 nats: exp(-150) is 0 in float32, so a top-p pass at
    # top_p = 1.0 would see cumulative probability 0 <= 1 - top_p and drop them; generate adds no top-p
    # warper at 1.0, so they stay finite (after top-k: 150 survives top_k=2).
    logits = [[3.0, 0.0, 1.5, -1.0]]
    assert np.isfinite(_same_warp(logits, temperature=0.01, top_k=0, top_p=1.0, min_p=0.0)).all()
    got = _same_warp(logits, temperature=0.01, top_k=2, top_p=1.0, min_p=0.0)
    assert np.isfinite(got).tolist() == [[True, False, True, False]]


# Probabilities 1/2, 1/8, 1/4, 1/8: exp, the sums and the cumulative sums are exact in float32, so
# 1 - top_p = 1/2 and 1/4 sit exactly on a cumulative sum, where TopPLogitsWarper removes (<=).
DYADIC = [[0.0, math.log(0.25), math.log(0.5), math.log(0.25)]]


@pytest.mark.parametrize("top_k", [0, 3])  # 3: the k-th value is tied, one tie left out of the candidates
@pytest.mark.parametrize("top_p, kept", [(0.5, [0]), (0.75, [0, 2])])
def test_top_p_cut_exactly_on_a_cumulative_probability(top_k, top_p, kept):
    got = _same_warp(DYADIC, temperature=1.0, top_k=top_k, top_p=top_p, min_p=0.0)
    assert np.flatnonzero(np.isfinite(got[0])).tolist() == kept


def test_warp_treats_each_row_of_a_batch_alone():
    # Rows of 9 (not 3) logits, so that a reduction that loses its kept axis fails to broadcast.
    rows = np.random.default_rng(3).normal(size=(3, 9)).astype(np.float32) * 2
    for settings in ({"temperature": 0.8, "top_k": 3, "top_p": 0.7, "min_p": 0.0},
                     {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.2},
                     {"temperature": 1.3, "top_k": 4, "top_p": 0.9, "min_p": 0.1}):
        got = _same_warp(rows, **settings)
        for i in range(3):
            np.testing.assert_array_equal(got[i], np.array(warp(mx.array(rows[i:i + 1]), **settings))[0])


L5 = math.log(0.5)
TOP_K_DRAWS = {
    # min_p = 1/2 with a candidate exactly at half the top probability: kept (MinP removes p < min_p * top).
    "min_p_cut_on_a_candidate": ([0.0, L5, -3.0, -3.0, -3.0, -6.0], {"top_k": 3, "min_p": 0.5}),
    # ...and with the k-th value's tie group exactly there: the whole group is kept, each tie drawn alike.
    "min_p_cut_on_the_tie_group": ([0.0, L5, L5, L5, -6.0, -6.0], {"top_k": 2, "min_p": 0.5}),
    # A tie group below the min_p cut, with logits far from 0: dropped.
    "min_p_drops_the_tie_group": ([5.0, 4.5, 1.0, 1.0, 1.0, 0.0], {"top_k": 3, "min_p": 0.5}),
    # top-p counting the 3 ties of the k-th value that argpartition left out: the group holds 0.283 of the
    # mass, so 1 - top_p = 0.3 removes all of it (one tie counted twice would put it at 0.331, and keep it).
    "top_p_counts_ties_left_out": ([4.0, 3.0, 2.0, 0.5, 2.0, 2.0, 1.0, 2.0], {"top_k": 3, "top_p": 0.7}),
    "top_p_keeps_the_tie_group": ([4.0, 3.0, 2.0, 0.5, 2.0, 2.0, 1.0, 2.0], {"top_k": 3, "top_p": 0.95}),
}  # (no top-p cut inside a tie group: there transformers keeps an arbitrary part of it, we keep it whole)


@pytest.mark.parametrize("seeded", [True, False])
@pytest.mark.parametrize("name", list(TOP_K_DRAWS))
def test_sample_top_k_draws_from_transformers_distribution(name, seeded):
    """20000 draws in one batched call, with a key and from MLX's global generator (seeded first, so the
    test is deterministic), against the probabilities of transformers' warpers."""
    logits, settings = TOP_K_DRAWS[name]
    settings = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, **settings}
    want = _hf_warp([logits], **settings)[0].astype(np.float64)
    probs = np.exp(want - want.max())
    probs /= probs.sum()
    n = 20000
    x = mx.broadcast_to(mx.array(np.array(logits, np.float32))[None], (n, len(logits)))
    if not seeded:
        mx.random.seed(11)
    out = sample_top_k(x, mx.random.key(11) if seeded else None, **settings)
    assert out.shape == (n,) and out.dtype == mx.uint32
    _check_distribution(np.bincount(np.array(out), minlength=len(logits)), probs, n)



@pytest.mark.parametrize("k, blocks", [(1, 64), (2, 64), (3, 64), (5, 64), (8, 64), (16, 64),
                                       (3, 1), (3, 2), (5, 3), (40, 3)])
def test_top_k_indices_are_the_exact_top_k(k, blocks):
    """Each row's k indices are its k largest entries: at a vocabulary the block path takes (a multiple of 64,
    >= 4 * k * 64; a first pass that keeps k of the k + 1 blocks with the largest maxima misses one), and at
    multiples of 64 with fewer than k blocks (only one argpartition can answer there)."""
    from mlx_persona.sampling.warpers import BLOCK, _top_k_indices

    vocab = blocks * BLOCK
    rows = np.random.default_rng(k).normal(size=(64, vocab)).astype(np.float32)
    got = np.sort(np.array(_top_k_indices(mx.array(rows), k)), axis=-1)
    want = np.sort(np.argsort(-rows, axis=-1, kind="stable")[:, :k], axis=-1)
    np.testing.assert_array_equal(got, want)


def test_sample_top_k_keeps_each_row_of_a_batch_to_its_own_candidates():
    """Two rows whose top-k tokens lie at opposite ends of the vocabulary: every draw of a row is one of its
    own candidates (candidates put in token-id order across the batch instead of along the row swap them)."""
    x = np.full((2, 4096), -20.0, np.float32)
    x[0, 4090:] = np.arange(6)  # row 0: its top 4 are ids 4092..4095
    x[1, :6] = np.arange(6)[::-1]  # row 1: ids 0..3
    xs = mx.broadcast_to(mx.array(x)[:, None], (2, 500, 4096)).reshape(1000, 4096)
    out = np.array(sample_top_k(xs, mx.random.key(5), temperature=1.0, top_k=4, top_p=1.0, min_p=0.0))
    rows = out.reshape(2, 500)
    assert set(rows[0]) <= {4092, 4093, 4094, 4095} and set(rows[1]) <= {0, 1, 2, 3}
    assert len(set(rows[0])) == 4 and len(set(rows[1])) == 4


# --------------------------------------------------------------------------------------------------------------
# sampler.py (`make mutate TARGETS=sampling-sampler`): which path draws, row shapes, the processor's history
# --------------------------------------------------------------------------------------------------------------

ROW = np.array([2.0, 0.0, 2.0, 1.0, 2.0, -1.0, 0.5, 2.0, 1.5, -0.5, 1.0, 0.25], np.float32)  # 4 tied maxima


def _draws(cfg, x, calls=40):
    sampler = HFSampler(cfg)
    return [np.array(sampler(x)).tolist() for _ in range(calls)]


def test_sampler_draws_top_k_with_the_fast_path_exactly_when_it_cuts_the_vocabulary(draw_path):
    """HFSampler's generators are documented: with MLX ops one key split per call, and for 0 < top_k < vocab
    its draws are sample_top_k's with those keys; with the CPU kernel the kernel's draws with (seed, number
    of the call). top_k >= vocab is off, i.e. the very draws of top_k = 0 (MLX ops on either path)."""
    from mlx_persona.backend import draw

    x = mx.array(ROW)[None]
    for top_k in (1, 2, 11):
        settings = {"temperature": 0.9, "top_k": top_k, "top_p": 1.0, "min_p": 0.0}
        key, want = mx.random.key(7), []
        for call in range(40):
            if draw_path == "cpu":
                want.append(draw.draw([x[0]], [draw.Settings(0.9, top_k, 1.0, 0.0, 7, call)]).tolist())
                continue
            key, sub = mx.random.split(key)
            want.append(np.array(sample_top_k(x, sub, **settings)).tolist())
        assert _draws(GenerationConfig(seed=7, **settings), x) == want, top_k
    off = _draws(GenerationConfig(seed=7, temperature=0.9), x)
    assert len({tuple(d) for d in off}) > 4
    for top_k in (12, 13, 1000):
        assert _draws(GenerationConfig(seed=7, temperature=0.9, top_k=top_k), x) == off, top_k


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"temperature": 0.9}, {"top_k": 3, "top_p": 0.8},
                                      {"top_p": 0.7, "min_p": 0.1}])
def test_sampler_draws_the_same_for_a_vocab_row_and_a_batch_of_one(settings):
    row, seeded = mx.array(ROW), GenerationConfig(seed=3, **settings)
    assert _draws(seeded, row) == [b[0] for b in _draws(seeded, row[None])]
    assert HFSampler(seeded)(row).shape == () and HFSampler(seeded)(row[None]).shape == (1,)
    mx.random.seed(5)
    flat = _draws(GenerationConfig(**settings), row)
    mx.random.seed(5)
    assert flat == [b[0] for b in _draws(GenerationConfig(**settings), row[None])]


def test_processor_takes_a_vocab_row_like_a_batch_of_one():
    cfg = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=2)
    logits = mx.array(ROW)
    flat_proc, batch_proc = (HFLogitsProcessor(cfg, prompt_tokens=[3, 4, 3], eos_token_ids=[0]) for _ in range(2))
    for tokens in ([3, 4, 3], [3, 4, 3, 4], [3, 4, 3, 4, 0]):  # the prompt, then two generated tokens
        flat, batch = flat_proc(mx.array(tokens), logits), batch_proc(mx.array(tokens), logits[None])
        assert flat.shape == (12,) and batch.shape == (1, 12)
        np.testing.assert_array_equal(np.array(flat), np.array(batch[0]))


def test_processor_rejects_a_history_shorter_than_the_prompt():
    for shorter in ([3, 4], [3]):  # one token short is already wrong
        _, (proc,) = make_sampler_and_processors(GenerationConfig(), prompt_tokens=[3, 4, 3], eos_token_ids=[0])
        proc(mx.array([3, 4, 3]), mx.zeros((1, 12)))
        with pytest.raises(ValueError, match="history shrank below the prompt"):
            proc(mx.array(shorter), mx.zeros((1, 12)))
