"""The dtype each MLX device is fast at, and a matmul throughput probe (for doctor and benchmarks)."""

from __future__ import annotations

import time


def default_dtype():
    """fp32 on the CPU backend (only fp32 matmuls reach BLAS there), bf16 on a GPU."""
    import mlx.core as mx

    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def dtype_from_name(name: str):
    """Maps 'auto' | 'float32' | 'bfloat16' | 'float16' to an MLX dtype."""
    import mlx.core as mx

    if name in (None, "auto"):
        return default_dtype()
    table = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16,
             "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def matmul_gflops(n: int = 2048, dtype=None, trials: int = 5) -> float:
    """Measures a square matmul's throughput (median of `trials`, after a warm-up) in GFLOP/s."""
    import mlx.core as mx

    dtype = dtype or default_dtype()
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    mx.eval(a @ b)
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9
