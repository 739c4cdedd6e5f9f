"""Export: a fused Hugging Face folder (:mod:`.hf`) and an ONNX folder for transformers.js (:mod:`.onnx`).

The ONNX export in parts: :mod:`.onnx` (the command's flow: read the fused folder, write the export),
:mod:`.onnx_decoder` (the Gemma 3 decoder graph), :mod:`.q4` (4-bit weights), :mod:`.onnx_graph` (the
graph-writing helper), :mod:`.errors` (ExportError); :mod:`.web` is the chat page that runs the export in a browser.
The GGUF export for llama.cpp: :mod:`.gguf` (the flow), :mod:`.gguf_model` (hyper-parameters, weights),
:mod:`.gguf_vocab` (the tokenizer); :mod:`.ollama` adds the Ollama Modelfile.

Nothing heavy is imported here, so ``from mlx_persona.export import ExportError`` is cheap.
"""

from __future__ import annotations

from mlx_persona.export.errors import ExportError

__all__ = ["ExportError", "export_gguf", "export_ollama", "export_onnx", "fuse"]


def fuse(*args, **kwargs):
    """See :func:`mlx_persona.export.hf.fuse`."""
    from mlx_persona.export.hf import fuse as _fuse

    return _fuse(*args, **kwargs)


def export_onnx(*args, **kwargs):
    """See :func:`mlx_persona.export.onnx.export_onnx`."""
    from mlx_persona.export.onnx import export_onnx as _export

    return _export(*args, **kwargs)


def export_gguf(*args, **kwargs):
    """See :func:`mlx_persona.export.gguf.export_gguf`."""
    from mlx_persona.export.gguf import export_gguf as _export

    return _export(*args, **kwargs)


def export_ollama(*args, **kwargs):
    """See :func:`mlx_persona.export.ollama.export_ollama`."""
    from mlx_persona.export.ollama import export_ollama as _export

    return _export(*args, **kwargs)
