"""OpenBLAS in the place of the reference BLAS MLX's Linux wheel bundles.

MLX's Linux CPU wheel links the reference netlib BLAS, which runs an fp32 2048² matmul at a few
GFLOP/s. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported puts its ``cblas_*``
symbols first in the process's global lookup scope, so MLX's calls bind to OpenBLAS instead (the same
effect as ``LD_PRELOAD``, without re-executing the process). The sgemm layer (:mod:`.sgemm`) goes in
front of it, made global just before it.

OpenBLAS picks its kernels from the CPU's model number. On CPUs newer than the OpenBLAS build (Debian 12
ships 0.3.21) or virtual machines that hide the model, it falls back to ``Prescott``, its SSE3 kernel:
on a 2-core AVX-512 Xeon that ran an fp32 2048² matmul at 36 GFLOP/s against 296 with ``SkylakeX``.
OpenBLAS reads ``OPENBLAS_CORETYPE`` only while it loads, and has no function to change it later; so
unless the user set it, :func:`setup` sets it from the CPU's flags for the load alone and restores the
environment right after: ``os.environ`` is the same before and after, and child processes never see it.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys

from mlx_persona.backend import sgemm
from mlx_persona.backend.cpu import cpu_flags, is_x86_64, warn

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# Measured on this project's shared 2-core AVX-512 Linux VM (MLX 0.32.4, Debian's OpenBLAS 0.3.21), in two
# processes each, with backend.matmul_gflops(2048, mx.float32): setup() first 127 GFLOP/s (load 6) and
# 43-44 (load 14); mlx.core imported first, i.e. MLX's bundled reference BLAS, 3.6 and 2.9-3.1.
TOO_LATE = ("mlx.core was imported before mlx_persona.backend.setup(), so MLX keeps the reference BLAS its "
            "Linux wheel bundles: float32 matmuls run 10-35x slower (2048x2048 measured: ~3 GFLOP/s against "
            "43-127 with OpenBLAS). Call mlx_persona.backend.setup() before importing mlx or mlx_lm.")

_state = {"path": None, "reason": "not set up", "core": None}


def find_openblas() -> str | None:
    """$MLX_PERSONA_BLAS (0/none/off: none), else the first system OpenBLAS found."""
    override = os.environ.get("MLX_PERSONA_BLAS")
    if override:
        return override if override.lower() not in ("0", "none", "off") else None
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    found = sorted(glob.glob("/usr/lib*/**/libopenblas*.so*", recursive=True))
    return found[0] if found else None


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family for an x86-64 CPU with these /proc/cpuinfo flags (None: let it detect).

    Both families exist since OpenBLAS 0.3.0; AMD Zen CPUs use the same kernels.
    """
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


@contextlib.contextmanager
def _environment_for_the_load(name: str, value: str | None):
    """`name`=`value` while the body runs (unless already set), then the environment as it was."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


def setup() -> None:
    """Loads the sgemm layer and the BLAS globally; must run before ``mlx.core`` is imported (Linux)."""
    if "mlx.core" in sys.modules:
        _too_late()
        return
    if os.environ.get("MLX_PERSONA_BLAS", "").lower() in ("0", "none", "off"):
        _state["reason"] = "off (MLX_PERSONA_BLAS=0): MLX's bundled reference BLAS"
        return
    openblas = find_openblas()
    path, bf16 = sgemm.choose_blas(openblas)  # oneMKL in OpenBLAS's place for MLX_PERSONA_MATMUL=bf16
    if path is None:
        _state["reason"] = (
            "OpenBLAS not found: install it (Debian/Ubuntu: apt-get install libopenblas0-pthread) "
            "or set MLX_PERSONA_BLAS=/path/to/libopenblas.so"
        )
        return
    core = openblas_coretype(cpu_flags()) if path == openblas and is_x86_64() else None
    with _environment_for_the_load("OPENBLAS_CORETYPE", core):  # the layer's bind is the first load
        sgemm.setup(path, bf16)  # MLX's cblas_sgemm: our layer in front of the BLAS, when it builds
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as e:
            _state["reason"] = f"could not load {path}: {e}"
            return
    _state.update(path=path, reason="loaded")
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        _state["core"] = lib.openblas_get_corename().decode()
    except (AttributeError, UnicodeDecodeError):
        pass


def _too_late() -> None:
    """mlx.core is loaded and bound to its bundled BLAS already: say so, once, unless that was meant."""
    if os.environ.get("LD_PRELOAD"):
        _state["reason"] = "mlx.core was imported first; the BLAS is whatever LD_PRELOAD put first"
        return
    if os.environ.get("MLX_PERSONA_BLAS", "").lower() in ("0", "none", "off"):
        _state["reason"] = "off (MLX_PERSONA_BLAS=0): MLX's bundled reference BLAS"
        return
    _state["reason"] = "mlx.core was imported before mlx_persona.backend.setup(): MLX's bundled reference BLAS"
    warn(TOO_LATE)


def status() -> tuple[str | None, str]:
    """(path of the BLAS library loaded, or None; a sentence saying why)."""
    return _state["path"], _state["reason"]


def core() -> str | None:
    """The kernel family OpenBLAS chose (``openblas_get_corename``), if it says."""
    return _state["core"]
