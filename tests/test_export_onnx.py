"""Tests for mlx_persona.export.onnx: our hand-written graph run by onnxruntime equals MLX, cache included."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_persona.export import ExportError
from mlx_persona.outputs import OutputError
from mlx_persona.export.hf import fuse
from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters, save_adapters

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mlx_persona.export.onnx import export_onnx  # noqa: E402

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [{"role": "user", "content": "Bingo wants to play shops with Bluey but Bluey is busy building a "
                                      "cubby house out of cushions. What should they do?"}]
STEPS = 30  # decode steps after the prompt: the sliding window (16) is crossed many times
REPLY = ("Hooray! Bingo can run the shop inside the cubby house, and I'll be the customer who buys all the "
         "cushions back. Then we swap, and Dad can be the delivery truck!")


def make_adapter(base: Path, out: Path, seed: int = 3) -> Path:
    """A LoRA adapter with random lora_b, so that the fused model differs from the base."""
    mx.random.seed(seed)  # before attach_adapters, which draws lora_a: the same adapter every run
    model, _ = load_model(str(base))
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=MODULES)
    cfg["model"] = str(base)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    out.mkdir(parents=True)
    save_adapters(model, out, cfg)
    return out


@pytest.fixture(scope="module")
def exported(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    base = tiny_path
    adapter = make_adapter(base, root / "adapter")
    hf = fuse(str(base), adapter, root / "hf")
    out = export_onnx(hf, root / "web", ("fp32", "q4"))
    model, tokenizer = load_model(str(base), adapter_path=adapter)
    return out, model, tokenizer


def prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def reply_ids(tokenizer) -> list[int]:
    """The prompt and a whole Bluey reply: 88 varied tokens (greedy decoding of the random tiny model soon
    repeats one token, which would make next-token agreement easy)."""
    text = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": REPLY}], tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


class OnnxDecoder:
    """Feeds the graph like transformers.js does: 1-based position ids, the cache from the last step."""

    def __init__(self, path: Path | bytes, config: dict):
        self.sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path),
                                         providers=["CPUExecutionProvider"])
        self.n_layers, self.n_kv, self.head_dim = (config["num_hidden_layers"], config["num_key_value_heads"],
                                                   config["head_dim"])
        self.names = [o.name for o in self.sess.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict:
        return {f"past_key_values.{i}.{kv}": np.zeros((batch, self.n_kv, 0, self.head_dim), np.float32)
                for i in range(self.n_layers) for kv in ("key", "value")}

    def __call__(self, ids, mask, positions, cache):
        out = dict(zip(self.names, self.sess.run(None, {"input_ids": np.asarray(ids, np.int64),
                                                        "attention_mask": np.asarray(mask, np.int64),
                                                        "position_ids": np.asarray(positions, np.int64),
                                                        **cache})))
        cache = {f"past_key_values.{i}.{kv}": out[f"present.{i}.{kv}"]
                 for i in range(self.n_layers) for kv in ("key", "value")}
        return out["logits"], cache


def run_both(dec: OnnxDecoder, model, ids: list[int], steps: int):
    """Greedy decoding driven by MLX's tokens; returns per-step logits errors and both greedy choices."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    ref = np.array(model(mx.array([ids]), cache=cache)[0])
    n = len(ids)
    got, past = dec([ids], np.ones((1, n)), [np.arange(1, n + 1)], dec.empty_cache())
    errors = [float(np.abs(got[0] - ref).max())]
    mlx_tokens, onnx_tokens = [], []
    for _ in range(steps):
        tok = int(ref[-1].argmax())
        mlx_tokens.append(tok)
        onnx_tokens.append(int(got[0, -1].argmax()))
        n += 1
        ref = np.array(model(mx.array([[tok]]), cache=cache)[0])
        got, past = dec([[tok]], np.ones((1, n)), [[n]], past)
        errors.append(float(np.abs(got[0] - ref).max()))
    return errors, mlx_tokens, onnx_tokens


