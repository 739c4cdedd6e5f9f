"""Tests for mlx_persona.export.gguf, with llama.cpp itself (llama-cpp-python) as the oracle.

The tiny model's f32 file gives MLX's logits within 1e-3 of the largest logit over a prompt that crosses
the sliding window; greedy decoding of 32 tokens through the chat template in the file equals
`mlx-persona generate`'s tokens (f32, f16); llama.cpp tokenizes 20 texts as our tokenizer does. The
gemma-3-270m shape runs the logit check only with ``-m slow`` (a 1 GB f32 file; ~20 s, plus ~1 minute
to build the random 270m model the first time).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_persona.data.tokenizer import GEMMA_CHAT_TEMPLATE
from mlx_persona.export.gguf import export_gguf, write_gguf
from mlx_persona.generation import build_prompt, generate
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig

gguf = pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.needs(llama_cpp is not None,
                                "llama-cpp-python is not installed (bash scripts/setup.sh test builds it)")

PROMPT = [{"role": "system", "content": "You are Bluey, a six-year-old Blue Heeler."},
          {"role": "user", "content": "Bingo wants to play shops but Dad is asleep on the couch and Mum is "
                                      "at work. What game should we play instead, and who goes first?"}]
GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=32)
TEXTS = [
    "Hello there!", " leading space", "two  spaces and\ttabs\n\nnew lines", "trailing ", "", "12345 + 678 = 13023",
    "Hooray! Let's play keepy uppy.", "café naïve über", "東京 and 😀 emoji", "Ωß never seen in training",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text after bos", "x<end_of_turn>",
    "<unused3> and [multimodal] and <mask>", "   ", "\n", "a<eos>b", "Bluey's dad, Bandit, is a dog.",
    "mixed\u00a0nbsp and \u200bzero width", "punctuation!?.,;:'\"()[]{}",
]
DTYPES = ("f32", "f16", "q8_0", "q4_0")


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(tiny_path, root / f"tiny-{dt}.gguf", dt) for dt in DTYPES}


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(str(tiny_path))


def _llama(path: Path, *, kv_f16: bool = False, **kwargs):
    """llama.cpp on the file; an f32 KV cache unless `kv_f16` (llama.cpp's default, which rounds K and V)."""
    kv = {} if kv_f16 else {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                           verbose=False, seed=0, **kv, **kwargs)


def _llama_logits(path: Path, ids: list[int], **kwargs) -> np.ndarray:
    llm = _llama(path, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def _reply_ids(tokenizer) -> list[int]:
    """The prompt with a reply: 60-odd varied tokens, past the sliding window (16) several times."""
    reply = "Let's play Keepy Uppy with a balloon! I go first because I thought of it, then Bingo."
    return build_prompt(tokenizer, PROMPT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "ok"}])


# --- the file itself ------------------------------------------------------------------------------


def test_metadata_is_what_llama_cpp_reads_for_gemma3(files, tiny_path):
    config = json.loads((tiny_path / "config.json").read_text())
    reader = gguf.GGUFReader(str(files["f32"]))
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "gemma3"
    expected = {"context_length": 2048, "embedding_length": 64, "block_count": 4, "feed_forward_length": 192,
                "attention.head_count": 2, "attention.head_count_kv": 1, "attention.key_length": 32,
                "attention.value_length": 32, "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4,
                "attention.sliding_window": 16, "attention.sliding_window_pattern": 2}
    assert {k: f[f"gemma3.{k}"] for k in expected} == expected
    assert f["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert config["sliding_window_pattern"] == 2 and config["sliding_window"] == 16
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is False
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.eot_token_id"],
            f["tokenizer.ggml.padding_token_id"], f["tokenizer.ggml.unknown_token_id"]) == (2, 1, 106, 0, 3)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == GEMMA_CHAT_TEMPLATE
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == config["vocab_size"] == 2048
    kind = gguf.TokenType
    assert [types[i] for i in (0, 1, 2, 3, 4, 5, 6, 105, 106)] == [kind.CONTROL] * 3 + [kind.UNKNOWN, kind.CONTROL] + \
        [kind.USER_DEFINED] * 2 + [kind.CONTROL] * 2
    assert tokens[106] == "<end_of_turn>" and tokens[107] == "<0x00>" and types[107] == kind.BYTE


