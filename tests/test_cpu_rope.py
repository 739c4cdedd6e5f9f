"""RoPE from a table on the Linux CPU (mlx_persona/backend/cpu_rope.py) against mx.fast.rope, which it
replaces, and against transformers' rotation (its float32 rounding of the angles)."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mlx_persona.backend.cpu_rope import table_rope, use_table_rope  # noqa: E402


def _hf(x: np.ndarray, base: float, scale: float, offset: int) -> np.ndarray:
    """transformers' rotate_half RoPE (Llama/Gemma), in float32 as it computes it."""
    import torch

    d = x.shape[-1]
    inv = (1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)) * scale
    freqs = torch.arange(offset, offset + x.shape[-2]).float()[:, None] * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    t = torch.from_numpy(x)
    return (t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin).numpy()


@pytest.mark.parametrize("shape,base,scale,offset", [
    ((2, 4, 30, 16), 10000.0, 1.0, 0), ((3, 1, 45, 16), 1e6, 0.125, 7), ((1, 4, 1, 256), 10000.0, 1.0, 300),
    ((2, 2, 100, 32), 10000.0, 1.0, 1500), ((1, 4, 434, 256), 1e6, 0.125, 0)])
def test_table_rope_equals_fast_rope_and_transformers_forward_and_backward(shape, base, scale, offset):
    x, w = mx.random.normal(shape), mx.random.normal(shape)
    d = shape[-1]

    def fast(x):
        return mx.fast.rope(x, d, traditional=False, base=base, scale=scale, offset=offset)

    def ours(x):
        return table_rope(x, d, base, scale, offset)

    tol = 2e-6 * max(1, offset + shape[-2])  # float32 angles: the error grows with the position
    assert float(mx.abs(ours(x) - fast(x)).max()) < tol
    assert np.abs(np.array(ours(x)) - _hf(np.array(x), base, scale, offset)).max() < tol
    g_fast = mx.grad(lambda x: (fast(x) * w).sum())(x)
    g_ours = mx.compile(mx.grad(lambda x: (ours(x) * w).sum()))(x)  # compiled, as in a training step
    assert float(mx.abs(g_ours - g_fast).max()) < tol


def test_a_model_gets_the_table_and_keeps_its_logits(tiny_path):
    import mlx.nn as nn
    from mlx_lm.utils import load

    from mlx_persona.models import load_model

    model, tok = load_model(tiny_path)
    ropes = [m for _, m in model.named_modules() if isinstance(m, nn.RoPE)]
    assert ropes and all(type(m) is not nn.RoPE for m in ropes)  # every one is ours
    plain, _ = load(str(tiny_path))
    assert use_table_rope(plain) == len(ropes)
    ids = mx.array([tok.encode("Hello there, little pup! What are we playing today? " * 6)])
    for m in ropes:
        m.__class__ = nn.RoPE
    want = model(ids)
    use_table_rope(model)
    got = model(ids)
    assert float(mx.abs(got - want).max() / mx.abs(want).max()) < 1e-4
