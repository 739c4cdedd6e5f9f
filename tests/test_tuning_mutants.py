"""Known answers for tuning.py's loss where the other tests do not look, written to kill the mutants they
let live (`make mutate TARGETS=tuning-loss`): logits far from zero (the online softmax's running max
must start at -inf), the reduction's fast path, and every head `loss_fn` can meet (tied, untied, quantized,
LoRA-wrapped), each against the model's own logits; and what `attach_adapters` adapts and returns."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters, trainable_parameter_count
from mlx_persona.tuner.losses import _rows, lm_head_cross_entropy, lm_head_weight, loss_fn


def _reference(h, w, t):
    """Cross-entropy and d(sum of losses)/dh in float64 from the same float32 inputs."""
    h, w = np.array(h, np.float64), np.array(w, np.float64)
    logits = h @ w.T
    m = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - m)
    p /= p.sum(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
    t = np.array(t)
    onehot = np.eye(w.shape[0])[t]
    return lse - logits[np.arange(len(t)), t], (p - onehot) @ w


@pytest.mark.parametrize("shift", [-1000.0, 1000.0])
def test_cross_entropy_with_logits_far_from_zero(shift):
    # Every logit near `shift` (a last hidden unit of 1 against a last weight column of `shift`): a running
    # max that started anywhere but -inf would under- (exp(-1000) = 0) or overflow (exp(1000) = inf).
    mx.random.seed(3)
    n, d, v, chunk = 5, 8, 600, 256
    h = mx.concatenate([0.5 * mx.random.normal((n, d - 1)), mx.ones((n, 1))], axis=1)
    w = mx.concatenate([0.5 * mx.random.normal((v, d - 1)), mx.full((v, 1), shift)], axis=1)
    t = mx.array([0, 255, 256, 511, 599])
    loss, grad = mx.value_and_grad(lambda h: lm_head_cross_entropy(h, w, t, chunk).sum())(h)
    per_token = lm_head_cross_entropy(h, w, t, chunk)
    want, want_grad = _reference(h, w, t)
    # Measured against float64: per token 3.1e-5, the sum 1.0e-4, the gradient 1.8e-4 (float32 logits near
    # 1000 carry ~6e-5 each); ~10x that here. A wrong start gives -inf or nan.
    np.testing.assert_allclose(np.array(per_token), want, rtol=0, atol=3e-4)
    np.testing.assert_allclose(loss.item(), want.sum(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(np.array(grad), want_grad, rtol=0, atol=2e-3)


@pytest.mark.parametrize("op", ["max", "sum"])
def test_rows_takes_the_blocked_path_for_multiples_of_128(op):
    # The same reduction as the explicit [N, C/128, 128] two-step for C = 256 (bit for bit: same ops on the
    # same machine), and the plain last-axis reduction for C = 128 and C = 200.
    mx.random.seed(4)
    x = mx.random.normal((3, 256))
    two_step = getattr(getattr(x.reshape(3, 2, 128), op)(axis=1), op)(axis=-1)
    assert np.array_equal(np.array(_rows(x, op)), np.array(two_step))
    big = mx.random.normal((2, 16384))  # a loss_chunk of 16384: 128 blocks of 128
    want = getattr(getattr(big.reshape(2, 128, 128), op)(axis=1), op)(axis=-1)
    assert np.array_equal(np.array(_rows(big, op)), np.array(want))
    for c in (128, 200):
        y = mx.random.normal((3, c))
        assert np.array_equal(np.array(_rows(y, op)), np.array(getattr(y, op)(axis=-1)))
    if op == "sum":  # the test above only distinguishes the paths where the orders round differently
        assert not np.array_equal(np.array(two_step), np.array(x.sum(axis=-1)))


def _head_stub(**kw):
    emb = nn.Embedding(8, 4)
    return SimpleNamespace(model=SimpleNamespace(embed_tokens=emb), **kw), emb


def test_lm_head_weight_picks_the_tied_embedding_unless_untied():
    lin = nn.Linear(4, 8, bias=False)
    m, emb = _head_stub(tie_word_embeddings=True, lm_head=lin)  # tied wins over a present head
    assert lm_head_weight(m) is emb.weight
    m, emb = _head_stub(lm_head=lin)  # no flag: tied
    assert lm_head_weight(m) is emb.weight
    m, emb = _head_stub(tie_word_embeddings=False, lm_head=lin)
    assert lm_head_weight(m) is lin.weight
    m, emb = _head_stub(tie_word_embeddings=False)  # untied but no head: the embedding
    assert lm_head_weight(m) is emb.weight
    m, _ = _head_stub(tie_word_embeddings=False, lm_head=nn.QuantizedLinear(64, 8, bias=False))
    assert lm_head_weight(m) is None
    m = SimpleNamespace(model=SimpleNamespace(embed_tokens=nn.QuantizedEmbedding(8, 64)))
    assert lm_head_weight(m) is None


def _untie(model, kind):
    """Gives the tiny model its own output head: a Linear, a quantized Linear, or a LoRA-wrapped Linear."""
    from mlx_lm.tuner.lora import LoRALinear

    d, v = model.model.embed_tokens.weight.shape[1], model.model.embed_tokens.weight.shape[0]
    head = nn.Linear(d, v, bias=False)
    head.weight = 0.05 * mx.random.normal((v, d))
    if kind == "quantized":
        head = nn.QuantizedLinear.from_linear(head, group_size=32, bits=8)
    elif kind == "lora":
        head = LoRALinear.from_base(head, r=4, scale=2.0)
        head.lora_b = 0.1 * mx.random.normal(head.lora_b.shape)  # a trained-looking adapter
    model.lm_head = head
    model.tie_word_embeddings = False


HEADS = ["tied", "tied-quantized", "untied", "untied-quantized", "untied-lora", "tied-quantized-spare-head",
         "unflagged-quantized-spare-head"]


@pytest.mark.parametrize("head", HEADS)
def test_loss_fn_equals_the_models_own_logits_for_every_head(tiny_path, head):
    """A quantized embedding with a spare `lm_head` beside it: tied (or without the flag, which counts as
    tied, as in `lm_head_weight`) means the embedding is the head, whatever else the model holds."""
    model, tok = load_model(tiny_path)
    mx.random.seed(5)
    if head.startswith(("tied-quantized", "unflagged")):
        nn.quantize(model, group_size=32, bits=8)
    if head.startswith("untied"):
        _untie(model, head.split("-")[1] if "-" in head else "plain")
    if head.endswith("spare-head"):
        _untie(model, "plain")
        model.tie_word_embeddings = True
        if head.startswith("unflagged"):
            del model.tie_word_embeddings
    assert (lm_head_weight(model) is None) == (head not in ("tied", "untied"))
    ids = tok.encode("Bingo and Bluey play keepy uppy with Dad in the garden.")
    x, y = mx.array([ids[:-1], ids[1:]]), mx.array([ids[1:], ids[2:] + ids[:1]])
    L = x.shape[1]
    positions = mx.array([1, 4, L + 2, L + 7, 0], dtype=mx.int32)
    weights = mx.array([1.0, 1.0, 1.0, 1.0, 0.0])
    loss, n = loss_fn(model, x, y, positions, weights, mx.array(8.0), chunk=512)
    if head.startswith("unflagged"):  # Gemma's __call__ reads the flag; the tied head by hand
        logits = model.model.embed_tokens.as_linear(model.model(x))
    else:
        logits = model(x)
    logits = logits.reshape(-1, logits.shape[-1])
    per_token = nn.losses.cross_entropy(logits.astype(mx.float32), y.reshape(-1))
    want = per_token[mx.array([1, 4, L + 2, L + 7])].sum().item() / 8.0
    assert n.item() == 4.0
    # Measured: relative difference <= 6.2e-8 (float32, the same head computed two ways); the masked-out
    # position 0 alone would add ~7.7 / 8.
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)


# --- adapters (`make mutate TARGETS=tuning-adapters`) ----------------------------------------------


def _adapted_blocks(model):
    """Indices of the blocks with a LoRA/DoRA layer in them, and the set of adapted paths."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    blocks, paths = set(), set()
    for i, layer in enumerate(model.layers):
        for path, module in layer.named_modules():
            if isinstance(module, (LoRALinear, DoRALinear)):
                blocks.add(i)
                paths.add(path)
    return blocks, paths


