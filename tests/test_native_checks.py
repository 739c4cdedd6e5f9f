"""The native layer's whole-array checks (mlx_persona.backend.checks, native/check.c) against numpy's isfinite."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_persona.backend import checks, sgemm
from mlx_persona.safe_io import first_nonfinite

pytestmark = pytest.mark.skipif(not sgemm.active(), reason="the native layer is not loaded (no gcc?)")

BAD = [np.nan, np.inf, -np.inf, np.uint32(0x7FC00001).view(np.float32), np.uint32(0xFF800001).view(np.float32)]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 65535, 65536, 65537, 300001])
def test_every_place_and_kind_of_nonfinite_is_found(n):
    rng = np.random.default_rng(n)
    clean = rng.normal(size=n).astype(np.float32)
    clean[: min(n, 4)] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, 1e-45, -0.0][: min(n, 4)]
    assert checks.has_nonfinite(mx.array(clean)) is False
    for where in sorted({0, n // 2, n - 1}):
        for value in BAD:
            x = clean.copy()
            x[where] = value
            assert not np.isfinite(x).all()
            assert checks.has_nonfinite(mx.array(x)) is True, (n, where, value)


def test_first_nonfinite_names_the_tensor_on_either_path():
    tensors = {"a": mx.zeros((300, 300)), "b": mx.ones((7,), dtype=mx.bfloat16), "c": mx.zeros((70000,)),
               "ids": mx.array([1, 2, 3])}
    assert first_nonfinite(tensors) is None
    assert checks.has_nonfinite(tensors["b"]) is None  # not float32: MLX checks it
    assert first_nonfinite({**tensors, "c": tensors["c"].at[69999].add(float("inf"))}) == "c"
    assert first_nonfinite({**tensors, "b": tensors["b"].at[3].add(float("nan"))}) == "b"
    assert first_nonfinite({**tensors, "a": tensors["a"].at[299, 299].add(float("nan")),
                            "c": tensors["c"].at[0].add(float("inf"))}) == "a"
