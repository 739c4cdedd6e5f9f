"""What the logits processing accepts: token histories as 1-D int32, logits as float32, end ids
as distinct ids inside the vocabulary. Shared by the processors, the warpers and the sampler."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import mlx.core as mx
import numpy as np

NEG_INF = float("-inf")


def to_float32(x: mx.array) -> mx.array:
    # transformers' generate upcasts the next-token logits to float32 before any processor
    # (`outputs.logits[:, -1].to(dtype=torch.float32)`); on Metal mlx-lm hands us bf16.
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def eos_ids(eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, (int, np.integer)):
        return [int(eos_token_ids)]
    return sorted({int(i) for i in eos_token_ids})


def ids_in_vocab(ids: Iterable[int], vocab_size: int) -> mx.array:
    """Distinct ids in [0, vocab) as int32 (host-side; for prompt and end ids, known up front).

    Ids >= vocab are dropped, as transformers does (it clamps them to a spare column in the
    repetition-penalty and n-gram processors, and `torch.isin` over the vocab ignores them for
    min_new_tokens); the model cannot emit them anyway. A Python set, not ``np.unique``: that one imports
    ``numpy.ma`` on its first call, 60-380 ms of the first token of a process here.
    """
    kept = sorted({i for i in map(int, ids) if 0 <= i < vocab_size})
    return mx.array(kept, dtype=mx.int32)



def as_token_array(tokens: Any) -> mx.array:
    arr = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, dtype=np.int64))
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D (or [1, n]), got shape {tuple(arr.shape)}")
    return arr if arr.dtype == mx.int32 else arr.astype(mx.int32)

