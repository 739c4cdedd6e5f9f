"""Quantized models on the Linux CPU: mlx-lm's quantized layers given :mod:`.qmatmul`'s kernel.

:func:`mlx_persona.models.load_model` calls :func:`use_fast_quantized` where
:func:`mlx_persona.backend.cpu_rewrites_enabled` says so (Linux, default device the CPU). A model with
quantized layers (``mlx_lm.convert -q``, ``mlx_lm.utils.quantize_model``) has them moved to subclasses of
MLX's ``QuantizedLinear`` and ``QuantizedEmbedding`` whose product (``__call__``; ``as_linear``, Gemma's
tied LM head) is :func:`quantized_matmul`: the same weights, keys and results within float32 rounding,
``isinstance`` unchanged. On a Mac nothing here runs. Where the extension cannot be built the model
keeps MLX's layers and one line on stderr says why (``mlx-persona doctor`` says it too).
"""

from __future__ import annotations

from mlx_persona.backend import qmatmul

# Rows of x (tokens x batch) the kernel takes; beyond, MLX's quantized matmul. The kernel decodes the
# packed weights once per four rows: at 1-16 rows (decoding, small batches) it beat float32's GEMM; at
# 48-384 (a prompt, a training batch) it measured 1.4-3.8x slower than that GEMM, yet ~50x faster than
# MLX's quantized path (gemma-3-270m's 2048 x 640 and 640 x 2048, 4-bit, 2-core AVX-512), so it takes them too.
MAX_ROWS = 1 << 16


def quantized_matmul(x, w, scales, biases=None, transpose: bool = True, group_size: int = 64, bits: int = 4,
                     mode: str = "affine"):
    """``mx.quantized_matmul`` (same arguments), on the kernel where it takes the product: affine mode,
    ``transpose=True``, float32 x, scales and biases, 2, 4 or 8 bits, group size 32, 64 or 128, at most
    :data:`MAX_ROWS` rows of x, default device the CPU. Gradients are MLX's."""
    import mlx.core as mx

    ext = qmatmul.load()
    if ext is None or not transpose or mode != "affine" or biases is None:
        return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                                   mode=mode)
    return ext.quantized_matmul(x, w, scales, biases, group_size, bits, MAX_ROWS)


def refusal(x, w, scales, biases, group_size: int, bits: int) -> str | None:
    """Why :func:`quantized_matmul` would hand this product to MLX (None: the kernel takes it)."""
    ext = qmatmul.load()
    if ext is None:
        return qmatmul.status()
    return ext.refusal(x, w, scales, biases, group_size, bits, MAX_ROWS)


def _linear_call(self, x):
    out = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), True, self.group_size,
                           self.bits, self.mode)
    return out + self["bias"] if "bias" in self else out


def _as_linear(self, x):
    return quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), True, self.group_size,
                            self.bits, self.mode)


_FAST: dict[type, type] = {}  # MLX's class -> ours


def _fast_class(cls: type, linear: bool) -> type:
    if cls not in _FAST:
        what = "__call__" if linear else "as_linear"
        _FAST[cls] = type(cls.__name__, (cls,), {
            what: _linear_call if linear else _as_linear, "__module__": __name__,
            "__doc__": f"MLX's {cls.__name__} with its product on mlx_persona's CPU kernel "
                       "(mlx_persona.backend.quantized)."})
    return _FAST[cls]


def use_fast_quantized(model) -> int:
    """Gives the model's affine-quantized linear layers and embeddings the kernel (see the module doc).

    Builds the extension the first time a model has such layers. Layers of other modes (mxfp4, ...) and
    subclasses of MLX's stay as they are.

    Returns:
        How many layers have it (0 where the model has none or the extension is not there).
    """
    from mlx import nn

    found = [(m, linear) for _, m in model.named_modules()
             for cls, linear in ((nn.QuantizedLinear, True), (nn.QuantizedEmbedding, False))
             if type(m) in (cls, _FAST.get(cls)) and getattr(m, "mode", "affine") == "affine" and "biases" in m]
    if not found or qmatmul.load() is None:
        return 0
    for module, linear in found:
        module.__class__ = _fast_class(type(module), linear)
    return len(found)


def use_mlx_quantized(model) -> int:
    """Undoes :func:`use_fast_quantized`: the layers are MLX's classes again (for comparisons).

    Returns:
        How many layers were moved back.
    """
    ours = {fast: cls for cls, fast in _FAST.items()}
    moved = [m for _, m in model.named_modules() if type(m) in ours]
    for module in moved:
        module.__class__ = ours[type(module)]
    return len(moved)
