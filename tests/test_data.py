"""Tests for mlx_persona.data: formats, validation, rendering, loss masks, length policy and stats."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_persona.data import (
    DataError,
    EncodedDataset,
    Example,
    compute_stats,
    encode_example,
    format_stats,
    load_jsonl,
    load_splits,
    prepare_dataset,
    render,
    template_supports_system,
)
from mlx_persona.data.tokenizer import train_tokenizer

WORDS = "the a dog cat ran jumped happy sunny day park ball game mum dad played with friends home tea café 😀"
WORDS = WORDS.split()


def synthetic_corpus(n: int = 300, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(synthetic_corpus(), vocab_size=512)


def write(tmp_path, content, name="data.jsonl"):
    """Write str (as UTF-8) or bytes to a file and return its path."""
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jl(*objs) -> str:
    """JSONL text from objects (strings are taken as raw lines)."""
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs)


def chat(*pairs, system=None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs}


def problems_of(path, **kwargs) -> list[str]:
    with pytest.raises(DataError) as info:
        load_jsonl(path, **kwargs)
    return info.value.problems


GOOD = chat(("Hi", "Hello!"))


# --- formats ---------------------------------------------------------------------------------


def test_all_formats_normalize(tmp_path):
    path = write(tmp_path, jl(
        chat(("Hi", "Hello!"), ("Ball?", "Yes."), system="Be Bingo."),
        {"instruction": "Add", "input": "2 and 2", "response": "4", "system": "Be exact."},
        {"instruction": "Say hi", "input": "", "response": "hi"},
        {"prompt": "Q", "completion": "A", "id": 7},
        {"text": "Once upon a time."},
    ))
    ex = load_jsonl(path)
    assert [e.source for e in ex] == [f"{path}:{i}" for i in range(1, 6)]
    assert ex[0].messages[0] == {"role": "system", "content": "Be Bingo."} and len(ex[0].messages) == 5
    assert ex[1].messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert ex[2].messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert ex[3].messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert ex[4].messages == [] and ex[4].text == "Once upon a time."
    assert all(e.text is None for e in ex[:4])


def test_bom_crlf_and_blank_lines(tmp_path):
    body = jl(GOOD, "", "   ", chat(("a", "b"))).replace("\n", "\r\n")
    path = write(tmp_path, b"\xef\xbb\xbf" + body.encode("utf-8"))
    ex = load_jsonl(path)
    assert [e.source for e in ex] == [f"{path}:1", f"{path}:4"]
    assert ex[1].messages[1]["content"] == "b"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert info.value.problems == [f"{path}: no such file"]
    assert str(info.value) == f"{path}: no such file"


# --- malformed files: every problem reported as path:line: reason ----------------------------

MALFORMED = [
    # (file content, line, reason fragment, load_jsonl kwargs)
    ("", None, "empty file", {}),
    ("\n  \n\r\n", None, "empty file", {}),
    (jl(GOOD, '{"messages": [}'), 2, "bad JSON: Expecting value (column 15)", {}),
    (jl(GOOD, "[1, 2]"), 2, "expected a JSON object, got array", {}),
    (jl(GOOD, '"just a string"'), 2, "expected a JSON object, got string", {}),
    (jl({"question": "q", "answer": "a"}), 1,
     "unknown format: keys found 'question', 'answer'; accepted formats: messages; instruction/response; "
     "prompt/completion; text", {}),
    (jl({"prompt": "q", "completion": "a", "text": "t"}), 1, "ambiguous format", {}),
    (jl({"messages": "hi"}), 1, "'messages' must be a non-empty array", {}),
    (jl({"messages": []}), 1, "'messages' must be a non-empty array of {role, content} objects, got an empty array",
     {}),
    (jl({"messages": ["hi"]}), 1, "messages[0] must be an object with 'role' and 'content', got string", {}),
    (jl({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}), 1,
     "messages[0] (user): 'content' must be a string, got number", {}),
    (jl({"messages": [{"role": 1, "content": "x"}]}), 1, "messages[0]: 'role' must be a string, got number", {}),
    (jl({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), 1,
     "messages[0] (user): missing 'content'", {}),
    (jl({"messages": [{"content": "x"}]}), 1, "messages[0]: missing 'role'", {}),
    (jl(GOOD, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}), 2,
     "messages[1] (assistant): 'content' is empty", {}),
    (jl({"messages": [{"role": "user", "content": " \t\n"}, {"role": "assistant", "content": "x"}]}), 1,
     "messages[0] (user): 'content' is empty", {}),
    (jl({"messages": [{"role": "bot", "content": "x"}]}), 1,
     "messages[0]: unknown role 'bot' (expected one of: system, user, assistant)", {}),
    (jl({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}), 1,
     "messages[0]: expected 'user', got 'assistant'", {}),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}), 1,
     "messages[1]: expected 'assistant', got 'user'", {}),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "user", "content": "z"}]}), 1,
     "messages[2]: the conversation ends with a user message; it must end with an assistant reply", {}),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                      {"role": "assistant", "content": "y"}]}), 1,
     "messages[1]: a system message is only allowed as the first message", {}),
    (jl({"messages": [{"role": "system", "content": "s"}]}), 1, "only a system message", {}),
    (jl(GOOD, chat(("x", "y"), system="s")), 2,
     "messages[0]: a system message, but the chat template has no system role", {"system_ok": False}),
    (jl({"instruction": "i", "response": "r", "system": "s"}), 1,
     "'system': the chat template has no system role", {"system_ok": False}),
    (jl({"instruction": "i"}), 1, "missing 'response'", {}),
    (jl({"instruction": 5, "response": "r"}), 1, "'instruction' must be a string, got number", {}),
    (jl({"instruction": "i", "response": "r", "input": ["x"]}), 1, "'input' must be a string, got array", {}),
    (jl({"prompt": "p", "completion": None}), 1, "'completion' must be a string, got null", {}),
    (jl({"prompt": "  ", "completion": "c"}), 1, "'prompt' is empty", {}),
    (jl({"text": ""}), 1, "'text' is empty", {}),
    (jl({"text": "t", "system": "s"}), 1, "key 'system' is only used by the instruction/response format", {}),
    (jl(GOOD, {"prompt": "x", "completion": "y"}, GOOD), 3, "duplicate of line 1", {}),
    # Same conversation up to whitespace the template trims away, in another format.
    (jl({"prompt": "Hi ", "completion": "Hello!"}, GOOD), 2, "duplicate of line 1", {}),
    (jl(GOOD).encode() + b'{"text": "caf\xe9"}\n', 2, "invalid UTF-8 at byte 14 of the line (b'\\xe9')", {}),
    # A BOM is only accepted at the start of the file.
    (jl(GOOD, {"text": "t"}).encode() + b"\xef\xbb\xbf" + jl({"text": "u"}).encode(), 3,
     "bad JSON: Unexpected UTF-8 BOM", {}),
]


@pytest.mark.parametrize("content,line,reason,kwargs", MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_file_reports_path_and_line(tmp_path, content, line, reason, kwargs):
    path = write(tmp_path, content)
    problems = problems_of(path, **kwargs)
    assert len(problems) == 1, problems
    prefix = f"{path}: " if line is None else f"{path}:{line}: "
    assert problems[0].startswith(prefix + reason), problems[0]


def test_whole_file_is_validated(tmp_path):
    path = write(tmp_path, jl(
        "{bad",
        GOOD,
        {"prompt": "p"},
        {"messages": [{"role": "bot", "content": ""}, {"role": "user", "content": 1}]},
        GOOD,
    ))
    problems = problems_of(path)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n}" for n in (1, 3, 4, 4, 5)]
    assert problems[1] == f"{path}:3: missing 'completion'"
    assert problems[4] == f"{path}:5: duplicate of line 2"


def test_max_problems_summarizes_the_rest(tmp_path):
    path = write(tmp_path, jl(*["[]"] * 60))
    problems = problems_of(path, max_problems=5)
    assert len(problems) == 6
    assert problems[4] == f"{path}:5: expected a JSON object, got array"
    assert problems[5] == f"{path}: ... and 55 more problems"
    assert len(problems_of(path)) == 51  # default max_problems=50


# --- splits ----------------------------------------------------------------------------------


def test_load_splits_from_folder(tmp_path):
    write(tmp_path, jl(GOOD, chat(("a", "b"))), "train.jsonl")
    write(tmp_path, jl(chat(("c", "d"))), "valid.jsonl")
    train, valid = load_splits(tmp_path)
    assert len(train) == 2 and len(valid) == 1
    assert valid[0].source == f"{tmp_path / 'valid.jsonl'}:1"


def test_load_splits_without_valid(tmp_path):
    train_path = write(tmp_path, jl(GOOD), "train.jsonl")
    assert load_splits(tmp_path) == (load_jsonl(train_path), [])
    assert load_splits(train_path)[1] == []


def test_load_splits_reports_overlap_and_both_files(tmp_path):
    train_path = write(tmp_path, jl(GOOD, chat(("a", "b")), "[]"), "t.jsonl")
    valid_path = write(tmp_path, jl(chat(("x", "y")), {"prompt": "a", "completion": "b"}, "{"), "v.jsonl")
    with pytest.raises(DataError) as info:
        load_splits(train_path, valid_path)
    problems = info.value.problems
    assert problems[0].startswith(f"{train_path}:3: expected a JSON object")
    assert problems[1].startswith(f"{valid_path}:3: bad JSON")
    # Each file's problems stop the loading of that file, so overlap is checked once both parse.
    write(tmp_path, jl(GOOD, chat(("a", "b"))), "t.jsonl")
    write(tmp_path, jl(chat(("x", "y")), {"prompt": "a", "completion": "b"}), "v.jsonl")
    with pytest.raises(DataError) as info:
        load_splits(train_path, valid_path)
    assert info.value.problems == [
        f"{valid_path}:2: also in the training set ({train_path}:2); validation examples must not overlap training"
    ]


def test_load_splits_folder_without_train(tmp_path):
    with pytest.raises(DataError, match="no train.jsonl"):
        load_splits(tmp_path)


# --- rendering and loss masks ----------------------------------------------------------------

THREE_TURNS = Example(
    messages=[
        {"role": "system", "content": "You are Bingo, a cheerful puppy."},
        {"role": "user", "content": "Hi Bingo!"},
        {"role": "assistant", "content": "Hi! Want to play keepy uppy? 😀"},
        {"role": "user", "content": "What's your favourite game?"},
        {"role": "assistant", "content": "  Magic claw, with Dad.\n"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye bye!"},
    ],
    source="mem:1",
)
REPLIES = ("Hi! Want to play keepy uppy? 😀", "Magic claw, with Dad.", "Bye bye!")
PROMPT_PARTS = (
    "<bos><start_of_turn>user\nYou are Bingo, a cheerful puppy.\n\nHi Bingo!<end_of_turn>\n<start_of_turn>model\n",
    "\n<start_of_turn>user\nWhat's your favourite game?<end_of_turn>\n<start_of_turn>model\n",
    "\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
    "\n",
)


def split_by_mask(tok, ids, mask):
    """Decode the masked and unmasked tokens separately."""
    on = tok.decode([i for i, m in zip(ids, mask) if m])
    off = tok.decode([i for i, m in zip(ids, mask) if not m])
    return on, off


def test_render_chat_and_text(tok):
    full = render(tok, THREE_TURNS)
    assert full == "".join(p + r + "<end_of_turn>" for p, r in zip(PROMPT_PARTS, REPLIES)) + PROMPT_PARTS[-1]
    assert render(tok, Example(text="Once.", source="t")) == "<bos>Once."
    prompt = Example(messages=THREE_TURNS.messages[:2], source="p")
    assert render(tok, prompt, add_generation_prompt=True) == PROMPT_PARTS[0]


def test_loss_mask_known_answer(tok):
    ids, mask = encode_example(tok, THREE_TURNS)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == render(tok, THREE_TURNS)
    on, off = split_by_mask(tok, ids, mask)
    assert on == "".join(r + "<end_of_turn>" for r in REPLIES)
    assert off == "".join(PROMPT_PARTS)
    # Each reply is one contiguous run that ends with <end_of_turn> (id 106); the newline after is off.
    runs = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
    assert len(runs) == 3
    ends = [k for k in range(len(mask)) if mask[k] and not mask[k + 1]]
    assert [ids[k] for k in ends] == [106, 106, 106]
    assert not mask[0] and ids[0] == 2


_contents = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # no time limits: the machine may be loaded
@given(system=st.one_of(st.none(), _contents), turns=st.lists(st.tuples(_contents, _contents), min_size=1, max_size=3))
def test_loss_mask_property(tok, system, turns):
    """For any contents: masked tokens are exactly the (trimmed) replies, each with <end_of_turn>."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    example = Example(messages=messages, source="h:1")
    ids, mask = encode_example(tok, example)
    on, off = split_by_mask(tok, ids, mask)
    assert on == "".join(a.strip() + "<end_of_turn>" for _, a in turns)
    assert tok.decode(ids) == render(tok, example)
    assert off.startswith("<bos><start_of_turn>user\n") and off.endswith("<start_of_turn>model\n\n")


