"""Opt-in bf16 matmuls for MLX's CPU backend on Linux x86-64 (``MLX_PERSONA_MATMUL=bf16``).

MLX's CPU backend sends every float32 matmul to ``cblas_sgemm`` and its own bfloat16 matmul is a plain
loop (~6 GFLOP/s here), so on the CPU we train in float32. Recent Intel CPUs multiply bfloat16 with
AMX tiles at several times their float32 rate; PyTorch reaches them with ``torch.autocast("cpu",
torch.bfloat16)`` through oneDNN. This module gives MLX the same thing without touching MLX: it builds
``native/bf16_gemm.c`` (a ``cblas_sgemm`` that rounds the inputs of large products to bfloat16 and
calls oneMKL's ``cblas_gemm_bf16bf16f32``, float32 accumulation and output) and loads it, and oneMKL,
with ``RTLD_GLOBAL`` before ``mlx.core`` is imported, so MLX's matmuls bind to it. Weights, activations,
gradients, optimizer state and every non-matmul op stay float32; small and thin products (LoRA's
rank-r matmuls, matrix-vector products) stay exact.

Why not an MLX extension: a custom primitive needs MLX's C++ headers, nanobind and CMake at install
time and a vjp of its own; intercepting the BLAS call needs one C file and the compiler the JIT
already uses. oneMKL comes from PyPI (``pip install mkl``; ``scripts/setup.sh`` installs it on x86-64
Linux). Numerics: inputs lose mantissa bits (8 bits kept), relative error ~1e-3 per product, as with
autocast; losses agree with float32 to ~1e-3. Off by default: results are then exact float32.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ENV = "MLX_PERSONA_MATMUL"
SOURCE = Path(__file__).parent / "native" / "bf16_gemm.c"
# Products with m*n*k below MIN_WORK, or any side below MIN_DIM, stay exact float32 (oneMKL sgemm).
MIN_WORK = 1 << 21
MIN_DIM = 32
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")

_state = {"lib": None, "mkl": None, "reason": "off (set MLX_PERSONA_MATMUL=bf16 to turn it on)"}


def requested() -> bool:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "fp32", "float32", "0", "off", "exact"):
        return False
    if value in ("bf16", "bfloat16", "1", "on"):
        return True
    raise ValueError(f"{ENV}={value!r}: use fp32 (the default) or bf16")


def find_mkl() -> str | None:
    """oneMKL's single dynamic library: $MLX_PERSONA_MKL, pip's (``<prefix>/lib``), or a system one."""
    override = os.environ.get("MLX_PERSONA_MKL")
    if override:
        return override
    prefixes = [sys.prefix, sys.base_prefix, os.path.expanduser("~/.local")]
    patterns = [os.path.join(p, "lib", "libmkl_rt.so*") for p in prefixes]
    patterns += ["/opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so*", "/usr/lib/x86_64-linux-gnu/libmkl_rt.so*"]
    for pattern in patterns:
        found = sorted(glob.glob(pattern), key=len)
        if found:
            return found[0]
    return None


@functools.lru_cache(maxsize=1)
def cpu_support() -> str:
    """What the CPU multiplies bfloat16 with: 'AMX', 'AVX512-BF16', or '' (oneMKL emulates it, slowly)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return ""


def _compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def _build(cc: str) -> Path:
    """Compiles the shim once per source, compiler and CPU into the cache; returns the library."""
    src = SOURCE.read_bytes()
    try:
        stamp = f"{os.path.realpath(cc)}:{os.stat(cc).st_mtime_ns}"
    except OSError:
        stamp = cc
    key = hashlib.sha256(repr((src, stamp, CFLAGS, cpu_support(), platform.machine())).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("MLX_PERSONA_CACHE", Path.home() / ".cache" / "mlx_persona"))
    lib = cache / "bf16_matmul" / key / "libmlxp_bf16_gemm.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
    proc = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(tmp), "-ldl"], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError((proc.stderr.strip().splitlines() or ["compile failed"])[-1])
    os.replace(tmp, lib)
    return lib


def setup() -> bool:
    """Loads the bf16 ``cblas_sgemm`` and oneMKL if requested and possible; True if MLX will use them.

    Must run before ``mlx.core`` is imported (``mlx_persona.platform.setup`` calls it).
    """
    if _state["lib"] is not None:
        return True
    if not requested():
        return False
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = "not Linux x86-64 (on a Mac, MLX runs bf16 on the GPU itself)"
        return False
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before mlx_persona; import mlx_persona first"
        return False
    mkl = find_mkl()
    if mkl is None:
        _state["reason"] = "oneMKL not found: pip install mkl (or set MLX_PERSONA_MKL=/path/to/libmkl_rt.so)"
        return False
    cc = _compiler()
    if cc is None:
        _state["reason"] = "no C compiler (gcc) to build the bf16 cblas_sgemm"
        return False
    try:
        path = _build(cc)
        # oneMKL threads with the same OpenMP runtime (GNU libgomp) as the shim's conversions.
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        lib = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    except (OSError, subprocess.TimeoutExpired) as e:
        _state["reason"] = f"could not build or load the bf16 cblas_sgemm: {e}"
        return False
    lib.mlxp_bind.argtypes = [ctypes.c_char_p]
    rc = lib.mlxp_bind(mkl.encode())
    if rc != 0:
        _state["reason"] = f"could not use oneMKL at {mkl} ({'not loadable' if rc == 1 else 'no bf16 gemm'})"
        return False
    lib.mlxp_configure.argtypes = [ctypes.c_int, ctypes.c_double, ctypes.c_int]
    lib.mlxp_count.restype = ctypes.c_long
    lib.mlxp_configure(1, float(MIN_WORK), MIN_DIM)
    _state.update(lib=lib, mkl=mkl, reason=f"bf16 inputs, fp32 accumulate: oneMKL ({cpu_support() or 'emulated'})")
    return True


def active() -> bool:
    return _state["lib"] is not None


def status() -> tuple[str | None, str]:
    """Returns (oneMKL's path when bf16 matmuls are on, else None; a sentence saying why)."""
    return _state["mkl"], _state["reason"]


def counts() -> tuple[int, int]:
    """(exact float32 sgemm calls, bf16 calls) since start; (0, 0) when off."""
    lib = _state["lib"]
    return (lib.mlxp_count(0), lib.mlxp_count(1)) if lib is not None else (0, 0)