def test_layout_for_transformers_js(exported):
    out, _, _ = exported
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx", "model_q4.onnx", "model_q4.onnx_data"]
    config = json.loads((out / "config.json").read_text())
    js = config["transformers.js_config"]
    assert js["use_external_data_format"] == {"model_q4.onnx": True}
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "tokenizer.json").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"][:2] == [1, 106]
    for name in ("model.onnx", "model_q4.onnx"):
        m = onnx.load(str(out / "onnx" / name), load_external_data=False)
        inputs = {i.name: i for i in m.graph.input}
        assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
        past = inputs["past_key_values.3.value"].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in past] == ["batch_size", 1, "past_sequence_length", 32]
        assert [o.name for o in m.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
        locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == ({"model_q4.onnx_data"} if "q4" in name else set())
    q4 = onnx.load(str(out / "onnx" / "model_q4.onnx"), load_external_data=False)
    # Everything big is 4-bit: 7 projections per layer and the LM head, whose table the embedding shares.
    assert sum(n.op_type == "MatMulNBits" for n in q4.graph.node) == 7 * 4 + 1
    # onnxruntime-web has no GatherBlockQuantized: only standard ops besides MatMulNBits.
    assert {n.domain for n in q4.graph.node if n.op_type != "MatMulNBits"} == {""}
    fp32_tables = [t.name for t in q4.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                   and not t.name.endswith("_scales")]
    assert fp32_tables == []


def test_q4_embedding_is_the_lm_head_table(exported):
    """The embedding rows the q4 graph de-quantizes equal the LM head weights as MatMulNBits computes them."""
    from onnx import helper, numpy_helper

    out, _, _ = exported
    q4 = onnx.load(str(out / "onnx" / "model_q4.onnx"))
    head = next(n for n in q4.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    k, vocab = attrs["K"], attrs["N"]
    # MatMulNBits(I, B) = the de-quantized [K, N] weight, computed by onnxruntime's own kernel.
    inits = [t for t in q4.graph.initializer if t.name in head.input[1:]]
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulNBits", ["eye", *head.input[1:]], ["w"], domain="com.microsoft", **attrs)],
        "probe", [helper.make_tensor_value_info("eye", onnx.TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [k, vocab])], inits),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    head_w = sess.run(None, {"eye": np.eye(k, dtype=np.float32)})[0]
    # The graph's embedding rows for every token id, read from an intermediate output.
    rows = "/model/embed_tokens/q4/deq/out"
    q4.graph.output.append(helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None))
    config = json.loads((out / "config.json").read_text())
    dec = OnnxDecoder(q4.SerializeToString(), config)
    ids = np.arange(vocab)[None]
    got = dict(zip([o.name for o in dec.sess.get_outputs()],
                   dec.sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids + 1,
                                       **dec.empty_cache()})))[rows].reshape(vocab, -1)[:, :k]
    np.testing.assert_allclose(got, head_w.T, rtol=0, atol=1e-6)
    fp32 = numpy_helper.to_array(next(t for t in onnx.load(str(out / "onnx" / "model.onnx")).graph.initializer
                                      if t.name == "model.embed_tokens.weight"))
    step = np.abs(fp32).max(axis=1, keepdims=True) / 8  # a 4-bit step, per row at most
    assert (np.abs(got - fp32) <= step + 1e-7).all()  # symmetric: the far sign may clip by one step


def test_fp32_equals_mlx_through_the_cache(exported):
    out, model, tokenizer = exported
    dec = OnnxDecoder(out / "onnx" / "model.onnx", json.loads((out / "config.json").read_text()))
    ids = prompt_ids(tokenizer)
    assert len(ids) > 16  # the prompt alone is longer than the sliding window
    errors, mlx_tokens, onnx_tokens = run_both(dec, model, ids, STEPS)
    print(f"fp32: prompt {len(ids)} tokens, max logit error prompt {errors[0]:.2e}, "
          f"decode {max(errors[1:]):.2e} over {STEPS} steps")
    assert max(errors) < 1e-3
    assert onnx_tokens == mlx_tokens


def test_fp32_greedy_decoding_equals_mlx(exported):
    """A closed loop: ONNX feeds itself its own argmax (as transformers.js does), MLX likewise."""
    from mlx_lm.models.cache import make_prompt_cache

    out, model, tokenizer = exported
    dec = OnnxDecoder(out / "onnx" / "model.onnx", json.loads((out / "config.json").read_text()))
    ids = prompt_ids(tokenizer)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    expected = []
    for _ in range(24):
        expected.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[expected[-1]]]), cache=cache)
    n = len(ids)
    got_logits, past = dec([ids], np.ones((1, n)), [np.arange(1, n + 1)], dec.empty_cache())
    got = []
    for _ in range(24):
        got.append(int(got_logits[0, -1].argmax()))
        n += 1
        got_logits, past = dec([[got[-1]]], np.ones((1, n)), [[n]], past)
    assert got == expected


