"""Generation against the reference: transformers' `generate` on the same weights."""

import json

import mlx.core as mx
import pytest
import torch
from transformers import AutoModelForCausalLM

import mlx_persona
from mlx_persona.chat import ChatSession, run_chat
from mlx_persona.generation import build_prompt, end_token_ids, generate
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig, preset


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path)


@pytest.fixture(scope="module")
def hf_tiny(tiny_path):
    return AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32).eval()


def test_end_ids_include_eos_and_end_of_turn(tiny, tiny_path):
    _, tok = tiny
    ids = end_token_ids(tok, tiny_path)
    hf = tok._tokenizer
    assert hf.convert_tokens_to_ids("<eos>") in ids and hf.convert_tokens_to_ids("<end_of_turn>") in ids
    assert json.loads((tiny_path / "generation_config.json").read_text())["eos_token_id"] == ids


def test_a_plain_transformers_tokenizer_works_like_the_wrapper(tiny, tiny_path):
    """The wrapper and the transformers tokenizer inside it give the same prompt and end ids (a fast
    tokenizer's own `_tokenizer` is the raw `tokenizers.Tokenizer`, which must not be mistaken for it)."""
    _, tok = tiny
    inner = tok._tokenizer
    messages = [{"role": "user", "content": "G'day Bluey!"}]
    assert build_prompt(inner, messages, system="Be Bluey.") == build_prompt(tok, messages, system="Be Bluey.")
    assert build_prompt(inner, "hi", chat_template=False) == build_prompt(tok, "hi", chat_template=False)
    assert end_token_ids(inner, tiny_path) == end_token_ids(tok, tiny_path)


@pytest.mark.parametrize("settings", [
    dict(min_new_tokens=12, repetition_penalty=1.3, max_new_tokens=30),
    dict(min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=2, max_new_tokens=24),
])
def test_greedy_tokens_equal_transformers_generate(tiny, hf_tiny, tiny_path, settings):
    model, tok = tiny
    messages = [{"role": "user", "content": "G'day Bluey! What will we play in the backyard today?"}]
    ids = build_prompt(tok, messages)
    cfg = GenerationConfig(temperature=0.0, **settings)
    ours = generate(model, tok, ids, cfg, end_ids=end_token_ids(tok, tiny_path))
    ref = hf_tiny.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, pad_token_id=0, **settings)[0, len(ids):].tolist()
    eos = set(end_token_ids(tok, tiny_path))
    ref = ref[:next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    assert ours.tokens == ref
    assert ours.generated_tokens >= settings["min_new_tokens"]


def test_min_new_tokens_suppresses_every_end_id(tiny, tiny_path):
    """With the end ids as the only likely tokens, a reply still runs to min_new_tokens."""
    model, tok = tiny
    end = end_token_ids(tok, tiny_path)
    # Bias the model towards ending at once by stopping on *every* token except a few, then check
    # min_new_tokens keeps it going: end_ids here are all ids but the first 50.
    vocab = model.model.embed_tokens.weight.shape[0]
    many_ends = sorted(set(range(50, vocab)) | set(end))
    cfg = GenerationConfig(temperature=0.0, min_new_tokens=8, max_new_tokens=20)
    result = generate(model, tok, "Hi!", cfg, end_ids=many_ends)
    assert result.generated_tokens >= 8
    assert all(t < 50 for t in result.tokens[:8])


def greedy_reference(model, ids: list[int], n: int, end_ids=()) -> tuple[list[int], bool]:
    """Plain argmax decoding, the whole sequence re-run at every step (no cache, no logits processors):
    the tokens before the first end id, and whether one came."""
    out: list[int] = []
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        if token in end_ids:
            return out, True
        out.append(token)
    return out, False


def test_stop_reasons_and_stats(tiny):
    model, tok = tiny
    ids = build_prompt(tok, "Hello!")
    ends = end_token_ids(tok)  # generate's default end ids
    # At max_new_tokens, or on an end id (not part of the reply): the reference says which.
    r = generate(model, tok, "Hello!", GenerationConfig(temperature=0.0, max_new_tokens=5))
    want, ended = greedy_reference(model, ids, 5, ends)
    assert r.tokens == want and r.generated_tokens == len(want)
    assert r.stop_reason == ("end_token" if ended else "length")
    # The streamed text is transformers' decode of the tokens, a leading space included (mlx-lm's
    # SentencePiece detokenizer keeps it for Gemma's decoder).
    reply = tok.decode
    assert r.text == reply(want)
    assert r.prompt_tokens == len(ids) and r.prompt_tps > 0 and (r.decode_tps > 0 or len(want) < 2)
    full = generate(model, tok, "Hello!", GenerationConfig(temperature=0.0, max_new_tokens=40, min_new_tokens=40))
    assert full.stop_reason == "length" and full.generated_tokens == 40
    assert full.tokens[:len(want)] == want
    # An end id the model does produce: the reply is the tokens before its first appearance.
    k = next(i for i, t in enumerate(full.tokens) if i >= 2 and t not in full.tokens[:i])
    ended = generate(model, tok, "Hello!", GenerationConfig(temperature=0.0, max_new_tokens=40),
                     end_ids=[full.tokens[k]])
    assert ended.stop_reason == "end_token" and ended.tokens == full.tokens[:k] and ended.generated_tokens == k
    # A stop string: the text up to it, the tokens up to the one that completed it.
    text = full.text
    stop = text[3:6]
    cut = generate(model, tok, "Hello!", GenerationConfig(temperature=0.0, max_new_tokens=40, min_new_tokens=40,
                                                          stop=[stop]))
    assert cut.stop_reason == "stop_string" and cut.text == text[:text.find(stop)]
    n = len(cut.tokens)
    assert cut.tokens == full.tokens[:n] and stop in reply(full.tokens[:n]) and stop not in reply(full.tokens[:n - 1])


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    cfg = preset("persona")
    cfg.max_new_tokens, cfg.min_new_tokens, cfg.seed = 20, 5, 7
    a = generate(model, tok, "Tell me a story.", cfg)
    b = generate(model, tok, "Tell me a story.", cfg)
    cfg.seed = 8
    c = generate(model, tok, "Tell me a story.", cfg)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_top_level_generate_takes_a_spec(tiny, tiny_path):
    """A model spec (a folder or builtin:NAME) is loaded and gives what the loaded model gives."""
    model, tok = tiny
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=4)
    want = generate(model, tok, "Hi!", cfg)
    assert want.tokens == greedy_reference(model, build_prompt(tok, "Hi!"), 4, end_token_ids(tok))[0]
    for spec in (str(tiny_path), "builtin:tiny"):
        r = mlx_persona.generate(spec, "Hi!", cfg)
        assert (r.tokens, r.text, r.stop_reason) == (want.tokens, want.text, want.stop_reason), spec


