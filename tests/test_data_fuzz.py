"""Bad input, hardened: generated JSONL files, valid and broken, either load as validated examples or raise
`DataError` naming `file:line` for every broken line, never another exception; bad configs fail with
`ConfigError` before any model is loaded."""

import json
import re

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mlx_persona.data import DataError, Example, load_jsonl
from mlx_persona.data.formats import ROLES
from mlx_persona.tuner.config import ConfigError, TrainConfig, load_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ JSONL lines
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40).filter(str.strip)
HUGE = "la " * 150_000  # a 450 kB line


@st.composite
def conversation(draw):
    n = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(n):
        messages += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    return {"messages": messages}


valid_obj = st.one_of(
    conversation(),
    st.fixed_dictionaries({"instruction": text, "response": text},
                          optional={"input": st.one_of(text, st.just(""), st.none()), "system": text}),
    st.fixed_dictionaries({"prompt": text, "completion": text}),
    st.fixed_dictionaries({"text": text}),
    st.just({"prompt": "Tell me a long story.", "completion": HUGE}),
)

not_a_string = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.lists(text, max_size=2), st.dictionaries(text, text, max_size=2))
empty = st.sampled_from(["", " ", "\n\t  ", "\u3000"])


@st.composite
def broken_obj(draw):
    """A JSON object that is invalid for a reason the loader must name."""
    base = draw(conversation())
    msgs = base["messages"]
    i = draw(st.integers(0, len(msgs) - 1))
    kind = draw(st.sampled_from(["content type", "role type", "unknown role", "empty content", "missing content",
                                 "non-alternating", "ends with user", "messages type", "no format",
                                 "two formats", "stray key", "empty messages", "surrogate", "empty field"]))
    if kind == "content type":
        msgs[i]["content"] = draw(not_a_string)
    elif kind == "role type":
        msgs[i]["role"] = draw(not_a_string)
    elif kind == "unknown role":
        msgs[i]["role"] = draw(text.filter(lambda r: r not in ROLES))
    elif kind == "empty content":
        msgs[i]["content"] = draw(empty)
    elif kind == "missing content":
        del msgs[i]["content"]
    elif kind == "non-alternating":
        j = draw(st.integers(0, len(msgs) - 2)) if len(msgs) > 1 else 0
        msgs.insert(j + 1, dict(msgs[j]) if msgs[j]["role"] != "system" else {"role": "assistant", "content": "x"})
    elif kind == "ends with user":
        msgs.append({"role": "user", "content": draw(text)})
    elif kind == "messages type":
        base["messages"] = draw(st.one_of(not_a_string.filter(lambda v: not isinstance(v, list)),
                                          st.lists(not_a_string, min_size=1, max_size=2)))
    elif kind == "no format":
        return draw(st.dictionaries(text.filter(lambda k: k not in {"messages", "instruction", "response",
                                                                    "prompt", "completion", "text"}), text, max_size=3))
    elif kind == "two formats":
        base["text"] = draw(text)
    elif kind == "stray key":
        base[draw(st.sampled_from(["input", "system"]))] = draw(text)
    elif kind == "empty messages":
        base["messages"] = []
    elif kind == "surrogate":
        return {"prompt": draw(text), "completion": "bad \ud83d half"}
    elif kind == "empty field":
        return {"prompt": draw(st.one_of(empty, not_a_string)), "completion": draw(text)}
    return base