def test_loss_mask_same_through_mlx_lm_wrapper(tok):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapper = TokenizerWrapper(tok)
    assert encode_example(wrapper, THREE_TURNS) == encode_example(tok, THREE_TURNS)
    assert template_supports_system(wrapper)


def test_text_mask_is_all_but_bos(tok):
    ids, mask = encode_example(tok, Example(text="the dog ran 😀", source="t"))
    assert ids[0] == 2 and mask == [False] + [True] * (len(ids) - 1)
    assert tok.decode(ids[1:]) == "the dog ran 😀"


def with_template(tok, template):
    clone = train_tokenizer(synthetic_corpus(50), vocab_size=450)
    clone.chat_template = template
    return clone


def test_template_supports_system(tok):
    assert template_supports_system(tok)
    raising = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
              "{{ m['content'] }}{% endfor %}"
    dropping = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    assert not template_supports_system(with_template(tok, raising))
    assert not template_supports_system(with_template(tok, dropping))


def test_unstable_template_is_reported(tok):
    # Renders only the last two messages: earlier turns disappear as the conversation grows.
    unstable = "{% for m in messages[-2:] %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n" \
               "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    with pytest.raises(DataError, match=r"^mem:1: the chat template is not prefix-stable"):
        encode_example(with_template(tok, unstable), THREE_TURNS)


