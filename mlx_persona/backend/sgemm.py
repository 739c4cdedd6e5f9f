"""The ``cblas_sgemm`` MLX's CPU backend calls on Linux: matrix-vector products to ``sgemv``, and opt-in
bf16 inputs for large products (``MLX_PERSONA_MATMUL=bf16``).

MLX's CPU backend sends every float32 matmul to ``cblas_sgemm``, whichever BLAS the process loaded.
:func:`setup` (called by :func:`mlx_persona.backend.setup` before ``mlx.core`` is imported) builds
``native/sgemm.c`` with ``gcc`` into a private folder of the cache (ours, mode 0700: a library in a folder
another user can write is never loaded; a refused cache means a private folder of this run instead)
and loads it with ``RTLD_GLOBAL`` *before* the BLAS, so that MLX's calls land in it; it forwards to the
BLAS:

- **m == 1 or n == 1 -> cblas_sgemv.** Decoding one token is all matrix-vector products. Debian's
  OpenBLAS 0.3.21 runs them through its full GEMM path, packing the whole weight matrix each call:
  10 GB/s for Gemma's 262144 x 640 head against 28 GB/s with ``sgemv``. Exact (only the order of the
  additions differs). ``MLX_PERSONA_SGEMM=0`` loads the BLAS without this layer.
- **bf16 inputs, opt-in.** CPUs with AMX or AVX512-BF16 multiply bfloat16 at several times their float32
  rate; PyTorch reaches them with ``torch.autocast("cpu", torch.bfloat16)``. MLX's own bf16 matmul on the
  CPU is a plain loop (~6 GFLOP/s here). With ``MLX_PERSONA_MATMUL=bf16`` the inputs of large products are
  rounded to bf16 (float32 accumulation and output) and multiplied by the engine that is fast on this CPU
  (:func:`choose_engine`): on AMX (Intel Sapphire Rapids and later), oneMKL's ``cblas_gemm_bf16bf16f32``,
  bound in OpenBLAS's place; on AVX512-BF16 without AMX (AMD Zen 4 and later), ``native/bf16.c``, our own
  kernel (a 2-core Zen 4, inside MLX: 320-630 GFLOP/s on a LoRA step's and a prompt's products against
  oneMKL's ~160 and OpenBLAS float32's 100-200; PyTorch's oneDNN reaches 810-850 there: benchmarks/bench_bf16_gemm.py),
  OpenBLAS kept for the exact products. Weights pinned by :mod:`.pinned` are read from a bf16 copy made
  once: frozen weights in training, every weight when generating (decoding reads half the bytes).
  Activations, gradients, optimizer state and every non-matmul op stay float32; small and thin products
  (LoRA's rank-r matmuls) stay exact unless a pinned weight is in them. Relative error ~1e-3 per
  product, as with autocast. Off by default.

Why not an MLX extension: a custom primitive needs MLX's C++ headers, nanobind and CMake at install
time and a vjp of its own; a ``cblas_sgemm`` needs one C file and the compiler MLX's JIT already uses.
oneMKL comes from PyPI (``pip install mkl``; the ``test``, ``bench`` and ``cpu-bf16`` extras have it).
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import sys

from mlx_persona.backend import native
from mlx_persona.backend.cpu import cpu_flags, is_x86_64, march_flags, warn
from mlx_persona.backend.folders import UnsafeFolder

ENV = "MLX_PERSONA_MATMUL"
ENGINE_ENV = "MLX_PERSONA_BF16_GEMM"
SOURCES = ("sgemm.c", "bf16.c", "pool.c", "pinned.c", "draw.c", "check.c")
# Products with m*n*k below MIN_WORK, or any side below MIN_DIM, stay exact float32 in bf16 mode.
MIN_WORK = 1 << 21
MIN_DIM = 32


def cflags() -> tuple[str, ...]:
    """For this CPU (less any flag $MLX_PERSONA_CPU_FLAGS_MASK hides): its AVX512-BF16, where it has it,
    rounds to bf16 sixteen floats at a time; elsewhere, a scalar loop with the same rounding."""
    return ("-O3", *march_flags(), "-fopenmp", "-fPIC", "-shared")

_state = {"lib": None, "bf16": False, "reason": "not set up", "engine": None,
          "bf16_reason": "off (set MLX_PERSONA_MATMUL=bf16 to turn it on)"}


def requested_bf16() -> bool:
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "fp32", "float32", "0", "off", "exact"):
        return False
    if value in ("bf16", "bfloat16", "1", "on"):
        return True
    raise ValueError(f"{ENV}={value!r}: use fp32 (the default) or bf16")


def _layer_off() -> bool:
    return os.environ.get("MLX_PERSONA_SGEMM", "1").lower() in ("0", "off", "no", "false")


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


def cpu_support(flags: frozenset[str] | None = None) -> str:
    """What the CPU (`flags`: this one's) multiplies bfloat16 with: 'AMX', 'AVX512-BF16', or '' (oneMKL
    emulates it, slowly)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return ""


