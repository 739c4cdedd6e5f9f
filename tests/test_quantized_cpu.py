"""The CPU quantized matmul (backend/native/qmatmul.cpp): MLX's mx.quantized_matmul is the oracle.

Every bits/group-size pair the kernel claims, for 1, 2, 5 and 16 rows of x and an odd number of output
rows; what it does not claim goes to MLX unchanged (and says why); gradients are MLX's; a quantized
built-in model decodes the same greedy tokens with the kernel as with MLX's layers.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from mlx_persona.backend import describe, qmatmul, quantized

CLAIMED = [(bits, gs) for bits in (2, 4, 8) for gs in (32, 64, 128)]


@pytest.fixture(scope="module")
def ext():
    from tests.conftest import need

    module = qmatmul.load()
    need(module is not None, f"the quantized-matmul extension: {qmatmul.status()}")
    return module


def _weights(n: int, k: int, bits: int, gs: int, seed: int = 0):
    mx.random.seed(seed)
    w, scales, biases = mx.quantize(mx.random.normal((n, k)) * 0.1, group_size=gs, bits=bits)
    return w, scales, biases


def _mlx(x, w, scales, biases, gs, bits):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=gs, bits=bits)


def _close(out, ref):
    """`out` (evaluated first: MLX's allocator hands out the buffers of its products again, so an output
    row the kernel left unwritten could otherwise hold the right value) against `ref` to float32 sums
    in another order: a few ulps of the largest partial sums."""
    out = np.array(out)
    ref = np.array(ref)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("bits,gs", CLAIMED)
def test_kernel_matches_mlx_for_every_claimed_format(ext, bits, gs):
    w, scales, biases = _weights(37, 384, bits, gs)
    for rows in (1, 2, 5, 16, 41):
        x = mx.random.normal((rows, 384))
        assert ext.refusal(x, w, scales, biases, gs, bits, quantized.MAX_ROWS) is None
        out = quantized.quantized_matmul(x, w, scales, biases, True, gs, bits)
        assert out.shape == (rows, 37) and out.dtype == mx.float32
        _close(out, _mlx(x, w, scales, biases, gs, bits))


def test_batch_axes_and_strided_x(ext):
    w, scales, biases = _weights(129, 256, 4, 64)
    x = mx.random.normal((2, 3, 256))
    _close(quantized.quantized_matmul(x, w, scales, biases, True, 64, 4), _mlx(x, w, scales, biases, 64, 4))
    strided = mx.random.normal((256, 3)).T  # not row-contiguous
    _close(quantized.quantized_matmul(strided, w, scales, biases, True, 64, 4), _mlx(strided, w, scales, biases, 64, 4))


def test_many_output_rows_split_over_threads(ext):
    w, scales, biases = _weights(4099, 640, 8, 64)  # ~2.6 M weights: many tiles, every thread
    x = mx.random.normal((3, 640))
    _close(quantized.quantized_matmul(x, w, scales, biases, True, 64, 8), _mlx(x, w, scales, biases, 64, 8))


@pytest.mark.parametrize("case,why", [
    ("bits3", "bits other than 2, 4, 8"), ("bits6", "bits other than 2, 4, 8"), ("bf16", "float32"),
    ("rows", "more rows"),
])
def test_what_the_kernel_does_not_take_is_mlx_s_product(ext, case, why):
    bits = {"bits3": 3, "bits6": 6}.get(case, 4)
    w, scales, biases = _weights(33, 128, bits, 64)
    x = mx.random.normal((17 if case == "rows" else 2, 128))
    if case == "bf16":
        x, scales, biases = x.astype(mx.bfloat16), scales.astype(mx.bfloat16), biases.astype(mx.bfloat16)
    max_rows = 16 if case == "rows" else quantized.MAX_ROWS
    assert why in ext.refusal(x, w, scales, biases, 64, bits, max_rows)
    out = ext.quantized_matmul(x, w, scales, biases, 64, bits, max_rows)
    assert mx.array_equal(out, _mlx(x, w, scales, biases, 64, bits)).item()


def test_transpose_false_and_other_modes_stay_mlx_s(ext):
    w, scales, biases = _weights(128, 64, 4, 64)
    x = mx.random.normal((2, 128))
    ref = mx.quantized_matmul(x, w, scales, biases, transpose=False, group_size=64, bits=4)
    assert mx.array_equal(quantized.quantized_matmul(x, w, scales, biases, False, 64, 4), ref).item()
    wf, sf = mx.quantize(mx.random.normal((16, 64)), mode="mxfp4")
    ref = mx.quantized_matmul(x[:, :64], wf, sf, transpose=True, mode="mxfp4")
    assert mx.array_equal(quantized.quantized_matmul(x[:, :64], wf, sf, None, True, 32, 4, "mxfp4"), ref).item()


def test_gradients_are_mlx_s(ext):
    w, scales, biases = _weights(40, 128, 4, 32)
    x = mx.random.normal((3, 128))
    cot = mx.random.normal((3, 40))

    def loss(fn):
        return lambda x, s, b: (fn(x, w, s, b) * cot).sum()

    ours = mx.grad(loss(lambda x, w, s, b: quantized.quantized_matmul(x, w, s, b, True, 32, 4)), argnums=(0, 1, 2))
    ref = mx.grad(loss(lambda x, w, s, b: _mlx(x, w, s, b, 32, 4)), argnums=(0, 1, 2))
    for a, b in zip(ours(x, scales, biases), ref(x, scales, biases)):
        _close(a, b)


def _quantized_tiny(tmp_path, tiny_path, bits: int, gs: int):
    from mlx_lm import convert

    out = tmp_path / f"tiny-q{bits}"
    convert(str(tiny_path), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=gs)
    return out


def _greedy(model, ids, n):
    from mlx_persona.generation import token_steps

    return list(token_steps(model, ids, lambda logprobs: mx.argmax(logprobs, axis=-1), [], max_tokens=n))


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, 64)])
def test_quantized_tiny_model_same_greedy_tokens(ext, tmp_path, tiny_path, bits, gs):
    from mlx_persona.models import load_model

    model, tok = load_model(_quantized_tiny(tmp_path, tiny_path, bits, gs))
    kinds = {type(m) for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert kinds and all(k.__module__ == quantized.__name__ for k in kinds)  # every quantized layer has it
    ids = tok.encode("Hi Bluey! What game shall we play in the backyard today?")
    fast = _greedy(model, ids, 24)
    assert quantized.use_mlx_quantized(model) > 0
    assert _greedy(model, ids, 24) == fast
    assert quantized.use_fast_quantized(model) > 0 and _greedy(model, ids, 24) == fast


def test_describe_says_whether_it_is_on(ext):
    assert describe()["quantized"].startswith("on: 2/4/8-bit")


def test_switched_off_nothing_is_built_and_doctor_says_so(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import mlx_persona.backend as b; b.setup(); from mlx_persona.backend import qmatmul; "
            "print(qmatmul.load(), b.describe()['quantized'])")
    env = {**os.environ, "MLX_PERSONA_QMATMUL": "0", "MLX_PERSONA_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None off (MLX_PERSONA_QMATMUL=0): MLX's quantized matmul"
    assert not (tmp_path / "qmatmul").exists()


def test_a_nanobind_of_another_abi_is_refused_before_building(ext, monkeypatch, tmp_path):
    import mlx.core

    assert qmatmul.mlx_abi(mlx.core.__file__) is not None  # MLX's module names its nanobind ABI
    fake = tmp_path / "nanobind"
    (fake / "src").mkdir(parents=True)
    (fake / "include" / "nanobind").mkdir(parents=True)
    (fake / "src" / "nb_internals.h").write_text("#  define NB_INTERNALS_VERSION 99\n")
    (fake / "include" / "nanobind" / "nb_backend.h").write_text("#define NB_BACKEND_ABI_MAJOR 1\n")
    assert qmatmul.nanobind_abi(fake) == ("1", "99")
    monkeypatch.setattr(qmatmul, "nanobind_abi", lambda where: ("1", "99"))
    with pytest.raises(OSError, match=r"cannot share arrays with MLX .* install the nanobind"):
        qmatmul.build(tmp_path / "cache")
    assert not (tmp_path / "cache" / "qmatmul").exists()
