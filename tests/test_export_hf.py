"""Tests for mlx_persona.export.hf: a fused folder is a plain transformers model equal to base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file

from mlx_persona.outputs import OutputError
from mlx_persona.export.hf import fuse
from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters, save_adapters

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Long enough (> 40 tokens) that the sliding layers (window 16) drop keys inside the prompt.
PROMPT = [{"role": "user", "content": "Bluey and Bingo are playing keepy uppy with a balloon in the living room "
                                      "while Dad pretends to be asleep on the couch. What happens next, and who "
                                      "wins the game when Mum comes home?"}]


def make_adapter(base: Path, out: Path, method: str = "lora", seed: int = 1, zero: bool = False) -> Path:
    """An adapter folder for `base` whose lora_b (and DoRA magnitude) are random, so it changes outputs."""
    model, _ = load_model(str(base))
    mx.random.seed(seed)  # before attach_adapters, which draws lora_a: the same adapter whatever ran before
    cfg = attach_adapters(model, method, rank=4, alpha=8.0, modules=MODULES)
    cfg["model"] = str(base)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.zeros_like(m.lora_b) if zero else 0.05 * mx.random.normal(m.lora_b.shape)
            if hasattr(m, "m") and not zero:
                m.m = m.m * (1 + 0.1 * mx.random.normal(m.m.shape))
    out.mkdir(parents=True)
    save_adapters(model, out, cfg)
    return out


def prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def mlx_greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Plain argmax decoding with mlx-lm's KV caches (rotating caches on the sliding layers)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        tok = int(mx.argmax(logits[0, -1]).item())
        out.append(tok)
        if tok in eos:
            break
        logits = model(mx.array([[tok]]), cache=cache)
    return out


@pytest.fixture(scope="module")
def base(tiny_path):
    return tiny_path


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    adapter = make_adapter(base, root / "adapter")
    return adapter, fuse(str(base), adapter, root / "fused")


def test_fused_folder_layout(lora):
    _, out = lora
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(n.startswith(".") for n in names)
    with safe_open(str(out / "model.safetensors"), framework="numpy") as st:
        assert st.metadata() == {"format": "pt"}
        keys = set(st.keys())
        assert all(st.get_tensor(k).dtype == np.float32 for k in keys)
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    assert not any("lora" in k for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["model_type"] == "gemma3_text"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<start_of_turn>" in tok_cfg["chat_template"]
    gen = json.loads((out / "generation_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert gen["eos_token_id"][:2] == [tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids("<end_of_turn>")]
    assert {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                "min_new_tokens", "max_new_tokens")} == {
        "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1,
        "min_new_tokens": 50, "max_new_tokens": 256}
    # transformers reads the same settings back.
    hf_gen = transformers.GenerationConfig.from_pretrained(out)
    assert hf_gen.min_new_tokens == 50 and hf_gen.eos_token_id == gen["eos_token_id"]
    rendered = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<start_of_turn>model\n")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_transformers_logits_equal_mlx_with_adapter(base, tmp_path, method):
    if method == "lora":
        adapter = make_adapter(base, tmp_path / "adapter", "lora")
    else:
        adapter = make_adapter(base, tmp_path / "adapter", "dora", seed=2)
    out = fuse(str(base), adapter, tmp_path / "fused")
    model, tokenizer = load_model(str(base), adapter_path=adapter)  # unfused
    ids = prompt_ids(tokenizer)
    assert len(ids) > 40
    expected = np.array(model(mx.array([ids]))[0])
    base_logits = np.array(load_model(str(base))[0](mx.array([ids]))[0])
    assert np.abs(expected - base_logits).max() > 1e-2, "the adapter should change the logits"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.dtype == torch.float32
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - expected).max()
    print(f"{method}: max |transformers - mlx| logit error {err:.2e}")
    assert err < 1e-4


def test_quantized_base_is_dequantized(base, tmp_path):
    """A LoRA on a 4-bit base fuses into a dense fp32 folder that computes what MLX computes."""
    from mlx_lm import convert

    qbase = tmp_path / "q4base"
    convert(str(base), str(qbase), quantize=True, q_group_size=32, q_bits=4)
    assert "quantization" in json.loads((qbase / "config.json").read_text())
    adapter = make_adapter(qbase, tmp_path / "adapter")
    out = fuse(str(qbase), adapter, tmp_path / "fused")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="numpy") as st:
        assert not any(k.endswith((".scales", ".biases")) for k in st.keys())
    model, tokenizer = load_model(str(qbase), adapter_path=adapter)
    ids = prompt_ids(tokenizer)
    expected = np.array(model(mx.array([ids]))[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_untrained_adapter_fuses_to_the_original_weights(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", zero=True)
    out = fuse(str(base), adapter, tmp_path / "fused")
    original = load_file(str(base / "model.safetensors"))
    fused = load_file(str(out / "model.safetensors"))
    assert set(fused) == set(original)
    for k in original:
        np.testing.assert_array_equal(fused[k], original[k].astype(np.float32), err_msg=k)


def test_fused_weight_is_w0_plus_scaled_ba(base, lora):
    adapter, out = lora
    scale = json.loads((adapter / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    ad = load_file(str(adapter / "adapters.safetensors"))
    w0 = load_file(str(base / "model.safetensors"))
    fused = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj"
    a, b = ad[f"{name}.lora_a"], ad[f"{name}.lora_b"]  # mlx-lm: a [in, r], b [r, out], y = x W^T + s (x a) b
    expected = w0[f"{name}.weight"] + scale * (b.T @ a.T)
    np.testing.assert_allclose(fused[f"{name}.weight"], expected, rtol=1e-6, atol=1e-7)
    assert np.abs(scale * (b.T @ a.T)).max() > 1e-3


def test_greedy_generation_equals_mlx(base, lora):
    adapter, out = lora
    model, tokenizer = load_model(str(base), adapter_path=adapter)
    ids = prompt_ids(tokenizer)
    gen = json.loads((out / "generation_config.json").read_text())
    expected = mlx_greedy(model, ids, 20, set(gen["eos_token_id"]))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        # The folder's defaults are the sampling preset; greedy must switch off everything else too.
        seq = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=20, min_new_tokens=0, repetition_penalty=1.0)
    got = seq[0, len(ids):].tolist()
    print("greedy:", got)
    assert got == expected
    assert len(got) >= 5


def test_refuses_to_overwrite_and_replaces_when_asked(base, lora, tmp_path):
    adapter, _ = lora
    out = tmp_path / "fused"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        fuse(str(base), adapter, out)
    assert (out / "keep.txt").read_text() == "mine"
    fuse(str(base), adapter, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no temporary folders left behind
    with pytest.raises(OutputError, match="input folder"):
        fuse(str(base), adapter, adapter, overwrite=True)


def test_cli_fuse(base, lora, tmp_path):
    from mlx_persona.cli import main

    adapter, _ = lora
    runner = CliRunner()
    # --model defaults to the base recorded in adapter_config.json.
    res = runner.invoke(main, ["fuse", "--adapter", str(adapter), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "model.safetensors").exists()
    res = runner.invoke(main, ["fuse", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--overwrite" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["fuse", "--model", str(base), "--adapter", str(tmp_path / "nope"),
                               "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and "no such adapter folder" in res.output
