"""Export: a fused Hugging Face folder (:mod:`.hf`) and an ONNX folder for transformers.js (:mod:`.onnx`).

Nothing heavy is imported here, so ``from mlx_persona.export import ExportError`` is cheap.
"""

from __future__ import annotations


__all__ = ["ExportError", "fuse", "export_onnx"]


class ExportError(Exception):
    """An export that cannot be done as asked (existing output, unsupported model ...)."""


def fuse(*args, **kwargs):
    """See :func:`mlx_persona.export.hf.fuse`."""
    from mlx_persona.export.hf import fuse as _fuse

    return _fuse(*args, **kwargs)


def export_onnx(*args, **kwargs):
    """See :func:`mlx_persona.export.onnx.export_onnx`."""
    from mlx_persona.export.onnx import export_onnx as _export

    return _export(*args, **kwargs)
