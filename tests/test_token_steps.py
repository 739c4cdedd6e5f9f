"""The decode loop of mlx_persona.generation (token_steps): what mlx-lm's generate_step draws, with the
prompt in one pass, the LM head at its last position only and a fused log-softmax."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_persona.generation import (
    ONE_PASS_MAX,
    build_prompt,
    last_logits,
    log_softmax,
    token_steps,
)
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig, make_sampler_and_processors, preset

CASES = {
    "persona": dataclasses.replace(preset("persona"), max_new_tokens=24, min_new_tokens=10, seed=3),
    "greedy": GenerationConfig(temperature=0.0, max_new_tokens=24, min_new_tokens=6, repetition_penalty=1.3,
                               no_repeat_ngram_size=3),
}
ENDS = [1, 106]


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model, tok = load_model(tiny_path)
    return model, build_prompt(tok, "G'day Bluey! What will we play in the backyard today, and who is it?")


def _pair(cfg, ids):
    return make_sampler_and_processors(cfg, prompt_tokens=ids, eos_token_ids=ENDS)


@pytest.mark.parametrize("repeat", [1, 12])
@pytest.mark.parametrize("name", list(CASES))
def test_the_tokens_are_mlx_lms_generate_steps(tiny, name, repeat):
    """Greedy and seeded sampling, the prompt in one pass, in chunks, or (over ONE_PASS_MAX tokens) all but
    its last token first: the tokens mlx-lm's loop gives."""
    model, ids = tiny
    ids = ids * repeat
    assert (len(ids) > ONE_PASS_MAX) == (repeat > 1)
    cfg = CASES[name]
    sampler, processors = _pair(cfg, ids)
    theirs = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=cfg.max_new_tokens, sampler=sampler,
                                          logits_processors=processors)]
    assert len(ids) > 12 and len(theirs) == cfg.max_new_tokens
    for chunk in (2048, 5):
        assert list(token_steps(model, ids, *_pair(cfg, ids), max_tokens=cfg.max_new_tokens,
                                prefill_step_size=chunk)) == theirs
    assert list(token_steps(model, ids, *_pair(cfg, ids), max_tokens=1)) == theirs[:1]


def test_a_cache_holds_only_what_was_yielded(tiny):
    """The prompt split over two calls on one cache gives the tokens of one call: the first call (one token)
    leaves the cache holding its prompt alone, no step computed past the token it handed out."""
    model, ids = tiny
    cfg = CASES["greedy"]
    whole = list(token_steps(model, ids, *_pair(cfg, ids), max_tokens=cfg.max_new_tokens))
    cache = make_prompt_cache(model)
    list(token_steps(model, ids[:7], *_pair(cfg, ids[:7]), max_tokens=1, prompt_cache=cache))
    assert cache[0].offset == 7
    tail = list(token_steps(model, ids[7:], *_pair(cfg, ids), max_tokens=cfg.max_new_tokens, prompt_cache=cache))
    assert tail == whole


@pytest.mark.parametrize("draw_path", ["mlx", "cpu"], indirect=True)
def test_the_first_token_waits_for_no_second_step(tiny, draw_path):
    """With MLX-op draws the next step is made (lazily) while a token is handed out; the CPU draw evaluates
    a step as it is made, so there the next one is made only after the token is out: the first token of a
    prompt costs one forward pass, not two."""
    model, ids = tiny
    cfg = CASES["greedy"]
    cache = make_prompt_cache(model)
    steps = token_steps(model, ids, *_pair(cfg, ids), max_tokens=cfg.max_new_tokens, prompt_cache=cache)
    first = next(steps)
    assert cache[0].offset == len(ids) + (draw_path == "mlx")
    rest = list(steps)
    assert [first, *rest] == list(token_steps(model, ids, *_pair(cfg, ids), max_tokens=cfg.max_new_tokens))
    assert cache[0].offset == len(ids) + cfg.max_new_tokens - 1


def test_last_logits_are_the_models_at_the_last_position(tiny):
    model, ids = tiny
    inputs = mx.array(ids)[None]
    want = model(inputs)[:, -1, :]
    got = last_logits(model, inputs, make_prompt_cache(model))
    assert got.shape == want.shape == (1, model.model.embed_tokens.weight.shape[0])
    assert mx.abs(got - want).max().item() < 1e-5

    class Other:  # not mlx-lm's Gemma 3: run as it is
        def __call__(self, inputs, cache=None):
            return mx.stack([inputs.astype(mx.float32), -inputs.astype(mx.float32)], axis=-1)

    assert last_logits(Other(), mx.array([[3, 4, 5]]), None).tolist() == [[5.0, -5.0]]


def test_log_softmax_is_logits_minus_logsumexp():
    rng = np.random.default_rng(0)
    x = mx.array((rng.normal(size=(1, 262144)) * 4).astype(np.float32))
    x = x.at[:, ENDS].add(-float("inf"))
    got, want = log_softmax()(x), x - mx.logsumexp(x, axis=-1, keepdims=True)
    assert np.isneginf(np.array(got[0, ENDS])).all()
    finite = mx.isfinite(want)
    assert mx.abs(mx.where(finite, got - want, 0.0)).max().item() < 1e-5
    assert mx.all(mx.isfinite(got) == finite).item()


def test_ids_in_vocab_are_distinct_sorted_int32_ids_inside_the_vocabulary():
    from mlx_persona.sampling.inputs import ids_in_vocab

    got = ids_in_vocab([5, -1, 3, np.int64(5), 99, 0, 10, 9], 10)
    assert got.dtype == mx.int32 and got.tolist() == [0, 3, 5, 9]
    empty = ids_in_vocab([], 10)
    assert empty.dtype == mx.int32 and empty.size == 0


def test_a_first_generation_imports_no_numpy_ma(tiny_path):
    """np.unique imports numpy.ma on its first call (60-380 ms of a process's first token here); the
    processors' set-up does without it. In a fresh process, as a user's first `generate` runs."""
    import subprocess
    import sys

    code = ("import sys, mlx_persona, mlx_persona.backend; mlx_persona.backend.setup(); "
            f"r = mlx_persona.generate({str(tiny_path)!r}, 'Hi Bluey!', 'persona', seed=0, max_new_tokens=3); "
            "print(len(r.tokens), 'numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["3", "False"]