def test_template_failure_names_the_source(tok):
    bad = Example(messages=[{"role": "assistant", "content": "x"}], source="f.jsonl:9")
    with pytest.raises(DataError, match=r"^f.jsonl:9: the chat template failed: .*alternate"):
        render(tok, bad)


# --- length policy ---------------------------------------------------------------------------


def short_and_long(tok):
    """Three examples: short, long with the reply early, long with the reply only at the end."""
    short = Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ball"}],
                    source="s:1")
    long_reply = " ".join(["happy dog"] * 40)
    early = Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_reply}],
                    source="s:2")
    late = Example(messages=[{"role": "user", "content": long_reply}, {"role": "assistant", "content": "ok"}],
                   source="s:3")
    return [short, early, late]


def test_truncate(tok):
    examples = short_and_long(tok)
    n_short = len(encode_example(tok, examples[0])[0])
    limit = n_short + 4
    ds = prepare_dataset(tok, examples, max_seq_len=limit, on_long="truncate")
    assert isinstance(ds, EncodedDataset)
    # The late example loses its only reply to truncation, so it is dropped.
    assert ds.report == {
        "examples": 3, "kept": 2, "truncated": 1, "dropped": 1,
        "tokens": n_short + limit, "loss_tokens": int(sum(m.sum() for m in ds.masks)),
    }
    assert [len(t) for t in ds.tokens] == [n_short, limit]
    assert all(t.dtype == np.int32 for t in ds.tokens) and all(m.dtype == bool for m in ds.masks)
    full_ids, full_mask = encode_example(tok, examples[1])
    assert ds.tokens[1].tolist() == full_ids[:limit] and ds.masks[1].tolist() == full_mask[:limit]