def test_norms_are_stored_plus_one_and_matrices_as_asked(files, tiny_path):
    base = mx.load(str(tiny_path / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(files["f32"])).tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    norm = np.array(base["model.layers.1.self_attn.q_norm.weight"]) + 1
    np.testing.assert_array_equal(np.array(tensors["blk.1.attn_q_norm.weight"].data), norm)
    np.testing.assert_array_equal(np.array(tensors["blk.2.attn_q.weight"].data),
                                  np.array(base["model.layers.2.self_attn.q_proj.weight"]))
    q = gguf.GGMLQuantizationType
    for dt, matrix, embd in (("f16", q.F16, q.F16), ("q8_0", q.Q8_0, q.Q8_0), ("q4_0", q.Q4_0, q.Q8_0)):
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(files[dt])).tensors}
        assert types["blk.0.ffn_down.weight"] == matrix and types["token_embd.weight"] == embd
        assert types["blk.0.attn_norm.weight"] == q.F32
    sizes = [files[dt].stat().st_size for dt in DTYPES]
    assert sizes == sorted(sizes, reverse=True)


# --- llama.cpp as the oracle --------------------------------------------------------------------


@needs_llama
def test_f32_logits_equal_mlx(files, tiny, capsys):
    model, tok = tiny
    ids = _reply_ids(tok)
    assert len(ids) > 3 * 16
    ours = np.array(model(mx.array([ids]))[0])
    scale = np.abs(ours).max()

    def compare(theirs):
        return float(np.abs(theirs - ours).max() / scale), float((theirs.argmax(-1) == ours.argmax(-1)).mean())

    report = {dt: compare(_llama_logits(files[dt], ids)) for dt in DTYPES}
    report["f32, f16 KV cache"] = compare(_llama_logits(files["f32"], ids, kv_f16=True))
    with capsys.disabled():
        print(f"\n  gguf vs MLX over {len(ids)} positions, max |dlogit| / max |logit|, argmax agreement:",
              ", ".join(f"{dt} {e:.1e} {a:.0%}" for dt, (e, a) in report.items()))
    # The random tiny model has near-ties, so an argmax may flip at a few positions even in f32.
    assert report["f32"][0] <= 1e-3 and report["f32"][1] >= 0.95
    assert report["f32, f16 KV cache"][0] <= 1e-3 and report["f16"][0] <= 1e-2
    # Measured: f16 1.5e-3, q8_0 3.9e-2, q4_0 0.38 (random weights at std 0.02 quantize poorly); ~1.5x as bounds.
    assert report["q8_0"][0] <= 6e-2 and report["q4_0"][0] <= 0.6


def _llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Argmax decoding by llama.cpp's own greedy sampler, ending at its end-of-generation tokens."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) == n:
            break
        out.append(int(token))
    return out


@needs_llama
@pytest.mark.parametrize("dt", ["f32", "f16"])
def test_greedy_through_the_chat_template_equals_generate(files, tiny, dt):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, tok = tiny
    llm = _llama(files[dt])
    template = llm.metadata["tokenizer.chat_template"]
    rendered = Jinja2ChatFormatter(template, eos_token="<eos>", bos_token="<bos>")(messages=PROMPT)
    prompt = llm.tokenize(rendered.prompt.encode(), add_bos=False, special=True)
    ours = generate(model, tok, PROMPT[1]["content"], GREEDY, system=PROMPT[0]["content"])
    assert prompt == build_prompt(tok, PROMPT[1]["content"], system=PROMPT[0]["content"])
    assert _llama_greedy(llm, prompt, GREEDY.max_new_tokens) == ours.tokens


@needs_llama
def test_llama_cpp_ends_generation_at_end_of_turn(files):
    llm = _llama(files["f32"])
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_is_eog(vocab, 106) and llama_cpp.llama_vocab_is_eog(vocab, 1)
    assert not llama_cpp.llama_vocab_is_eog(vocab, 105)


@needs_llama
def test_llama_cpp_tokenizes_like_our_tokenizer(files, tiny):
    from mlx_persona.data.tokenizer import unwrap_tokenizer

    tok = unwrap_tokenizer(tiny[1])
    llm = llama_cpp.Llama(model_path=str(files["q4_0"]), vocab_only=True, verbose=False)
    for text in TEXTS:
        plain = tok.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == plain, text
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
        assert llm.detokenize(plain, special=True).decode() == text


