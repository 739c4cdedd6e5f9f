"""Pinned weights: with ``MLX_PERSONA_MATMUL=bf16``, a bf16 copy of each frozen weight, made once.

Without it the sgemm layer rounds a weight to bf16 inside every product it enters. With it the product reads
the copy (2 bytes a weight instead of 4): a decoded token reads half the bytes, and a LoRA step rounds no
frozen weight. The layer finds the copy by the address MLX hands it (``native/pinned.c``); this module keeps
a reference to every pinned array until it is unpinned, so that its memory is not freed or reused while the
copy stands for it. A pinned weight costs half its float32 size again in memory.

:func:`mlx_persona.models.load_model` pins every large 2-D weight of the models it loads; the training run
unpins what it trains (:func:`pin_frozen`): a full fine-tune pins nothing. A no-op unless bf16 inputs are on.
"""

from __future__ import annotations

import ctypes

from mlx_persona.backend import sgemm

MIN_ELEMENTS = 1 << 16  # smaller weights are not worth a copy
_pinned: dict[int, object] = {}  # address -> the mx.array it belongs to


def _lib():
    lib = sgemm._state["lib"]
    if lib is None or not sgemm.bf16_active():
        return None
    lib.mlxp_pin.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.mlxp_unpin.argtypes = [ctypes.c_void_p]
    lib.mlxp_pinned_bytes.restype = ctypes.c_long
    return lib


def _address(array) -> int | None:
    """The address of a row-contiguous 2-D float32 array's first element (evaluated), or None."""
    import mlx.core as mx
    import numpy as np

    if array.ndim != 2 or array.dtype != mx.float32 or array.size < MIN_ELEMENTS or min(array.shape) < sgemm.MIN_DIM:
        return None
    mx.eval(array)
    view = np.asarray(memoryview(array))  # MLX's own buffer, no copy
    return view.ctypes.data if view.flags.c_contiguous else None


def pin(arrays) -> int:
    """Pins each of `arrays` that qualifies (2-D float32, row-contiguous, large). Returns how many are pinned
    now. Out of memory for a copy: that weight stays unpinned."""
    lib = _lib()
    if lib is None:
        return 0
    for array in arrays:
        address = _address(array)
        if address is None or address in _pinned:
            continue
        if lib.mlxp_pin(address, array.shape[0], array.shape[1]) == 0:
            _pinned[address] = array
    return len(_pinned)


def unpin(arrays) -> None:
    """Drops the copies of `arrays` (waits for any product reading one)."""
    lib = sgemm._state["lib"]
    for array in arrays:
        address = _address(array)
        if address is not None and _pinned.pop(address, None) is not None:
            lib.mlxp_unpin(address)


def unpin_all() -> None:
    lib = sgemm._state["lib"]
    for address in list(_pinned):
        lib.mlxp_unpin(address)
    _pinned.clear()


def _unpin_addresses(addresses: list[int]) -> None:
    lib = sgemm._state["lib"]
    for address in addresses:
        if _pinned.pop(address, None) is not None:
            lib.mlxp_unpin(address)


def pin_model(model) -> int:
    """Pins every large 2-D weight of `model` (generation: none changes), for as long as `model` lives: when
    it is garbage, its copies go, and with them the references that kept its weights' memory (a process that
    loads one model after another, as ``compare`` and ``sweep`` do, would otherwise hold every one)."""
    import weakref

    from mlx.utils import tree_flatten

    arrays = [a for _, a in tree_flatten(model.parameters())]
    before = set(_pinned)
    n = pin(arrays)
    mine = [address for address in _pinned if address not in before]
    if mine:
        weakref.finalize(model, _unpin_addresses, mine)
    return n


def pin_frozen(model) -> int:
    """For training: `model`'s frozen weights (after its adapters are attached) become the only ones pinned;
    the weights it trains, and any it no longer holds (an adapter fused into them), are unpinned."""
    from mlx.utils import tree_flatten

    unpin_all()
    trainable = {id(a) for _, a in tree_flatten(model.trainable_parameters())}
    return pin(a for _, a in tree_flatten(model.parameters()) if id(a) not in trainable)


def pinned_bytes() -> int:
    """Bytes held by bf16 copies."""
    lib = sgemm._state["lib"]
    return int(lib.mlxp_pinned_bytes()) if lib is not None and _pinned else 0
