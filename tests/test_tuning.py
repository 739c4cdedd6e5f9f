"""Known-answer tests for adapters and the fused LM-head loss."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters, trainable_parameter_count
from mlx_persona.tuner.config import DEFAULT_LORA_MODULES
from mlx_persona.tuner.losses import lm_head_cross_entropy, loss_fn


@pytest.fixture
def tiny(tiny_path):
    return load_model(tiny_path)


def _lora_count(cfg, rank, modules, dora=False):
    h, kv, hd, nh, inter = cfg["hidden_size"], cfg["num_key_value_heads"], cfg["head_dim"], \
        cfg["num_attention_heads"], cfg["intermediate_size"]
    shapes = {"q_proj": (h, nh * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (nh * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(rank * (i + o) + (o if dora else 0) for m, (i, o) in shapes.items() if m in modules)
    return per_layer * cfg["num_hidden_layers"]


@pytest.mark.parametrize("method, modules", [("lora", DEFAULT_LORA_MODULES), ("lora", ["q_proj", "v_proj"]),
                                             ("dora", DEFAULT_LORA_MODULES)])
def test_trainable_parameter_count_is_exact(tiny, tiny_path, method, modules):
    import json

    cfg = json.loads((tiny_path / "config.json").read_text())
    model, _ = tiny
    attach_adapters(model, method, rank=4, alpha=8, modules=modules)
    assert trainable_parameter_count(model) == _lora_count(cfg, 4, modules, dora=method == "dora")


def test_full_trains_every_weight_including_embeddings(tiny):
    model, _ = tiny
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    attach_adapters(model, "full")
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert "model.embed_tokens.weight" in names
    assert trainable_parameter_count(model) == total


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_untrained_adapter_changes_nothing(tiny, method):
    model, tok = tiny
    x = mx.array([tok.encode("Hooray! Let's play keepy uppy with Bingo in the backyard.")])
    before = model(x)
    attach_adapters(model, method, rank=8, alpha=16, modules=DEFAULT_LORA_MODULES)
    after = model(x)
    np.testing.assert_allclose(np.array(after), np.array(before), atol=1e-6)


@pytest.mark.parametrize("chunk", [256, 1000, 4096])
def test_chunked_cross_entropy_matches_naive_with_gradients(chunk):
    mx.random.seed(1)
    n, d, v = 9, 16, 2100  # vocab not a multiple of the chunk
    h = mx.random.normal((n, d))
    w = 0.3 * mx.random.normal((v, d))
    t = mx.random.randint(0, v, (n,))
    naive = lambda h, w: (nn.losses.cross_entropy(h @ w.T, t) * mx.arange(1, n + 1)).sum()  # noqa: E731
    ours = lambda h, w: (lm_head_cross_entropy(h, w, t, chunk) * mx.arange(1, n + 1)).sum()  # noqa: E731
    np.testing.assert_allclose(ours(h, w).item(), naive(h, w).item(), rtol=1e-5)
    g_naive = mx.grad(naive, argnums=(0, 1))(h, w)
    g_ours = mx.grad(ours, argnums=(0, 1))(h, w)
    for a, b in zip(g_ours, g_naive):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_chunked_cross_entropy_memory_does_not_grow_with_the_vocabulary():
    # Only a few chunks' worth of logits may be alive at once, whatever the vocabulary: with 64 chunks
    # the peak stays under 12 chunks (eager evaluation; compiled fuses further), a fraction of the
    # [tokens x vocab] logits that a plain cross-entropy materialises.
    mx.random.seed(2)
    n, d, v, chunk = 64, 32, 65536, 1024
    h, w = mx.random.normal((n, d)), 0.1 * mx.random.normal((v, d))
    t = mx.random.randint(0, v, (n,))
    mx.eval(h, w, t)
    grad = mx.grad(lambda h: lm_head_cross_entropy(h, w, t, chunk).sum())
    mx.eval(grad(h))  # warm-up
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(grad(h))
    extra = mx.get_peak_memory() - base
    chunk_bytes = n * chunk * 4
    assert extra < 12 * chunk_bytes, (extra / chunk_bytes, "chunks of logits alive at the peak")
    assert extra < 0.2 * n * v * 4


def test_loss_fn_equals_full_logits_cross_entropy(tiny):
    model, tok = tiny
    ids = tok.encode("G'day! Mum says brekkie is ready, hooray!")
    x = mx.array([ids[:-1]])
    y = mx.array([ids[1:]])
    positions = mx.array([2, 3, 5, 0], dtype=mx.int32)
    weights = mx.array([1.0, 1.0, 1.0, 0.0])
    loss, n = loss_fn(model, x, y, positions, weights, mx.array(3.0))
    ref = nn.losses.cross_entropy(model(x)[0], y[0])[mx.array([2, 3, 5])].mean()
    assert n.item() == 3
    np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)
