"""The Linux CPU speed layer, set up by one explicit call: :func:`setup`. On macOS none of it is needed
(MLX uses Accelerate and Metal there): :func:`setup` does nothing and no model code is changed.

MLX's Linux CPU wheel is slow in three places, and :func:`setup` (Linux only) mends each, for MLX alone:

- :mod:`.blas`: MLX's matmuls go to OpenBLAS (with kernels chosen from the CPU's flags) instead of the
  reference BLAS the wheel bundles; this must happen before ``mlx.core`` is imported, so :func:`setup`
  warns, on one line of stderr, when it comes too late.
- :mod:`.sgemm` (``native/sgemm.c``): a ``cblas_sgemm`` in front of the BLAS that sends matrix-vector
  products to ``sgemv``, and optionally rounds large products' inputs to bf16 (oneMKL).
- :mod:`.jit` (``native/jit_hook.cpp``): MLX's fused kernels built for this CPU, in a private folder.

:mod:`.cpu_ops` holds the Gemma 3 rewrites that :func:`mlx_persona.models.load_model` applies on the
Linux CPU backend (:func:`cpu_rewrites_enabled`), :mod:`.quantized` (on :mod:`.qmatmul`'s MLX extension,
built on first use) the faster product of quantized models there; :mod:`.device` the dtype per device and a matmul
probe; :mod:`.cpu`, :mod:`.folders` and :mod:`.native` what the others share (CPU flags, the
private-folder rule, building native code).

Importing this package, or ``mlx_persona``, changes nothing: no environment variable, no file, no
compiler. The entry points call :func:`setup` (``mlx-persona``, ``python -m mlx_persona``, ``python -m
mlx_persona.train``, the tests, the benchmarks); a library user calls it before importing mlx or mlx_lm.
"""

from __future__ import annotations

import os
import platform

from mlx_persona.backend import blas, jit, qmatmul, sgemm
from mlx_persona.backend.blas import openblas_coretype
from mlx_persona.backend.cpu import cpu_flags, describe_flags, file_stamp, is_linux
from mlx_persona.backend.device import default_dtype, dtype_from_name, matmul_gflops

__all__ = ["blas_status", "cpu_flags", "cpu_rewrites_enabled", "default_dtype", "describe", "dtype_from_name",
           "file_stamp", "jit_status", "matmul_gflops", "openblas_coretype", "setup"]

_done = {"setup": False}


def setup() -> None:
    """Sets up the Linux CPU speed layer (see the module doc); a no-op elsewhere and when called again.

    Call it before anything imports ``mlx.core`` (``import mlx_lm`` does); later, the BLAS part is lost
    and one warning line on stderr says so. It never changes ``os.environ``. Never raises.
    """
    if _done["setup"] or not is_linux():
        return
    _done["setup"] = True
    blas.setup()
    jit.install()


def blas_status() -> tuple[str | None, str]:
    """(path of the BLAS library loaded, or None; a sentence saying why)."""
    if not is_linux():
        return None, "not Linux: MLX uses Accelerate/Metal"
    return blas.status()


def jit_status() -> tuple[str | None, str]:
    """(the private folder MLX's CPU kernels are built in, or None; a sentence saying why)."""
    if not is_linux():
        return None, "not needed (not Linux)"
    return jit.status()


def cpu_rewrites_enabled() -> bool:
    """Whether load_model gives Gemma 3 the CPU rewrites of :mod:`.cpu_ops`: Linux, default device the CPU."""
    if not is_linux():
        return False
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def describe() -> dict:
    """Backend facts for `mlx-persona doctor` and benchmark headers."""
    import mlx.core as mx

    linux = is_linux()
    path, reason = blas_status()
    info = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "dtype": str(default_dtype()).replace("mlx.core.", ""),
        "blas": (path or "bundled reference BLAS (slow)") if linux else "Accelerate",
        "blas_note": reason,
        "blas_core": blas.core(),
        "sgemm": sgemm.status() if linux else "the BLAS's own",
        "precision": sgemm.bf16_status() if linux else "the dtype's own",
        "jit": jit_status()[1],
        "quantized": qmatmul.status() if linux else "MLX's own (Metal)",
        "cpu_count": os.cpu_count(),
        "cpu": describe_flags() if linux else "not read (not Linux)",
    }
    try:
        import mlx_lm
    except ImportError:  # pragma: no cover - mlx-lm is a core dependency
        return info
    info["mlx_lm"] = mlx_lm.__version__
    return info