def test_left_padded_batch_equals_single_rows(exported):
    out, _, tokenizer = exported
    dec = OnnxDecoder(out / "onnx" / "model.onnx", json.loads((out / "config.json").read_text()))
    long_ids = prompt_ids(tokenizer)
    short_ids = long_ids[:7]
    pad = len(long_ids) - len(short_ids)
    ids = [long_ids, [0] * pad + short_ids]
    mask = [[1] * len(long_ids), [0] * pad + [1] * len(short_ids)]
    positions = [list(range(1, len(long_ids) + 1)), [1] * pad + list(range(1, len(short_ids) + 1))]
    batched, past = dec(ids, mask, positions, dec.empty_cache(2))
    for row, single_ids in enumerate((long_ids, short_ids)):
        n = len(single_ids)
        single, _ = dec([single_ids], np.ones((1, n)), [np.arange(1, n + 1)], dec.empty_cache())
        np.testing.assert_allclose(batched[row, -1], single[0, -1], atol=1e-4)
    # One cached step for both rows.
    step, _ = dec([[7], [7]], np.concatenate([mask, np.ones((2, 1))], axis=1),
                  [[len(long_ids) + 1], [len(short_ids) + 1]], past)
    single, _ = dec([short_ids + [7]], np.ones((1, len(short_ids) + 1)), [np.arange(1, len(short_ids) + 2)],
                    dec.empty_cache())
    np.testing.assert_allclose(step[1, -1], single[0, -1], atol=1e-4)


@pytest.fixture(scope="module")
def q4_tables(exported) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every 4-bit table of the q4 graph de-quantized in numpy from the documented layout (uint8
    [out, in / 32, 16], low nibble first, zero point 8, one fp32 scale per block): HF weight name ->
    (weights [out, in], nibble - 8 [out, blocks, 32], scales [out, blocks, 1])."""
    from onnx import numpy_helper

    out, _, _ = exported
    q4 = onnx.load(str(out / "onnx" / "model_q4.onnx"))
    tables = {t.name: numpy_helper.to_array(t) for t in q4.graph.initializer}
    result = {}
    for name in (n.removesuffix(".weight_Q4") for n in tables if n.endswith(".weight_Q4")):
        packed, scales = tables[f"{name}.weight_Q4"], tables[f"{name}.weight_scales"]
        rows, blocks, half = packed.shape
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, blocks, 2 * half).astype(np.float32) - 8
        scales = scales.reshape(rows, blocks, 1)
        result["model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"] = (
            (q * scales).reshape(rows, -1), q, scales)
    assert len(result) == 7 * 4 + 1  # the tied embedding / LM head table included
    return result


def test_q4_tables_round_the_fp32_weights(exported, q4_tables):
    """Symmetric 4-bit per block of 32: scale = the block's largest |w| / 8, every weight rounded to the
    nearest step, except the far sign's end, which clips from +8 to +7 steps."""
    from safetensors.numpy import load_file

    out, _, _ = exported
    fp32 = load_file(Path(json.loads((out / "mlx_persona.json").read_text())["onnx"]["source"]) / "model.safetensors")
    clipped = total = 0
    for name, (_, q, scales) in q4_tables.items():
        w = fp32[name]
        blocks = np.zeros(q.shape, np.float32).reshape(len(w), -1)
        blocks[:, :w.shape[1]] = w  # the last block zero-padded (none at this size)
        blocks = blocks.reshape(q.shape)
        np.testing.assert_allclose(8 * np.abs(scales), np.abs(blocks).max(-1, keepdims=True), rtol=1e-6, err_msg=name)
        steps = np.abs(q * scales - blocks) / np.abs(scales)
        assert (steps[q != 7] <= 0.5 + 1e-5).all(), name
        assert (steps[q == 7] <= 1 + 1e-5).all(), name
        clipped += int((steps > 0.5 + 1e-5).sum())
        total += steps.size
    assert clipped < 0.01 * total  # measured 1703 of 327680


