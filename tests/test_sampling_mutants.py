"""Known answers for sampling.py's logits processors at their edges, written to kill the mutants that the
transformers-oracle tests let live (`make mutate TARGETS=sampling-processors`): token ids outside the
vocabulary, id 0, an n-gram history exactly n long, the bounds of prompt_length, [1, n] token arrays and
the output's shape and dtype. Every expected row is processed by hand on a 4- to 8-token vocabulary."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_persona.sampling import GenerationConfig, process_logits

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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-1000:])


def test_apply_processors_takes_its_settings_by_keyword_only():
    """`penalty_ids` and `history` are both thunks: passed by position, swapping them would silently penalise the
    wrong tokens, so the signature keeps them keyword-only."""
    import inspect

    from mlx_persona.sampling.processors import apply_processors

    params = list(inspect.signature(apply_processors).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), [(p.name, p.kind) for p in params]
