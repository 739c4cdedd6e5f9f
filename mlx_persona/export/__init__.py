"""Export: a fused Hugging Face folder (:mod:`.hf`) and an ONNX folder for transformers.js (:mod:`.onnx`).

Nothing heavy is imported here, so ``from mlx_persona.export import ExportError`` is cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ExportError", "fuse", "export_onnx", "atomic_output_dir"]


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


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Refuses an output folder that exists (unless `overwrite`) or that would destroy an input.

    Args:
        out: the folder to write.
        overwrite: allow replacing an existing non-empty folder.
        inputs: folders read by the export; `out` may be neither one of them nor a parent of one.

    Returns:
        `out` as an absolute path.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    for src in inputs:
        if src is None:
            continue
        src = Path(src).expanduser().resolve()
        real = out.resolve()
        if real == src or real in src.parents:
            raise ExportError(f"{out}: is (or contains) the input folder {src}; choose another output folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_output_dir(out: Path):
    """Yields a fresh temporary folder next to `out`; on success it replaces `out` in one rename.

    A failed or interrupted export leaves `out` as it was and removes the temporary folder.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if out.exists():
            # Move the old folder aside first so that `out` is never half-replaced.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