def test_q4_graph_equals_mlx_on_its_4bit_weights(exported, q4_tables):
    """Apart from the quantization, the q4 graph computes the model exactly: through the cache, and in one
    pass over a varied sequence."""
    out, _, tokenizer = exported
    model, _ = load_model(json.loads((out / "mlx_persona.json").read_text())["onnx"]["source"])
    model.load_weights([(name, mx.array(w)) for name, (w, _, _) in q4_tables.items()], strict=False)
    dec = OnnxDecoder(out / "onnx" / "model_q4.onnx", json.loads((out / "config.json").read_text()))
    errors, mlx_tokens, onnx_tokens = run_both(dec, model, prompt_ids(tokenizer), STEPS)
    ids = reply_ids(tokenizer)
    n = len(ids)
    got, _ = dec([ids], np.ones((1, n)), [np.arange(1, n + 1)], dec.empty_cache())
    whole = float(np.abs(got[0] - np.array(model(mx.array([ids]))[0])).max())
    print(f"q4 vs MLX on the de-quantized weights: max logit error {max(errors):.2e} through the cache, "
          f"{whole:.2e} over {n} tokens")
    # Measured 8.8e-7 and 1.2e-6 (logits ~0.5-0.8; 1.5e-6 with other OpenBLAS kernels); the graph reading
    # the layers' scales 5% too large gives 1.2e-2.
    assert max(errors) < 1e-4 and whole < 1e-4
    assert onnx_tokens == mlx_tokens


def test_q4_stays_close_to_fp32(exported):
    """The 4-bit error itself, against the fp32 MLX model, on every position of a prompt and reply."""
    out, model, tokenizer = exported
    dec = OnnxDecoder(out / "onnx" / "model_q4.onnx", json.loads((out / "config.json").read_text()))
    ids = reply_ids(tokenizer)
    n = len(ids)
    got = dec([ids], np.ones((1, n)), [np.arange(1, n + 1)], dec.empty_cache())[0][0]
    ref = np.array(model(mx.array([ids]))[0])
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    agree = int((got.argmax(-1) == ref.argmax(-1)).sum())
    print(f"q4 vs fp32: max logit error {rel:.3f} of the largest |logit|, next-token agreement {agree}/{n}")
    # Random tiny weights are the worst case for 4 bits; the adapter's seed is fixed, so these are too.
    # Measured 0.605 and 38/88 (chance: 1/2048); nibbles swapped give 1.58 and 0/88.
    assert rel < 1.0
    assert agree >= 19


def test_output_folder_rules(exported, tmp_path):
    out, _, _ = exported
    hf = json.loads((out / "mlx_persona.json").read_text())["onnx"]["source"]
    target = tmp_path / "web"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        export_onnx(hf, target, ("fp32",))
    with pytest.raises(ExportError, match="unknown dtype"):
        export_onnx(hf, tmp_path / "w2", ("fp16",))
    with pytest.raises(OutputError, match="input folder"):
        export_onnx(hf, hf, ("fp32",), overwrite=True)
    export_onnx(hf, target, ("fp32",), overwrite=True)
    assert sorted(p.name for p in (target / "onnx").iterdir()) == ["model.onnx"]
    assert json.loads((target / "config.json").read_text())["transformers.js_config"]["use_external_data_format"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web"]  # nothing written beside it


def test_fp32_external_data(exported, tmp_path, monkeypatch):
    """Past the size threshold the fp32 weights are streamed to model.onnx_data as the graph is built."""
    import mlx_persona.export.onnx as export_module

    out, _, tokenizer = exported
    hf = json.loads((out / "mlx_persona.json").read_text())["onnx"]["source"]
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_THRESHOLD", 0)
    big = export_onnx(hf, tmp_path / "big", ("fp32",))
    assert sorted(p.name for p in (big / "onnx").iterdir()) == ["model.onnx", "model.onnx_data"]
    js = json.loads((big / "config.json").read_text())["transformers.js_config"]
    assert js["use_external_data_format"] == {"model.onnx": True}
    config = json.loads((out / "config.json").read_text())
    ids = prompt_ids(tokenizer)
    n = len(ids)
    got, want = (OnnxDecoder(folder / "onnx" / "model.onnx", config) for folder in (big, out))
    a, _ = got([ids], np.ones((1, n)), [np.arange(1, n + 1)], got.empty_cache())
    b, _ = want([ids], np.ones((1, n)), [np.arange(1, n + 1)], want.empty_cache())
    np.testing.assert_array_equal(a, b)


def test_cli_export_onnx(exported, tmp_path):
    from mlx_persona.cli import main

    out, _, _ = exported
    hf = json.loads((out / "mlx_persona.json").read_text())["onnx"]["source"]
    runner = CliRunner()
    res = runner.invoke(main, ["export", "onnx", hf, "--out", str(tmp_path / "w"), "--dtype", "q4"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "w" / "onnx").iterdir()) == ["model_q4.onnx", "model_q4.onnx_data"]
    res = runner.invoke(main, ["export", "onnx", hf, "--out", str(tmp_path / "w"), "--dtype", "q4"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = runner.invoke(main, ["export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "no such folder" in res.output