def test_drop(tok):
    examples = short_and_long(tok)
    n_short = len(encode_example(tok, examples[0])[0])
    ds = prepare_dataset(tok, examples, max_seq_len=n_short, on_long="drop")
    ids, mask = encode_example(tok, examples[0])
    assert ds.report == {"examples": 3, "kept": 1, "truncated": 0, "dropped": 2, "tokens": n_short,
                         "loss_tokens": sum(mask)}
    assert ds.tokens[0].tolist() == ids


def test_error_names_each_long_example(tok):
    examples = short_and_long(tok)
    lengths = [len(encode_example(tok, e)[0]) for e in examples]
    with pytest.raises(DataError) as info:
        prepare_dataset(tok, examples, max_seq_len=lengths[0], on_long="error")
    assert info.value.problems == [
        f"s:2: {lengths[1]} tokens, longer than max_seq_len={lengths[0]}",
        f"s:3: {lengths[2]} tokens, longer than max_seq_len={lengths[0]}",
    ]


def test_everything_fits(tok):
    examples = short_and_long(tok)
    ds = prepare_dataset(tok, examples, max_seq_len=10_000, on_long="error")
    assert ds.report["kept"] == 3 and ds.report["truncated"] == ds.report["dropped"] == 0
    assert ds.report["tokens"] == sum(len(t) for t in ds.tokens)