def test_chat_pipe_mode_one_reply_per_line(tiny):
    import io

    model, tok = tiny
    session = ChatSession(model, tok, GenerationConfig(temperature=0.0, max_new_tokens=6), system="You are Bluey.")
    out, err = io.StringIO(), io.StringIO()
    run_chat(session, io.StringIO("Hi!\n/settings max_new_tokens=3\nWhat now?\n/reset\nAgain?\n/settings bogus=1\n"),
             out, err, interactive=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert len(session.history) == 2  # reset before "Again?"
    assert "max_new_tokens=3" in err.getvalue() and "error:" in err.getvalue()


@pytest.mark.parametrize("stops", [["lo wor"], ["o w", "zzz"], ["world!"], ["xyz"]])
def test_a_stream_never_shows_what_a_stop_string_trims(tiny, stops):
    """The streamed pieces, joined, are the final text at every step: a stop string spanning several tokens
    is held back while it may still be one, and released when it turns out not to be (or at the end)."""
    from mlx_persona.generation import ReplyText

    _, tokenizer = tiny
    ids = tokenizer.encode("hello world, hello wand", add_special_tokens=False)
    reply = ReplyText(tokenizer, stops)
    shown = ""
    for t in ids:
        shown += reply.add(t)
        assert reply.text.startswith(shown)
        if reply.stopped:
            break
    shown += reply.finish()
    assert shown == reply.text
    full = tokenizer.decode(ids)
    cut = min((full.find(s) for s in stops if s in full), default=len(full))
    assert reply.text == full[:cut]


def test_ids_past_the_tokenizers_pieces_have_no_text(tiny):
    """A built-in Gemma-shape model has 262,144 embedding rows and a 2,048-piece tokenizer: a sampled id
    past the pieces adds nothing to the reply, as in transformers' decode (mlx-lm's SentencePiece
    detokenizer raised IndexError: `generate` and `serve` crashed on builtin:gemma-3-270m)."""
    from mlx_persona.data.tokenizer import unwrap_tokenizer
    from mlx_persona.generation import ReplyText

    _, tokenizer = tiny
    hf = unwrap_tokenizer(tokenizer)
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    padded = [ids[0], len(hf), *ids[1:], 262143]
    reply = ReplyText(tokenizer, [])
    shown = "".join(reply.add(t) for t in padded) + reply.finish()
    assert shown == reply.text == hf.decode(padded) == hf.decode(ids)