@pytest.mark.parametrize("num_layers, blocks", [(-1, {0, 1, 2, 3}), (None, {0, 1, 2, 3}), (2, {2, 3}),
                                                (9, {0, 1, 2, 3}), (1, {3})])
def test_attach_adapters_returns_mlx_lm_config_and_adapts_the_last_blocks(tiny_path, num_layers, blocks):
    model, _ = load_model(tiny_path)
    cfg = attach_adapters(model, "lora", rank=4, alpha=10.0, dropout=0.05, modules=["v_proj", "q_proj"],
                          num_layers=num_layers)
    assert cfg == {"fine_tune_type": "lora", "num_layers": len(blocks), "alpha": 10.0,
                   "lora_parameters": {"rank": 4, "scale": 2.5, "dropout": 0.05,
                                       "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
    got_blocks, paths = _adapted_blocks(model)
    assert got_blocks == blocks and paths == {"self_attn.q_proj", "self_attn.v_proj"}
    # Frozen base: only the adapters train (2 layers x rank 4 x (in + out) per block).
    assert trainable_parameter_count(model) == len(blocks) * 4 * ((64 + 64) + (64 + 32))


def test_attach_adapters_dora_full_and_errors(tiny_path):
    from mlx_lm.tuner.dora import DoRALinear

    model, _ = load_model(tiny_path)
    cfg = attach_adapters(model, "dora", rank=2, alpha=2.0, modules=["down_proj"])
    assert cfg["fine_tune_type"] == "dora" and cfg["lora_parameters"]["scale"] == 1.0
    assert isinstance(model.layers[0].mlp.down_proj, DoRALinear)
    model, _ = load_model(tiny_path)
    assert attach_adapters(model, "full", num_layers=2) == {"fine_tune_type": "full", "num_layers": 4}
    model, _ = load_model(tiny_path)
    with pytest.raises(ValueError, match="method must be lora, dora or full, not 'qlora'"):
        attach_adapters(model, "qlora", modules=["q_proj"])
    with pytest.raises(ValueError, match=r"lora.modules: no layer named nope, zzz in this model"):
        attach_adapters(model, "lora", modules=["q_proj", "zzz", "nope"])
    with pytest.raises(ValueError, match=r"no layer named input_layernorm"):  # a module, but not a Linear
        attach_adapters(model, "lora", modules=["input_layernorm"])


def test_attach_adapters_to_a_quantized_model(tiny_path):
    model, _ = load_model(tiny_path)
    nn.quantize(model, group_size=32, bits=8)
    cfg = attach_adapters(model, "lora", rank=4, alpha=8.0, modules=["o_proj"])
    assert cfg["lora_parameters"]["keys"] == ["self_attn.o_proj"]
    assert _adapted_blocks(model) == ({0, 1, 2, 3}, {"self_attn.o_proj"})


def test_attach_adapters_defaults(tiny_path):
    model, _ = load_model(tiny_path)
    assert attach_adapters(model, "lora", modules=["q_proj"]) == {
        "fine_tune_type": "lora", "num_layers": 4, "alpha": 16.0,
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}
    assert _adapted_blocks(model) == ({0, 1, 2, 3}, {"self_attn.q_proj"})


def test_module_keys_finds_linear_layers_at_any_depth():
    from mlx_persona.tuner.adapters import _module_keys

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = {"inner": Inner()}
            self.down_proj = nn.Linear(4, 4)

    stub = SimpleNamespace(layers=[Block(), Block()])
    assert _module_keys(stub, ["q_proj", "down_proj"]) == {"attn.inner.q_proj", "down_proj"}
    with pytest.raises(ValueError, match="no layer named inner in this model"):
        _module_keys(stub, ["q_proj", "inner"])  # a module, but not a Linear
