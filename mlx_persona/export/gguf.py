"""GGUF export of a Gemma 3 text model, for llama.cpp and everything built on it (Ollama, LM Studio).

Written with ``gguf``, llama.cpp's own Python writer and tensor-name map, as architecture ``gemma3``:
the hyper-parameters and weights as :mod:`~mlx_persona.export.gguf_model` describes, the tokenizer,
special ids and chat template as :mod:`~mlx_persona.export.gguf_vocab` does. The source is a Hugging
Face folder (a fused export, a base model, a full fine-tune's run folder), a model spec
(``builtin:tiny``, a hub id) or a LoRA/DoRA run folder, which is fused into a private temporary folder
first (:func:`mlx_persona.export.hf.fuse`, fp32).

``q4_K_M`` has no Python quantizer: the model is written f32 to a temporary file and quantized by
llama.cpp's own ``llama_model_quantize`` through ``llama-cpp-python`` (which must be installed).

The file is written beside the output under a temporary name and renamed into place when complete,
under the output's lock (one writer at a time).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from mlx_persona.export.errors import ExportError
from mlx_persona.export.gguf_model import (
    DTYPES,
    add_hparams,
    read_config,
    tensor_plan,
    write_tensors,
)
from mlx_persona.export.gguf_vocab import add_vocab
from mlx_persona.outputs import output_lock

__all__ = ["GGUF_DTYPES", "export_gguf", "model_folder", "write_gguf"]

GGUF_DTYPES = (*DTYPES, "q4_K_M")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
               "q4_K_M": "MOSTLY_Q4_K_M"}


def export_gguf(source, out_file, dtype: str = "f16", *, overwrite: bool = False, log=None) -> Path:
    """Writes one GGUF file of a model folder, model spec or (fused first) adapter run.

    Args:
        source: a Hugging Face folder, ``builtin:NAME``, a hub id, or an output folder of ``mlx-persona train``.
        out_file: the ``.gguf`` file to write.
        dtype: ``f32``, ``f16``, ``q8_0``, ``q4_0`` or ``q4_K_M``.
        overwrite: replace an existing file.
        log: optional ``log(str)`` for progress.

    Returns:
        The written file.

    Raises:
        ExportError: bad arguments, an existing output, or a model this export cannot write.
    """
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    out = Path(out_file).expanduser().absolute()
    with output_lock(out):
        if out.is_dir():
            raise ExportError(f"{out}: is a folder; give the .gguf file to write")
        if out.exists() and not overwrite:
            raise ExportError(f"{out}: already exists (pass --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as tmp:
            folder = model_folder(source, Path(tmp), log=log)
            part = Path(tmp) / out.name
            write_gguf(folder, part, dtype, log=log)
            os.replace(part, out)
    return out


def model_folder(source, scratch: Path, *, log=None) -> Path:
    """The Hugging Face folder to convert: `source` itself, the model a spec names, or a run fused into `scratch`."""
    from mlx_persona.models import resolve_model
    from mlx_persona.runs import is_adapter_folder

    local = Path(str(source)).expanduser()
    if local.is_dir() and is_adapter_folder(local):
        from mlx_persona.export.hf import fuse

        if log:
            log(f"fusing the adapter run {local} first")
        return fuse(None, local, scratch / "fused")
    return resolve_model(source)


def write_gguf(folder: Path, path: Path, dtype: str, *, log=None) -> dict:
    """Writes `folder` (a Gemma 3 text Hugging Face folder) as a GGUF file at `path`.

    Returns:
        What was written: ``{"hparams": ..., "special": ..., "tensors": n, "seconds": s}``.
    """
    import gguf
    from transformers import AutoTokenizer

    start = time.perf_counter()
    config = read_config(folder)
    if dtype == "q4_K_M":
        return _llama_cpp_quantize(folder, path, log=log)
    plan = tensor_plan(folder, config, dtype)
    n_vocab = next(shape[0] for name, _k, _t, shape in plan if name == "token_embd.weight")
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    writer.add_name(_model_name(folder))
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype])))
    if dtype not in ("f32", "f16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hparams = add_hparams(writer, config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    special = add_vocab(writer, folder, tokenizer, n_vocab)
    if log:
        log(f"writing {path.name}: {len(plan)} tensors, {dtype}")
    write_tensors(writer, folder, plan, log=log)
    return {"hparams": hparams, "special": special, "tensors": len(plan),
            "seconds": time.perf_counter() - start}


def _model_name(folder: Path) -> str:
    import json

    info = folder / "mlx_persona.json"
    if info.is_file():
        data = json.loads(info.read_text())
        fused = data.get("fused") or {}
        return str(fused.get("model_spec") or data.get("preset") or folder.name)
    return folder.name


def _llama_cpp_quantize(folder: Path, path: Path, *, log=None) -> dict:
    """q4_K_M: an f32 file first, then llama.cpp's own quantizer (via llama-cpp-python)."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ExportError("--dtype q4_K_M quantizes with llama.cpp itself: pip install llama-cpp-python "
                          "(or pick f32, f16, q8_0 or q4_0)") from None
    f32 = path.with_name(path.name + ".f32")
    written = write_gguf(folder, f32, "f32", log=log)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if log:
        log("quantizing to q4_K_M with llama.cpp")
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params))
    f32.unlink(missing_ok=True)
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed (code {rc}) on {folder}")
    return written
