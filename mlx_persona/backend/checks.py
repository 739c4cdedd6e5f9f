"""Checks over whole arrays by the native layer (``native/check.c``), where MLX's CPU ops are slow.

``mx.isfinite(w).all()`` runs on one core at ~6 ns an element on the CPU backend: 6.4 s of gemma-3-1b's
load (2-core AMD EPYC), 1.6 s of the 270m's, on every start of generate, eval, serve or train. The native
check reads the bits on the native layer's threads instead (0.2 s for the 1b).
"""

from __future__ import annotations

import ctypes

from mlx_persona.backend import sgemm


def has_nonfinite(array) -> bool | None:
    """Whether the float32 MLX `array` (evaluated) holds NaN or inf; None where this cannot tell (the native
    layer is not loaded, or `array` is not a contiguous float32 array on the CPU), for the caller's own check."""
    import mlx.core as mx
    import numpy as np

    lib = sgemm._state["lib"]
    if lib is None or array.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return None
    view = np.asarray(memoryview(array))  # MLX's buffer, no copy
    if not view.flags.c_contiguous:
        return None
    f = lib.mlxp_has_nonfinite
    if f.argtypes is None:
        f.argtypes = [ctypes.c_void_p, ctypes.c_long]
    return bool(f(view.ctypes.data, view.size))