@needs_llama
def test_lora_run_is_fused_first(tiny_path, tmp_path):
    from test_export_hf import make_adapter

    from mlx_persona.cli import main

    run = make_adapter(tiny_path, tmp_path / "run")
    out = tmp_path / "persona.gguf"
    result = CliRunner().invoke(main, ["export", "gguf", str(run), "-o", str(out), "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    model, tok = load_model(str(tiny_path), adapter_path=run)
    base, _ = load_model(str(tiny_path))
    ids = _reply_ids(tok)
    ours, plain = np.array(model(mx.array([ids]))[0]), np.array(base(mx.array([ids]))[0])
    theirs = _llama_logits(out, ids)
    assert np.abs(theirs - ours).max() <= 1e-3 * np.abs(ours).max() < np.abs(plain - ours).max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["persona.gguf", "run"]  # no fused folder left


@needs_llama
def test_q4_k_m_is_quantized_by_llama_cpp(tiny_path, tiny, tmp_path):
    out = export_gguf(tiny_path, tmp_path / "tiny-q4_K_M.gguf", "q4_K_M")
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    model, tok = tiny
    ids = _reply_ids(tok)
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(_llama_logits(out, ids) - ours).max() <= 0.3 * np.abs(ours).max()


@needs_llama
@pytest.mark.slow
def test_270m_shape_f32_logits_equal_mlx(tmp_path, capsys):
    # A 1.08 GB f32 file and 262,144-wide logits: opt-in (-m slow); ~20 s once the built-in model exists.
    # mlx-lm rounds the embedding scale sqrt(640) through bf16 (25.25 for 25.298); transformers and
    # llama.cpp do not. MLX is compared with that rounding undone (the scale applied exactly, through
    # mlx-lm's own input_embeddings argument); the rounding alone moves MLX's logits by ~1.8e-3.
    from mlx_persona.models import resolve_model

    folder = resolve_model("builtin:gemma-3-270m")
    out = export_gguf(folder, tmp_path / "270m.gguf", "f32")
    model, tok = load_model(str(folder))
    ids = _reply_ids(tok)
    hidden = model.args.hidden_size
    undo = hidden ** 0.5 / mx.array(hidden ** 0.5, mx.bfloat16).astype(mx.float32)
    tokens = mx.array([ids])
    exact = np.array(model(tokens, input_embeddings=model.model.embed_tokens(tokens) * undo)[0])
    rounded = np.array(model(tokens)[0])
    theirs = _llama_logits(out, ids)
    scale = np.abs(exact).max()
    err, mlx_rounding = np.abs(theirs - exact).max() / scale, np.abs(rounded - exact).max() / scale
    with capsys.disabled():
        print(f"\n  270m f32 gguf vs MLX (exact scale) {err:.1e}; mlx-lm's bf16 scale moves MLX by {mlx_rounding:.1e}")
    assert err <= 1e-3


# --- what the command refuses -----------------------------------------------------------------------


def test_refusals_are_one_line(tiny_path, tmp_path):
    from mlx_persona.cli import main

    runner = CliRunner()
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    cases = [
        (["export", "gguf", str(tiny_path), "-o", str(existing)], "already exists (pass --overwrite"),
        (["export", "gguf", str(tiny_path), "-o", str(tmp_path / "a.gguf"), "--dtype", "q5_1"],
         "dtype must be one of f32, f16, q8_0, q4_0, q4_K_M"),
        (["export", "gguf", str(tmp_path / "missing"), "-o", str(tmp_path / "b.gguf")], "missing"),
        (["export", "gguf", str(tiny_path), "-o", str(tmp_path)], "is a folder"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_folders_llama_cpp_cannot_run_exactly_are_refused(tiny_path, tmp_path):
    from mlx_persona.export import ExportError

    def variant(name, change=None, drop=()):
        folder = tmp_path / name
        folder.mkdir()
        for f in tiny_path.iterdir():
            if f.name not in drop:
                (folder / f.name).write_bytes(f.read_bytes())
        if change:
            config = json.loads((folder / "config.json").read_text())
            config.update(change)
            (folder / "config.json").write_text(json.dumps(config))
        return folder

    cases = [
        (variant("llama", {"model_type": "llama"}), "model_type 'llama'; the GGUF export writes Gemma 3 text"),
        (variant("scalar", {"query_pre_attn_scalar": 48}), "query_pre_attn_scalar 48 differs from head_dim 32"),
        (variant("nospm", drop=("tokenizer.model",)), "no tokenizer.model"),
    ]
    for folder, message in cases:
        with pytest.raises(ExportError, match=message):
            write_gguf(folder, tmp_path / f"{folder.name}.gguf", "f16")
