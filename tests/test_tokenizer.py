"""Tests for mlx_persona.data.tokenizer: lossless byte-level BPE, Gemma special tokens and chat template."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from mlx_persona.data.tokenizer import (
    GEMMA_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    make_config_portable,
    save_tokenizer,
    train_tokenizer,
    unwrap_tokenizer,
)

WORDS = (
    "the a dog cat ran jumped over under happy sad sunny rainy day park ball game mum dad "
    "played with friends and then went home for tea! why? because it's fun, really. café naïve "
    "über 東京 😀 1 2 42 3.14"
).split()


def synthetic_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """A few hundred deterministic sentences (ASCII, accents, CJK, emoji, digits)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(synthetic_corpus(), vocab_size=512)


CONVERSATION = [
    {"role": "system", "content": "You are Bingo."},
    {"role": "user", "content": "Hi there! "},
    {"role": "assistant", "content": " Hello!\n"},
    {"role": "user", "content": "Play?"},
    {"role": "assistant", "content": "Yes, let's play."},
]

EXPECTED = (
    "<bos><start_of_turn>user\nYou are Bingo.\n\nHi there!<end_of_turn>\n"
    "<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\nPlay?<end_of_turn>\n"
    "<start_of_turn>model\nYes, let's play.<end_of_turn>\n"
)


# --- special tokens and encoding -----------------------------------------------------------


def test_special_tokens_have_ids_0_to_5(tok):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [i]


def test_special_tokens_are_never_split(tok):
    ids = tok.encode("ab<start_of_turn>cd<end_of_turn>", add_special_tokens=False)
    assert 4 in ids and 5 in ids
    assert tok.decode(ids) == "ab<start_of_turn>cd<end_of_turn>"


def test_no_automatic_bos_or_eos(tok):
    ids = tok("hello")["input_ids"]
    assert ids == tok.encode("hello", add_special_tokens=False)
    assert 1 not in ids and 2 not in ids


def test_merges_were_learned(tok):
    # A trained vocabulary is more than bytes + specials, and frequent words compress.
    assert len(tok) > 256 + len(SPECIAL_TOKENS)
    assert len(tok.encode(" happy", add_special_tokens=False)) < len(" happy")


@pytest.mark.parametrize(
    "text",
    ["", " leading space", "trailing space ", "  two  spaces ", "tab\tand\r\nCRLF\n", "東京 😀 naïve",
     "e\u0301 combining", "\u0000nul and \uffff", "x <bos> y", "<end_of_turn>\n"],
)
def test_round_trip_known_strings(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # no time limits: the machine may be loaded
@given(text=st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_training_is_deterministic(tok):
    again = train_tokenizer(synthetic_corpus(), vocab_size=512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


# --- chat template ---------------------------------------------------------------------------


def test_template_multi_turn_with_system(tok):
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED


def test_template_generation_prompt_and_no_system(tok):
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert out == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_template_list_content(tok):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys"}]},
        {"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b"}]},
    ]
    out = tok.apply_chat_template(messages, tokenize=False)
    assert out == "<bos><start_of_turn>user\nSys\n\nab<end_of_turn>\n"


@pytest.mark.parametrize(
    "roles",
    [["user", "user"], ["assistant"], ["user", "assistant", "assistant"], ["system", "assistant"],
     ["user", "assistant", "user", "user"]],
)
def test_template_rejects_non_alternating_roles(tok, roles):
    messages = [{"role": r, "content": "x"} for r in roles]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template(messages, tokenize=False)


def test_template_tokenizes_to_single_special_tokens(tok):
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert ids[0] == 2 and ids[1] == 4
    assert ids.count(4) == 4 and ids.count(5) == 4
    assert tok.decode(ids) == EXPECTED


# --- saving and reloading ----------------------------------------------------------------------


SAMPLES = ["the dog ran", " 東京 😀", "x<end_of_turn>\n", EXPECTED]


def _assert_same_tokenizer(a, b):
    for text in SAMPLES:
        assert a.encode(text, add_special_tokens=False) == b.encode(text, add_special_tokens=False)
    assert a.chat_template == b.chat_template == GEMMA_CHAT_TEMPLATE
    assert a.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id) == (2, 1, 0, 3)
    assert set(a.all_special_ids) == set(range(6))
    assert a.decode(b.encode(SAMPLES[1], add_special_tokens=False)) == SAMPLES[1]


def test_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    # transformers.js reads the template from here only; transformers 4 needs these forms.
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    assert not isinstance(config.get("extra_special_tokens", {}), list)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_tokenizer(reloaded, tok)


def test_reload_save_reload_keeps_everything(tok, tmp_path):
    tok.save_pretrained(tmp_path / "a")
    first = AutoTokenizer.from_pretrained(tmp_path / "a")
    save_tokenizer(first, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE
    _assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "b"), tok)


def test_make_config_portable_reads_jinja_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}', encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}", encoding="utf-8")
    config = make_config_portable(tmp_path)
    assert config == {"chat_template": "{{ bos_token }}", "tokenizer_class": "PreTrainedTokenizerFast"}


def test_loads_in_mlx_lm(tok, tmp_path):
    from mlx_lm.utils import load_tokenizer

    tok.save_pretrained(tmp_path)
    wrapper = load_tokenizer(Path(tmp_path))
    assert wrapper.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    ids = tok.encode(SAMPLES[0], add_special_tokens=False)
    assert wrapper.encode(SAMPLES[0], add_special_tokens=False) == ids
    assert 1 in wrapper.eos_token_ids
    # mlx-lm's streaming detokenizer must reproduce the text too. (It drops one leading space of
    # the whole output by design, which never matters here: the template trims reply content.)
    text = "東京 😀 naïve, the dog ran!"
    detok = wrapper.detokenizer
    detok.reset()
    for t in tok.encode(text, add_special_tokens=False):
        detok.add_token(t)
    detok.finalize()
    assert detok.text == text


def test_unwrap_tokenizer(tok, tmp_path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    assert unwrap_tokenizer(tok) is tok
    assert unwrap_tokenizer(TokenizerWrapper(tok)) is tok
