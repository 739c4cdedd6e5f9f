"""Tests for mlx_persona.data.tokenizer: a lossless SentencePiece BPE tokenizer built like Gemma 3's (byte fallback,
`▁` for spaces, reserved ids, add_bos_token, tokenizer.model + tokenizer.json) and Gemma's chat template."""

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
    RESERVED_TOKENS,
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


def test_reserved_tokens_have_gemmas_ids(tok):
    # Gemma 3's layout: pad/eos/bos/unk 0..3, <mask> 4, [multimodal] 5, <unused0..98> 6..104, the turn markers.
    assert tok.convert_tokens_to_ids(RESERVED_TOKENS) == list(range(107))
    assert RESERVED_TOKENS[:6] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"]
    assert RESERVED_TOKENS[6] == "<unused0>" and RESERVED_TOKENS[104] == "<unused98>"
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    for i, token in enumerate(RESERVED_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [i]
    assert set(tok.all_special_ids) == {0, 1, 2, 3, 4, 105, 106}


def test_special_tokens_are_never_split(tok):
    ids = tok.encode("ab<start_of_turn>cd<end_of_turn><unused7>", add_special_tokens=False)
    assert 105 in ids and 106 in ids and 13 in ids
    assert tok.decode(ids) == "ab<start_of_turn>cd<end_of_turn><unused7>"
    assert tok.decode(ids, skip_special_tokens=True) == "abcd<unused7>"


def test_bos_is_added_like_gemmas(tok):
    # Gemma's add_bos_token: <bos> first when special tokens are added, never an <eos>.
    assert tok.add_bos_token is True and tok.add_eos_token is False
    assert tok("hello")["input_ids"] == [2] + tok.encode("hello", add_special_tokens=False)
    assert 1 not in tok("hello")["input_ids"]
    assert 2 not in tok.encode("hello", add_special_tokens=False)


def test_merges_were_learned(tok):
    # A trained vocabulary is more than reserved + byte pieces, and frequent words compress.
    assert len(tok) > len(RESERVED_TOKENS) + 256
    assert len(tok.encode(" happy", add_special_tokens=False)) < len(" happy")


def test_spaces_are_pieces_and_unseen_characters_fall_back_to_bytes(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode(" happy dog", add_special_tokens=False))
    assert pieces[0].startswith("▁") and all(" " not in p for p in pieces)
    # Ω and ß are not in the training texts: their UTF-8 bytes, never <unk>.
    ids = tok.encode("Ωß", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["<0xCE>", "<0xA9>", "<0xC3>", "<0x9F>"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == "Ωß"


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
    with pytest.raises(ValueError, match="vocab_size must be more than 363"):
        train_tokenizer(["abc"], vocab_size=100)
    # Room for the reserved and byte pieces but not for every character of the texts.
    with pytest.raises(ValueError, match="too small for these texts: .* need at least 4"):
        train_tokenizer(synthetic_corpus(50), vocab_size=370)


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
    assert ids[0] == 2 and ids[1] == 105 and ids.count(2) == 1  # the template's <bos>, not a second one
    assert ids.count(105) == 4 and ids.count(106) == 4
    assert tok.decode(ids) == EXPECTED


# --- saving and reloading ----------------------------------------------------------------------


SAMPLES = ["the dog ran", " 東京 😀", "x<end_of_turn>\n", EXPECTED]


def _assert_same_tokenizer(a, b):
    for text in SAMPLES:
        assert a.encode(text, add_special_tokens=False) == b.encode(text, add_special_tokens=False)
    assert a.chat_template == b.chat_template == GEMMA_CHAT_TEMPLATE
    assert a.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id) == (2, 1, 0, 3)
    assert set(a.all_special_ids) == {0, 1, 2, 3, 4, 105, 106}
    assert a("hi")["input_ids"][0] == 2  # (transformers 5 reports add_bos_token False once reloaded; it adds it)
    assert a.decode(b.encode(SAMPLES[1], add_special_tokens=False)) == SAMPLES[1]


def test_save_and_reload_with_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    # transformers.js reads the template from here only; transformers 4 needs these forms.
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE
    assert config["tokenizer_class"] == "GemmaTokenizer"
    assert config["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]
    assert config["add_bos_token"] is True and "vocab_file" not in config
    assert not isinstance(config.get("extra_special_tokens", {}), list)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.sp_model_proto
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    _assert_same_tokenizer(reloaded, tok)


def test_reload_save_reload_keeps_everything(tok, tmp_path):
    tok.save_pretrained(tmp_path / "a")
    first = AutoTokenizer.from_pretrained(tmp_path / "a")
    save_tokenizer(first, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == GEMMA_CHAT_TEMPLATE
    assert config["add_bos_token"] is True and "vocab_file" not in config
    # The SentencePiece model travels with a reloaded tokenizer too.
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == tok.sp_model_proto
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


STREAMED = [" leading space", "  two  spaces", "東京 😀 naïve, the dog ran!", "Ωß 42\n\n end ", "\n\tx",
            "<start_of_turn>model\n Hi<end_of_turn>"]


@pytest.mark.parametrize("text", STREAMED)
def test_mlx_lm_streaming_detokenizer_equals_transformers_decode(tok, tmp_path, text):
    # mlx-lm picks its SentencePiece streaming detokenizer for Gemma's decoder, without trimming the
    # first space: token by token it must build exactly what transformers' decode returns.
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer
    from mlx_lm.utils import load_tokenizer

    tok.save_pretrained(tmp_path)
    detok = load_tokenizer(Path(tmp_path)).detokenizer
    assert isinstance(detok, SPMStreamingDetokenizer) and detok.trim_space is False
    ids = tok.encode(text, add_special_tokens=False)
    detok.reset()
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.text)
    detok.finalize()
    assert detok.text == tok.decode(ids) == text
    assert all(text.startswith(part) for part in seen)


# --- the SentencePiece model and the converted tokenizer.json ------------------------------------


def test_sentencepiece_model_is_gemmas_kind(tok):
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tok.sp_model_proto)
    spec, norm = model.trainer_spec, model.normalizer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert (spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id) == (0, 1, 2, 3)
    assert not norm.add_dummy_prefix and not norm.remove_extra_whitespaces and norm.name == "identity"
    kinds = {p.piece: p.type for p in model.pieces}
    assert kinds["<bos>"] == kinds["<eos>"] == kinds["<pad>"] == 3 and kinds["<unk>"] == 2  # control, unknown
    assert kinds["<start_of_turn>"] == kinds["<mask>"] == 4 and kinds["<0x41>"] == 6  # user-defined, byte
    backend = json.loads(tok.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE" and backend["model"]["byte_fallback"] is True
    assert backend["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert [d["type"] for d in backend["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(WORDS + [" ", "  ", "\n", "\n\n", "\t", "<end_of_turn>", "Ω", "x"]),
                     max_size=12).map("".join) | st.text(max_size=40))
def test_sentencepiece_and_tokenizer_json_encode_alike(tok, text):
    # Converters that read tokenizer.model (llama.cpp's, transformers' own) must see the same ids.
    sp = _sp_processor(tok)
    assert sp.encode(text) == tok.encode(text, add_special_tokens=False)


_SP = {}


def _sp_processor(tok):
    import sentencepiece as spm

    if id(tok) not in _SP:
        _SP[id(tok)] = spm.SentencePieceProcessor(model_proto=tok.sp_model_proto)
    return _SP[id(tok)]


def test_folder_with_only_tokenizer_model_loads_the_same(tok, tmp_path):
    # transformers converts tokenizer.model itself when tokenizer.json is missing (as for an old Gemma folder).
    tok.save_pretrained(tmp_path / "full")
    (tmp_path / "spm").mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / "spm" / name).write_bytes((tmp_path / "full" / name).read_bytes())
    converted = AutoTokenizer.from_pretrained(tmp_path / "spm")
    assert not (tmp_path / "spm" / "tokenizer.json").exists()
    for text in SAMPLES + STREAMED:
        assert converted(text)["input_ids"] == tok(text)["input_ids"]


def test_unwrap_tokenizer(tok, tmp_path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    assert unwrap_tokenizer(tok) is tok
    assert unwrap_tokenizer(TokenizerWrapper(tok)) is tok