def choose_engine(support: str, value: str | None = None) -> str:
    """'own' (native/bf16.c) or 'mkl' for bf16 products on a CPU with `support` (:func:`cpu_support`).

    $MLX_PERSONA_BF16_GEMM (`value`) = own | mkl | auto (the default): AMX -> oneMKL (its tiles; our
    kernel has none), AVX512-BF16 alone -> ours, neither -> oneMKL (which emulates bf16, slowly).
    """
    value = (os.environ.get(ENGINE_ENV, "auto") if value is None else value).strip().lower() or "auto"
    if value not in ("auto", "own", "mkl"):
        raise ValueError(f"{ENGINE_ENV}={value!r}: use auto, own or mkl")
    if value == "own" and support == "":
        raise ValueError(f"{ENGINE_ENV}=own: this CPU has no AVX512-BF16")
    if value != "auto":
        return value
    return "own" if support == "AVX512-BF16" else "mkl"


def choose_blas(openblas: str | None) -> tuple[str | None, bool]:
    """(the BLAS to bind, whether bf16 inputs can be on): oneMKL in OpenBLAS's place when bf16 is asked for
    and oneMKL is its engine; OpenBLAS (exact products) beside our kernel otherwise."""
    try:
        want = requested_bf16()
        engine = choose_engine(cpu_support()) if want and is_x86_64() else "mkl"
    except ValueError as e:
        _state["bf16_reason"] = str(e)
        return openblas, False
    if not want:
        return openblas, False
    if not is_x86_64():
        _state["bf16_reason"] = "not x86-64 (on a Mac, MLX runs bf16 on the GPU itself)"
        return openblas, False
    if _layer_off():
        _state["bf16_reason"] = "needs the sgemm layer, which MLX_PERSONA_SGEMM=0 turns off"
        return openblas, False
    _state["engine"] = engine
    if engine == "own":
        return openblas, True
    mkl = find_mkl()
    if mkl is None:
        _state["bf16_reason"] = "oneMKL not found: pip install mkl (or set MLX_PERSONA_MKL=/path/to/libmkl_rt.so)"
        return openblas, False
    return mkl, True


def _mkl_gnu_threads(mkl: str) -> None:
    """oneMKL on GNU OpenMP, the runtime of the layer's conversions, unless $MKL_THREADING_LAYER says.

    ``MKL_Set_Threading_Layer`` does what that variable does, for this process alone (no environment
    change for child processes); it must come before any other oneMKL call.
    """
    if os.environ.get("MKL_THREADING_LAYER"):
        return
    try:
        ctypes.CDLL(mkl, mode=os.RTLD_LOCAL).MKL_Set_Threading_Layer(3)  # MKL_THREADING_GNU
    except (OSError, AttributeError):
        pass  # mlxp_bind reports a library that cannot be loaded