def test_bad_on_long(tok):
    with pytest.raises(ValueError, match="on_long"):
        prepare_dataset(tok, [], max_seq_len=8, on_long="wrap")


# --- statistics ------------------------------------------------------------------------------


def replies_example(word_counts, source="s"):
    """One conversation per reply, the reply having the given number of words."""
    return [
        Example(messages=[{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": " ".join(["woof"] * n)}], source=f"{source}:{i}")
        for i, n in enumerate(word_counts, start=1)
    ]


SPREAD = [1, 3, 5, 8, 12, 20, 35, 60, 90, 150, 7]


def test_stats_known_values(tok):
    examples = replies_example(SPREAD) + [Example(text="raw text here", source="t:1")]
    stats = compute_stats(examples, tokenizer=tok)
    assert (stats["examples"], stats["conversations"], stats["text_examples"]) == (12, 11, 1)
    assert (stats["turns"], stats["assistant_replies"], stats["system_messages"]) == (22, 11, 0)
    words = stats["reply_words"]
    assert (words["min"], words["median"], words["max"], words["count"]) == (1, 12, 150, 11)
    assert words["p10"] == pytest.approx(3.0) and words["p90"] == pytest.approx(90.0)
    hist = words["histogram"]
    assert sum(hist["counts"]) == 11 and len(hist["bins"]) == len(hist["counts"]) + 1
    assert hist["bins"][0] == 1 and hist["bins"][-1] > 150 and hist["counts"][0] == 6
    assert stats["reply_tokens"]["count"] == 11 and stats["example_tokens"]["count"] == 12
    assert not any("narrow band" in w for w in stats["warnings"])
    assert any("only 12 examples" in w for w in stats["warnings"])


def test_stats_without_tokenizer():
    stats = compute_stats(replies_example([4, 5, 6]))
    assert stats["reply_tokens"] is None and stats["example_tokens"] is None
    assert stats["reply_words"]["median"] == 5


@pytest.mark.parametrize(
    "counts,narrow",
    [
        ([40, 42, 45, 45, 47, 50, 52, 55, 58, 60], True),  # p90/p10 < 2
        ([2, 100, 101, 103, 105, 108, 110, 112, 115, 400], True),  # 80% within 30 words (outliers apart)
        (SPREAD, False),
        ([2, 5, 10, 15, 20, 25, 30, 40, 60, 80], False),
        ([3, 5, 8, 10, 12, 15, 18, 20, 25, 28], False),  # within 30 words, but 10x apart
        ([50, 50, 50, 50], False),  # too few replies to say
    ],
)
def test_narrow_band_warning(counts, narrow):
    stats = compute_stats(replies_example(counts))
    warned = [w for w in stats["warnings"] if "narrow band" in w]
    assert bool(warned) == narrow
    if narrow:
        assert "learn to stop at about" in warned[0] and "vary reply lengths" in warned[0]


def test_narrow_band_message_names_the_length():
    stats = compute_stats(replies_example([40, 42, 45, 45, 47, 50, 52, 55, 58, 60]))
    (warning,) = [w for w in stats["warnings"] if "narrow band" in w]
    assert "about 48.5 words" in warning


def test_format_stats(tok):
    stats = compute_stats(replies_example([40, 42, 45, 45, 47, 50, 52, 55, 58, 60]), tokenizer=tok)
    text = format_stats(stats)
    assert "examples: 10 (10 conversations, 0 text)" in text
    assert "assistant reply length (words): min 40, p10 41.8, median 48.5, p90 58.2, max 60" in text
    assert "assistant reply length (tokens)" in text and "example length (tokens" in text
    rows = [line for line in text.splitlines() if " | " in line]
    assert rows and any("#" in r for r in rows)
    assert "warnings:" in text and "narrow band" in text


def test_format_stats_text_only():
    text = format_stats(compute_stats([Example(text="hello", source="t:1")]))
    assert "no assistant replies" in text and "reply length (words)" not in text
