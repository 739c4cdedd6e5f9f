"""The next token's draw on the CPU (``native/draw.c``): transformers' warpers and the categorical draw, or
the greedy argmax, for a whole batch of rows in one call.

On MLX's CPU backend every vocabulary-wide op of :class:`~mlx_persona.sampling.HFSampler` runs on one core
with scalar reductions: at Gemma's 262,144-entry vocabulary the log-softmax before the draw and the draw
took ~3.5 ms a row every token (2-core AMD EPYC), 50 ms a step for 16 rows against ~85 for the model. The
kernel reads each row once (a maximum per block of 64 logits) and does the rest on the few blocks that can
hold the top-k: ~0.1 ms a row, the rows spread over the native layer's threads. It draws from the
distribution :func:`mlx_persona.sampling.warpers.warp` defines (tests compare the two), with a generator of
its own: splitmix64 of (seed, counter, slot), so a seeded row's tokens depend on its seed, its count of
draws and its logits alone, as with MLX's key chains, but are not the tokens MLX's generator would draw.

Used where the default device is the CPU and the native layer is loaded (:mod:`.sgemm`); on a GPU, or with
``MLX_PERSONA_CPU_DRAW=0``, the sampler stays MLX ops. Sampling with ``top_k`` off (0, or >= the vocabulary)
needs a sort of the whole vocabulary and stays MLX ops too.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mlx_persona.backend import sgemm

ENV = "MLX_PERSONA_CPU_DRAW"
_calls = [0]


class Settings(NamedTuple):
    """One row's draw: temperature <= 0 is greedy; else 0 < top_k < vocab."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int  # 64 bits
    counter: int  # the row's draws so far


def _lib():
    lib = sgemm._state["lib"]
    if lib is None or not hasattr(lib, "mlxp_draw"):
        return None
    f = lib.mlxp_draw
    if f.argtypes is None:
        p = ctypes.c_void_p
        f.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, p, p, p, p, p]
        f.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether draws go to the kernel: the CPU is MLX's default device, the native layer is loaded and
    ``MLX_PERSONA_CPU_DRAW`` is not 0."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "no", "false"):
        return False
    import mlx.core as mx

    return mx.default_device() == mx.cpu and _lib() is not None


def calls() -> int:
    """Kernel calls since start (a test's proof that the kernel, not MLX, drew)."""
    return _calls[0]


def _rows(rows: Sequence) -> tuple[list[np.ndarray], int]:
    import mlx.core as mx

    mx.eval(*rows)
    views = []
    for row in rows:
        if row.dtype != mx.float32:
            raise TypeError(f"the CPU draw takes float32 logits, not {row.dtype}")
        view = np.asarray(memoryview(row)).reshape(-1)  # MLX's buffer, no copy
        views.append(view if view.flags.c_contiguous else np.ascontiguousarray(view))
    sizes = {v.size for v in views}
    if len(sizes) != 1:
        raise ValueError(f"rows of different widths: {sorted(sizes)}")
    return views, sizes.pop()


def _run(rows: Sequence, settings: Sequence[Settings], probs: np.ndarray | None) -> np.ndarray:
    lib = _lib()
    if lib is None:
        raise RuntimeError("the native layer is not loaded")
    if len(rows) != len(settings):
        raise ValueError(f"{len(rows)} rows and {len(settings)} settings")
    views, vocab = _rows(rows)
    for s in settings:
        if s.temperature > 0 and not 0 < s.top_k < vocab:
            raise ValueError(f"the CPU draw needs 0 < top_k < {vocab} when sampling, got {s.top_k}")
    n = len(views)
    pointers = (ctypes.c_void_p * n)(*(v.ctypes.data for v in views))
    col = {name: np.array([getattr(s, name) for s in settings], dtype)
           for name, dtype in (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
                               ("min_p", np.float32), ("seed", np.uint64), ("counter", np.uint64))}
    token = np.zeros(n, np.int32)
    args = [col[k].ctypes.data for k in ("temperature", "top_k", "top_p", "min_p", "seed", "counter")]
    rc = lib.mlxp_draw(n, vocab, ctypes.cast(pointers, ctypes.c_void_p), *args, token.ctypes.data,
                       None if probs is None else probs.ctypes.data)
    _calls[0] += 1
    if rc != 0:
        raise MemoryError("out of memory in the CPU draw")
    return token


def draw(rows: Sequence, settings: Sequence[Settings]) -> np.ndarray:
    """One token per row (int32): `rows` are float32 MLX arrays of one width (logits, processed logits or
    log-probabilities: the draw is invariant to a shift of a row), evaluated here."""
    return _run(rows, settings, None)


def distribution(rows: Sequence, settings: Sequence[Settings]) -> np.ndarray:
    """``[rows, vocab]`` float32: the probability the draw gives each token (0 where excluded). For tests."""
    views, vocab = _rows(rows)
    probs = np.zeros((len(views), vocab), np.float32)
    _run(rows, settings, probs)
    return probs