def setup(blas: str, bf16: bool) -> bool:
    """Puts the layer in front of `blas` (a path); True if MLX's sgemm calls will go through it.

    The layer binds to `blas` while it is still local to the process; only then is it made global, so
    that it is never the ``cblas_sgemm`` MLX finds without a BLAS behind it. The caller loads `blas`
    with ``RTLD_GLOBAL`` afterwards either way (after the layer, so that the layer comes first). Must
    run before ``mlx.core`` is imported.
    """
    if _state["lib"] is not None:
        return True
    if _layer_off():
        _state["reason"] = "off (MLX_PERSONA_SGEMM=0)"
        return False
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        _state["reason"] = "no C compiler (gcc): MLX calls the BLAS's cblas_sgemm directly"
        if bf16:
            _state["bf16_reason"] = "needs gcc to build the sgemm layer"
        return False
    try:
        path, refused = native.cache_or_run_dir(
            lambda root: native.build(SOURCES, cc, cflags(), folder="sgemm", name="libmlxp_sgemm.so",
                                      libs=("-ldl", "-lpthread"), root=root))
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    except UnsafeFolder as e:  # not even a private folder of this run
        warn(f"not loading the sgemm layer: {e}")
        _state["reason"] = f"refused: {e}; MLX calls the BLAS's cblas_sgemm directly"
        return False
    except OSError as e:
        _state["reason"] = f"could not build or load the sgemm layer: {e}"
        return False
    if refused is not None:
        warn(f"the sgemm layer is built in {path.parent}, for this run alone (not kept): {refused}")
    own = _state["engine"] == "own"
    if bf16 and not own:
        _mkl_gnu_threads(blas)
    lib.mlxp_bind.argtypes = [ctypes.c_char_p]
    lib.mlxp_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int]
    lib.mlxp_count.restype = ctypes.c_long
    rc = lib.mlxp_bind(blas.encode())
    if rc != 0:
        _state["reason"] = f"{blas} {'cannot be loaded' if rc == 1 else 'has no cblas_sgemm or cblas_sgemv'}"
        return False
    ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0))  # now global, before the BLAS
    if bf16 and own and not lib.mlxp_bf16_kernel():
        _state["bf16_reason"] = f"{cc} did not build the AVX512-BF16 kernel (too old for -mavx512bf16?)"
        bf16 = False
    elif bf16 and not own and not lib.mlxp_has_bf16():
        _state["bf16_reason"] = f"{blas} has no cblas_gemm_bf16bf16f32"
        bf16 = False
    lib.mlxp_configure(int(bf16), int(own), float(MIN_WORK), MIN_DIM)
    where = f" (built for this run alone: {refused})" if refused is not None else ""
    _state.update(lib=lib, bf16=bf16, reason=f"matrix-vector products to sgemv{where}")
    if bf16:
        engine = "our AVX512-BF16 kernel" if own else f"oneMKL ({cpu_support() or 'emulated'})"
        _state["bf16_reason"] = f"bf16 inputs, fp32 accumulate: {engine}"
    return True


def active() -> bool:
    """Whether MLX's cblas_sgemm calls go through this layer."""
    return _state["lib"] is not None


def bf16_active() -> bool:
    return bool(_state["bf16"])


def status() -> str:
    return _state["reason"]


def bf16_status() -> str:
    return _state["bf16_reason"]


def counts() -> dict:
    """Calls since start (zeros when the layer is not loaded): exact sgemm, bf16, sgemv, few rows (float32),
    bf16 rows (a few rows against a pinned weight), and those that read a pinned copy."""
    lib = _state["lib"]
    names = ("sgemm", "bf16", "sgemv", "few_rows", "bf16_rows", "pinned")
    return {k: (lib.mlxp_count(i) if lib is not None else 0) for i, k in enumerate(names)}