def _dump(obj, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


@st.composite
def line(draw):
    """(kind, bytes): kind is 'ok', 'bad' or 'blank'."""
    choice = draw(st.sampled_from(["ok", "ok", "ok", "bad-obj", "bad-json", "not-object", "bad-utf8", "blank",
                                   "deep", "huge-number", "huge-bad"]))
    ascii_only = draw(st.booleans())
    if choice == "ok":
        return "ok", _dump(draw(valid_obj), ascii_only)
    if choice == "bad-obj":
        return "bad", _dump(draw(broken_obj()), ascii_only)  # (a raw surrogate is invalid UTF-8: bad too)
    if choice == "bad-json":
        good = _dump(draw(valid_obj), ascii_only)
        cut = draw(st.integers(1, max(len(good) - 1, 1)))
        return "bad", draw(st.sampled_from([good[:cut], good + b",", b"{" + good, good.replace(b'"', b"'", 1),
                                             b"{'text': 'single quotes'}", b"NaN", b"\x00"]))
    if choice == "not-object":
        return "bad", _dump(draw(st.one_of(not_a_string, st.lists(st.integers(), max_size=3))), True)
    if choice == "bad-utf8":
        good = _dump(draw(valid_obj), ascii_only)
        at = draw(st.integers(0, len(good)))
        return "bad", good[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + good[at:]
    if choice == "blank":
        return "blank", draw(st.sampled_from([b"", b"   ", b"\t"]))
    if choice == "deep":
        return "bad", b"[" * 100_000 + b"]" * 100_000
    if choice == "huge-number":
        return "bad", b'{"text": ' + b"7" * 5000 + b"}"
    return "bad", b'{"text": "' + HUGE.encode() + b'"'  # huge and unterminated


def _check_example(ex: Example):
    assert isinstance(ex, Example) and re.fullmatch(r".+:\d+", ex.source)
    if ex.text is not None:
        assert isinstance(ex.text, str) and ex.text.strip() and ex.messages == []
        return
    roles = [m["role"] for m in ex.messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert body and body == ["user", "assistant"] * (len(body) // 2)
    for m in ex.messages:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
        m["content"].encode("utf-8")  # valid Unicode: the tokenizer can take it


@FUZZ
@given(lines=st.lists(line(), max_size=6), bom=st.booleans(), crlf=st.booleans(), final_newline=st.booleans())
def test_loader_returns_valid_examples_or_names_each_bad_line(tmp_path_factory, lines, bom, crlf, final_newline):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    eol = b"\r\n" if crlf else b"\n"
    body = eol.join(raw for _, raw in lines) + (eol if final_newline and lines else b"")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
    bad = {n for n, (kind, _) in enumerate(lines, 1) if kind == "bad"}
    ok = [n for n, (kind, _) in enumerate(lines, 1) if kind == "ok"]
    try:
        examples = load_jsonl(path)
    except DataError as err:
        reported = set()
        for problem in err.problems:
            m = re.match(rf"{re.escape(str(path))}:(\d+): \S", problem)
            if m:
                reported.add(int(m.group(1)))
            else:
                assert problem == f"{path}: empty file (no examples)" and not ok and not bad, problem
        assert bad <= reported, (bad, err.problems)
        extra = reported - bad  # only duplicates of earlier valid lines
        for n in extra:
            assert n in ok and any(p.startswith(f"{path}:{n}: duplicate of line") for p in err.problems), err.problems
        return
    assert not bad
    assert len(examples) == len(ok) and [int(e.source.rsplit(":", 1)[1]) for e in examples] == ok
    for ex in examples:
        _check_example(ex)


@pytest.mark.parametrize("raw, reason", [
    (b'{"text": "a \\ud800 b"}', "'text' is not valid Unicode (unpaired surrogate '\\ud800')"),
    (b"[" * 100_000, "bad JSON: nested too deeply"),
    (b'{"text": ' + b"1" * 5000 + b"}", "bad JSON: Exceeds the limit"),
])
def test_inputs_that_used_to_escape_as_other_exceptions(tmp_path, raw, reason):
    """Found by the property test: these raised TypeError (in the tokenizer), RecursionError and ValueError."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + raw + b"\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert info.value.problems[0].startswith(f"{path}:2: {reason}")


# ------------------------------------------------------------------------------------------ configs
FIELDS = {"model", "data", "valid_data", "output", "overwrite", "method", "lora", "optim", "batch_size", "epochs",
          "steps", "grad_accumulation", "grad_checkpoint", "max_seq_len", "on_long", "seed", "dtype", "eval_every",
          "eval_batches", "save_every", "keep_checkpoints", "early_stopping_patience", "log_every", "loss_chunk",
          "progress"}
any_value = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
                      st.lists(st.integers(), max_size=2),
                      st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
key = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=10))
section_keys = st.sampled_from(["rank", "alpha", "dropout", "modules", "num_layers", "learning_rate", "betas", "eps",
                                "warmup_steps", "bogus"])
section_value = st.one_of(any_value, st.dictionaries(section_keys, any_value, max_size=3))


@FUZZ
@given(data=st.dictionaries(key, st.one_of(any_value, section_value), max_size=4))
def test_any_config_is_valid_or_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)
    try:
        cfg = load_config(path)
    except ConfigError as err:  # names a key it was given
        keys = [str(k) for k in data] + [f"{k}.{j}" for k, v in data.items() if isinstance(v, dict) for j in v]
        assert any(k in str(err) for k in keys), (str(err), keys)
        return
    assert isinstance(cfg, TrainConfig) and cfg.validate() is cfg
    assert set(data) <= FIELDS


@pytest.mark.parametrize("text, key", [
    ("bogus_key: 1\n", "bogus_key"),
    ("batch_size: four\n", "batch_size"),
    ("optim:\n  learning_rate: .inf\n", "optim.learning_rate"),
    ("optim:\n  eps: 0\n", "optim.eps"),
    ("seed: -1\n", "seed"),
    ("seed: 4294967296\n", "seed"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("output: ''\n", "output"),
    ("lora: 3\n", "lora"),
])
def test_bad_config_fails_before_any_model_is_loaded(tmp_path, monkeypatch, text, key):
    import mlx_persona.models as models
    import mlx_persona.tuner.run as train_mod
    from mlx_persona.cli import main

    def no(*a, **k):
        raise AssertionError("a model was loaded")

    for module in (models, train_mod):
        monkeypatch.setattr(module, "load_model", no)
        monkeypatch.setattr(module, "resolve_model", no)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(path), "-o", str(tmp_path / "o")]
                                if key != "output" else ["train", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_lora_module_the_model_lacks_is_a_config_error(tiny_path, small_data, tmp_path):
    from mlx_persona.cli import main

    result = CliRunner().invoke(main, ["train", "--model", str(tiny_path), "--data", str(small_data), "-o",
                                       str(tmp_path / "o"), "--steps", "1", "--set", "lora.modules=[qkv_proj]"])
    assert result.exit_code == 1 and "lora.modules: no layer named qkv_proj" in result.output, result.output
