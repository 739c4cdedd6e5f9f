"""Batched generation against the unbatched `generate` on the built-in tiny model (sliding window 16: every
prompt plus its reply crosses it): each row's tokens, text and stop reason, and the distribution a sampled
row draws from at every step. Rows of different lengths finish at different steps, so queued prompts take
their places mid-run (batch 2 of 5)."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_persona.batch_generation import (
    batch_generate,
    default_batch_size,
    kv_bytes_per_row,
)
from mlx_persona.cli import main
from mlx_persona.generation import build_prompt, end_token_ids, generate
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig, process_logits
from mlx_persona.sampling.sampler import HFSampler

PROMPTS = ["Hi!", "G'day Bluey! What will we play in the backyard today?",
           "Tell me everything about Bingo, the long game of keepy uppy with the balloon and what Dad said",
           "Dad?", "Can we go to the beach, Mum?"]  # 14, 26, 34, 15 and 21 tokens
PRO = 792  # "...": the random model's greedy replies say it early; made an end id below so that rows end early


@pytest.fixture(scope="module")
def tiny(tiny_path):
    model, tok = load_model(tiny_path)
    return model, tok, end_token_ids(tok, tiny_path)


def unbatched(tiny, configs, end_ids):
    model, tok, _ = tiny
    return [generate(model, tok, p, c, end_ids=end_ids) for p, c in zip(PROMPTS, configs)]


def same(got, want):
    return [(g.tokens, g.text, g.stop_reason) for g in got] == [(w.tokens, w.text, w.stop_reason) for w in want]


def test_greedy_rows_equal_unbatched_generation(tiny, draw_path):
    model, tok, ends = tiny
    end_ids = ends + [PRO]
    configs = [GenerationConfig(temperature=0.0, max_new_tokens=40, min_new_tokens=8, repetition_penalty=1.3),
               GenerationConfig(temperature=0.0, max_new_tokens=30, no_repeat_ngram_size=2),
               GenerationConfig(temperature=0.0, max_new_tokens=36, repetition_penalty=1.2),
               GenerationConfig(temperature=0.0, max_new_tokens=40, min_new_tokens=5, no_repeat_ngram_size=3),
               GenerationConfig(temperature=0.0, max_new_tokens=20)]
    want = unbatched(tiny, configs, end_ids)
    # The case is what it claims: rows end on an end id and on the length, at different steps, one of them
    # only after min_new_tokens held the end id back (without it, the first row says "..." seventh).
    assert {w.stop_reason for w in want} == {"end_token", "length"}
    assert len({w.generated_tokens for w in want}) >= 4
    alone = generate(model, tok, PROMPTS[0], dataclasses.replace(configs[0], min_new_tokens=0), end_ids=end_ids)
    assert alone.stop_reason == "end_token" and alone.generated_tokens < 8 <= want[0].generated_tokens

    steps = []
    for batch_size in (2, 5):
        got = batch_generate(model, tok, PROMPTS, configs, batch_size=batch_size, end_ids=end_ids,
                             on_logits=lambda i, step, _, b=batch_size: steps.append((b, i, step)))
        assert same(got, want), batch_size
    # With 2 rows at a time the third prompt starts as soon as one of the first two ends, while the other
    # is still decoding.
    order = [(i, s) for b, i, s in steps if b == 2]
    last = [order.index((i, want[i].generated_tokens - (want[i].stop_reason == "length"))) for i in (0, 1)]
    assert min(last) < order.index((2, 0)) < max(last)


def test_stop_strings_per_row(tiny):
    model, tok, ends = tiny
    plain = unbatched(tiny, [GenerationConfig(temperature=0.0, max_new_tokens=30)] * 5, ends)
    # Each row's own stop string: a piece of its own reply, found at a different place in each.
    stops = [w.text[6 + 3 * k: 9 + 3 * k] for k, w in enumerate(plain)]
    configs = [GenerationConfig(temperature=0.0, max_new_tokens=30, stop=[s]) for s in stops]
    want = unbatched(tiny, configs, ends)
    assert {w.stop_reason for w in want} == {"stop_string"} and len({len(w.text) for w in want}) == 5
    assert same(batch_generate(model, tok, PROMPTS, configs, batch_size=2, end_ids=ends), want)


def _finite_close(got: np.ndarray, want: np.ndarray, tol: float) -> bool:
    excluded = np.isneginf(want)
    return bool((np.isneginf(got) == excluded).all() and np.abs(got[~excluded] - want[~excluded]).max() < tol)


def _draw(cfg: GenerationConfig, step: int, logprobs: np.ndarray) -> int:
    """The token a row seeded as `cfg` draws at `step` from `logprobs` (its key chain split once per token)."""
    sampler = HFSampler(cfg)
    for _ in range(step):
        sampler(mx.zeros((1, logprobs.shape[-1])))
    return int(sampler(mx.array(logprobs)[None]).item())


def test_sampled_rows_draw_from_the_unbatched_distribution(tiny, draw_path):
    """At every step a sampled row's sampler is given what process_logits makes of the model's logits for that
    row's history alone (a fresh forward pass, no cache), and draws from it with the row's own key; so its
    seeded draws are the unbatched ones, except where a draw is a rounding near-tie.

    A draw depends on the last bits of the probabilities: one row of the batch and the unbatched decode
    (sgemv instead of sgemm) differ by ~1e-6, and with MLX_PERSONA_JIT=0 and OpenBLAS's AVX-512 kernels row
    3 drew token 1379 batched, 1380 unbatched, at step 14. Such a step is a near-tie: the draw from the
    fresh forward pass's probabilities (a third rounding of the same distribution) is one of the two. After
    it the histories differ, so that row is compared no further; at most one row may have one."""
    model, tok, ends = tiny
    end_ids = ends + [PRO]
    base = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.02, "max_new_tokens": 24}
    configs = [GenerationConfig(**base, min_new_tokens=6, repetition_penalty=1.2, seed=0),
               GenerationConfig(**base, no_repeat_ngram_size=3, seed=1),
               GenerationConfig(**base, min_new_tokens=20, repetition_penalty=1.5, no_repeat_ngram_size=2, seed=2),
               GenerationConfig(**{**base, "top_k": 0}, repetition_penalty=1.1, seed=3),
               GenerationConfig(**{**base, "temperature": 1.3}, seed=4)]
    seen: dict[tuple[int, int], np.ndarray] = {}

    def keep(i, step, logprobs):
        seen[i, step] = np.array(logprobs)

    got = batch_generate(model, tok, PROMPTS, configs, batch_size=3, end_ids=end_ids, on_logits=keep)
    want = unbatched(tiny, configs, end_ids)
    near_ties = []
    for i, (prompt, cfg, row, ref) in enumerate(zip(PROMPTS, configs, got, want)):
        ids = build_prompt(tok, prompt)
        processors_only = dataclasses.replace(cfg, temperature=0.0)  # the warpers are the sampler's
        steps = len(row.tokens) + (row.stop_reason == "end_token")
        for step in range(steps):
            history = ids + row.tokens[:step]
            logits = model(mx.array([history]))[0, -1]
            fresh = np.array(process_logits(processors_only, history, logits, prompt_length=len(ids),
                                            eos_token_ids=end_ids))
            assert _finite_close(seen[i, step], fresh, 1e-5), (i, step)
            drawn = row.tokens[step] if step < len(row.tokens) else None
            if drawn is not None:
                assert _draw(cfg, step, seen[i, step]) == drawn, (i, step)  # its own key, what it was given
            if near_ties and near_ties[-1][0] == i:
                continue  # past this row's near-tie: another history than the unbatched row's
            theirs = ref.tokens[step] if step < len(ref.tokens) else None
            if drawn != theirs:
                assert drawn is not None and theirs is not None, (i, step, row, ref)
                assert _draw(cfg, step, fresh) in (drawn, theirs), (i, step, drawn, theirs)
                near_ties.append((i, step, drawn, theirs))
        if not (near_ties and near_ties[-1][0] == i):
            assert same([row], [ref]), i
    assert len(seen) == sum(len(r.tokens) + (r.stop_reason == "end_token") for r in got)
    print(f"sampled rows: near-ties {near_ties} in {len(seen)} draws")
    assert len(near_ties) <= 1, near_ties


def test_kv_bytes_and_default_batch_size(tiny, tiny_path):
    model, _, _ = tiny
    cfg = json.loads((tiny_path / "config.json").read_text())
    per_position = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # keys and values, float32
    sliding = cfg["layer_types"].count("sliding_attention")
    full = cfg["layer_types"].count("full_attention")
    for tokens in (10, 100):
        assert kv_bytes_per_row(model, tokens) == per_position * (sliding * min(tokens, 16) + full * tokens)
    row = kv_bytes_per_row(model, 100) + 8 * 4 * cfg["vocab_size"]
    assert default_batch_size(model, 100, available=4 * 3 * row + 3) == 3
    assert default_batch_size(model, 100, available=row) == 1  # never 0
    assert default_batch_size(model, 100, available=10**12) == 16  # capped


def _eval(prompts, out, batch_size):
    return CliRunner().invoke(main, ["eval", "--model", "builtin:tiny", "--prompts", str(prompts), "--seeds", "0",
                                     "--temperature", "0", "--min-new-tokens", "4", "--repetition-penalty", "1.2",
                                     "--max-new-tokens", "12", "--no-valid", "--batch-size", str(batch_size),
                                     "-o", str(out)], catch_exceptions=False)


def test_eval_results_do_not_depend_on_the_batch_size(tiny, tmp_path):
    model, tok, ends = tiny
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    rows = {}
    for batch_size in (4, 1):
        result = _eval(prompts, tmp_path / f"b{batch_size}", batch_size)
        assert result.exit_code == 0, result.output
        assert f"{len(PROMPTS)} replies, {batch_size} at a time" in result.output
        lines = (tmp_path / f"b{batch_size}" / "results.jsonl").read_text().splitlines()
        rows[batch_size] = [{k: v for k, v in json.loads(line).items() if k != "decode_tps"} for line in lines]
    assert rows[4] == rows[1] and len(rows[4]) == len(PROMPTS)
    cfg = GenerationConfig(temperature=0.0, min_new_tokens=4, repetition_penalty=1.2, max_new_tokens=12)
    assert [r["tokens"] for r in rows[4]] == [generate(model, tok, p, cfg, end_ids=ends).tokens for p in PROMPTS]
    bad = _eval(prompts, tmp_path / "bad", -1)
    assert bad.exit_code != 0 and "--batch-size" in bad.output


def test_the_batch_steps_with_the_rows_spread_over_cpu_streams(tiny):
    """batch_generator's long-lived GenerationBatch is ours (mlx_persona.batch_step): a new mlx-lm that
    changes it makes this fail rather than silently fall back to the single-stream step."""
    from mlx_persona.batch_step import batch_generator, streamed_step

    gen = batch_generator(tiny[0], 2)
    try:
        assert type(gen._generation_batch) is streamed_step()
    finally:
        gen.close()
