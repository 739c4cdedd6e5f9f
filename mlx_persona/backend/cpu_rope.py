"""Rotary position embeddings from a table, for MLX's CPU backend (Linux; the same math as ``mx.fast.rope``).

On the CPU, ``mx.fast.rope`` computes a ``cos`` and a ``sin`` for every element it rotates, with scalar
calls: 1.5-1.9 ms for the queries or the keys of one gemma-3-270m layer at 434 positions (2-core AMD EPYC),
twice a layer. :func:`use_table_rope` gives the model's ``nn.RoPE`` modules (mlx-lm's Gemma 3: the default
and the linearly scaled ones) a ``cos``/``sin`` table per frequency set, computed once in float64 and grown
as positions need it, and a rotation compiled into one vectorised kernel (MLX's JIT builds it for this CPU).
Positions are ``offset + i`` for an int offset (one sequence: training, a prompt, decoding); a batch's
per-row offsets (mlx-lm's batched caches) stay with ``mx.fast.rope`` (reading them back would cost a sync a
layer; one position a row is cheap there anyway). The angles are rounded as transformers rounds them
(frequency and ``position x frequency`` in float32), their cos and sin taken in float64.

:func:`mlx_persona.models.load_model` applies it where :func:`mlx_persona.backend.cpu_rewrites_enabled` says.
"""

from __future__ import annotations

import functools

import numpy as np

MIN_ROWS = 1024  # positions in a new table


class _Table:
    """cos and sin of ``position x scale x base**(-2i/dims)`` for positions 0..n-1, as float32 mx.arrays."""

    def __init__(self, dims: int, base: float, scale: float):
        # As transformers rounds it: the frequencies (scaled, for linear scaling) and each angle in float32.
        freq = (1.0 / np.asarray(base, np.float64) ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
        self.inv = freq.astype(np.float32) * np.float32(scale)
        self.n, self.cos, self.sin = 0, None, None

    def rows(self, n: int):
        import mlx.core as mx

        if n > self.n:
            self.n = max(n, 2 * self.n, MIN_ROWS)
            theta = (np.arange(self.n, dtype=np.float32)[:, None] * self.inv[None]).astype(np.float64)
            self.cos, self.sin = mx.array(np.cos(theta), mx.float32), mx.array(np.sin(theta), mx.float32)
        return self.cos, self.sin


_TABLES: dict[tuple, _Table] = {}


def _table(dims: int, base: float, scale: float) -> _Table:
    key = (dims, float(base), float(scale))
    if key not in _TABLES:
        _TABLES[key] = _Table(*key)
    return _TABLES[key]


def _rotate(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@functools.lru_cache(maxsize=1)
def _rotate_compiled():
    import mlx.core as mx

    return mx.compile(_rotate, shapeless=True)


def table_rope(x, dims: int, base: float, scale: float, offset):
    """``mx.fast.rope(x, dims, traditional=False, base=base, scale=scale, offset=offset)`` for x of shape
    ``[..., L, dims]`` (float32) and an int offset >= 0, from the table."""
    import mlx.core as mx

    length, half = x.shape[-2], dims // 2
    cos, sin = _table(dims, base, scale).rows(offset + length)
    # The halves are sliced outside the compiled function: a shapeless one cannot split by a shape.
    first, second = _rotate_compiled()(x[..., :half], x[..., half:], cos[offset:offset + length],
                                       sin[offset:offset + length])
    return mx.concatenate([first, second], axis=-1)


_TABLE_ROPE: dict[type, type] = {}  # nn.RoPE -> our subclass


def _call(self, x, offset=0):
    import mlx.core as mx

    if (self.traditional or x.dtype != mx.float32 or x.shape[-1] != self.dims or x.ndim < 2
            or type(offset) is not int or offset < 0):
        return super(type(self), self).__call__(x, offset)
    return table_rope(x, self.dims, self.base, self.scale, offset)


def use_table_rope(model) -> int:
    """Gives every ``nn.RoPE`` of `model` (exactly that class: not mlx-lm's other RoPE kinds) the table.

    Returns:
        How many modules have it.
    """
    import mlx.nn as nn

    n = 0
    for _, module in model.named_modules():
        cls = type(module)
        if cls is nn.RoPE or cls in _TABLE_ROPE.values():
            if cls is nn.RoPE:
                if cls not in _TABLE_ROPE:
                    _TABLE_ROPE[cls] = type("RoPE", (cls,), {
                        "__call__": _call, "__doc__": "nn.RoPE from a table (mlx_persona.backend.cpu_rope)."})
                module.__class__ = _TABLE_ROPE[cls]
            n += 1
    return n
