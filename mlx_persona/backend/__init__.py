"""Platform set-up: a fast BLAS on Linux, and the dtype each backend is fast at.

MLX's Linux CPU wheel bundles the reference netlib BLAS, which runs an fp32 2048² matmul at a few
GFLOP/s. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* ``mlx.core`` is imported puts its ``cblas_*``
symbols first in the process's global lookup scope, so MLX's calls bind to OpenBLAS instead (the same
effect as ``LD_PRELOAD``, without re-executing the process). ``mlx_persona/__init__.py`` calls
:func:`setup` so that every entry point gets it.

OpenBLAS picks its kernels from the CPU's model number. On CPUs newer than the OpenBLAS build (Debian 12
ships 0.3.21) or virtual machines that hide the model, it falls back to ``Prescott``, its SSE3 kernel:
on a 2-core AVX-512 Xeon that ran an fp32 2048² matmul at 36 GFLOP/s against 296 with ``SkylakeX``.
So unless ``OPENBLAS_CORETYPE`` is already set, :func:`setup` sets it from the CPU's feature flags.

Everything that is not a matmul runs in MLX's own CPU kernels. ``mx.compile`` fuses elementwise ops
into C++ that MLX builds at run time with ``g++ -O3``, for the baseline x86-64 (SSE2) and with
``exp``/``tanh`` left as out-of-line calls, one element at a time: ~40 million exp/s here. The same
kernel built for the host CPU, with math errno off and MLX's inline vector ``exp`` actually inlined,
runs ~25x faster (AVX-512). MLX calls ``g++`` from the ``PATH`` and caches kernels by name under
``$TMPDIR/mlx``; so :func:`setup` puts a ``g++`` wrapper that adds those flags first on the ``PATH`` and
points ``TMPDIR`` at a folder of its own, so that kernels built without the flags are never reused.
Python's own temporary files stay where they were. ``MLX_PERSONA_JIT=0`` turns this off.
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
import tempfile
import time
from pathlib import Path

from mlx_persona.backend import sgemm
from mlx_persona.paths import cache_dir

_BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state = {"blas": None, "reason": "not set up", "jit": None, "jit_reason": "not set up"}

# Added to MLX's `g++ -std=c++17 -O3 -Wall -fPIC -shared` for its fused CPU kernels (see the module doc).
JIT_FLAGS = ("-march=native", "-fno-math-errno", "-fno-trapping-math",
             "--param", "max-inline-insns-single=2000", "--param", "max-inline-insns-auto=2000")


def _find_openblas() -> str | None:
    override = os.environ.get("MLX_PERSONA_BLAS")
    if override:
        return override if override.lower() not in ("0", "none", "off") else None
    for path in _BLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    found = sorted(glob.glob("/usr/lib*/**/libopenblas*.so*", recursive=True))
    return found[0] if found else None


def file_stamp(path: str) -> str:
    """A file's real path and modification time: part of a cache key for what a tool builds."""
    try:
        return f"{os.path.realpath(path)}:{os.stat(path).st_mtime_ns}"
    except OSError:
        return path


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def openblas_coretype(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family for an x86-64 CPU with these /proc/cpuinfo flags (None: let it detect).

    Both families exist since OpenBLAS 0.3.0; AMD Zen CPUs use the same kernels.
    """
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


_SHIM_MARK = "# mlx_persona: MLX's CPU kernels, built for this CPU"


def _real_gxx() -> str | None:
    """The first g++ on the PATH that is not our wrapper (a child process inherits the wrapper's PATH)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("g++", path=folder) if folder else None
        if not candidate:
            continue
        try:
            with open(candidate, "rb") as f:
                if _SHIM_MARK.encode() in f.read(256):
                    continue
        except OSError:
            continue
        return candidate
    return None


def _jit_dir() -> Path:
    """A folder per compiler, flags and CPU: kernels built with -march=native only fit this CPU."""
    gxx = _real_gxx()
    stamp = file_stamp(gxx) if gxx else ""
    key = hashlib.sha256(repr((stamp, JIT_FLAGS, sorted(cpu_flags()), platform.machine())).encode()).hexdigest()[:12]
    return cache_dir() / "jit" / key


def setup_jit() -> None:
    """Makes MLX build its fused CPU kernels for this CPU (Linux; see the module doc)."""
    if os.environ.get("MLX_PERSONA_JIT", "1").lower() in ("0", "off", "no", "false"):
        _state["jit_reason"] = "off (MLX_PERSONA_JIT=0)"
        return
    gxx = _real_gxx()
    if gxx is None:
        _state["jit_reason"] = "no g++ on the PATH: MLX does not fuse kernels on the CPU"
        return
    home = _jit_dir()
    shim = home / "bin" / "g++"
    if not shim.exists():
        problem = _probe_compiler(gxx, home)
        if problem:
            _state["jit_reason"] = f"g++ cannot take {' '.join(JIT_FLAGS)}: {problem}"
            return
        shim.parent.mkdir(parents=True, exist_ok=True)
        flags = " ".join(JIT_FLAGS)
        tmp = shim.with_name(f"g++.{os.getpid()}.tmp")
        tmp.write_text(f'#!/bin/sh\n{_SHIM_MARK}\nexec "{gxx}" {flags} "$@"\n')
        tmp.chmod(0o755)
        os.replace(tmp, shim)
    base = Path(tempfile.gettempdir())  # computed now: Python's temporary files keep the folder they had
    name = f"mlx_persona-jit-{home.name}"
    kernels = base if base.name == name else base / name  # a child process inherits our TMPDIR
    kernels.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    if str(shim.parent) not in path.split(os.pathsep):
        os.environ["PATH"] = str(shim.parent) + os.pathsep + path
    os.environ["TMPDIR"] = str(kernels)  # MLX's kernel cache: $TMPDIR/mlx/<version>/cpu
    _state["jit"] = str(shim)
    _state["jit_reason"] = f"g++ {' '.join(JIT_FLAGS)}; kernels in {kernels}"


def _probe_compiler(gxx: str, home: Path) -> str | None:
    """Builds a tiny shared library with the flags; returns the error, or None."""
    home.mkdir(parents=True, exist_ok=True)
    src = home / f"probe.{os.getpid()}.cpp"
    lib = home / f"probe.{os.getpid()}.so"
    src.write_text("#include <cmath>\nextern \"C\" void f(float* x, int n) { for (int i = 0; i < n; ++i) "
                   "x[i] = std::exp(x[i]); }\n")
    try:
        proc = subprocess.run([gxx, *JIT_FLAGS, "-std=c++17", "-O3", "-fPIC", "-shared", str(src), "-o", str(lib)],
                              capture_output=True, text=True, timeout=120)
        return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        src.unlink(missing_ok=True)
        lib.unlink(missing_ok=True)


def jit_status() -> tuple[str | None, str]:
    """Returns (the g++ wrapper MLX uses, or None; a sentence saying why)."""
    return _state["jit"], _state["jit_reason"]


def setup() -> None:
    """Load OpenBLAS globally on Linux before MLX is imported. Safe to call more than once."""
    if _state["blas"] is not None or _state["reason"] != "not set up":
        return
    if sys.platform == "linux":
        try:
            setup_jit()
        except OSError as e:  # e.g. a read-only home: MLX still works, only slower
            _state["jit_reason"] = f"not set up: {e}"
    if sys.platform != "linux":
        _state["reason"] = "not Linux: MLX uses Accelerate/Metal"
        return
    if "mlx.core" in sys.modules and not os.environ.get("LD_PRELOAD"):
        _state["reason"] = "mlx.core was imported before mlx_persona; import mlx_persona first"
        return
    openblas = _find_openblas()
    path, bf16 = sgemm.choose_blas(openblas)  # oneMKL in OpenBLAS's place for MLX_PERSONA_MATMUL=bf16
    if path is None:
        _state["reason"] = (
            "OpenBLAS not found: install it (Debian/Ubuntu: apt-get install libopenblas0-pthread) "
            "or set MLX_PERSONA_BLAS=/path/to/libopenblas.so"
        )
        return
    if (path == openblas and platform.machine() in ("x86_64", "AMD64")
            and not os.environ.get("OPENBLAS_CORETYPE")):
        core = openblas_coretype(cpu_flags())
        if core:  # read by OpenBLAS when it loads
            os.environ["OPENBLAS_CORETYPE"] = core
    sgemm.setup(path, bf16)  # MLX's cblas_sgemm: our layer in front of the BLAS, when it builds
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError as e:
        _state["reason"] = f"could not load {path}: {e}"
        return
    _state["blas"] = path
    _state["reason"] = "loaded"
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        _state["core"] = lib.openblas_get_corename().decode()
    except (AttributeError, UnicodeDecodeError):
        pass


def blas_status() -> tuple[str | None, str]:
    """Returns (path of the BLAS library loaded, or None; a sentence saying why)."""
    return _state["blas"], _state["reason"]


def default_dtype():
    """fp32 on the CPU backend (only fp32 matmuls reach BLAS there), bf16 on a GPU."""
    import mlx.core as mx

    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def dtype_from_name(name: str):
    """Maps 'auto' | 'float32' | 'bfloat16' | 'float16' to an MLX dtype."""
    import mlx.core as mx

    if name in (None, "auto"):
        return default_dtype()
    table = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16,
             "bf16": mx.bfloat16, "float16": mx.float16, "fp16": mx.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return table[name]


def matmul_gflops(n: int = 2048, dtype=None, trials: int = 5) -> float:
    """Measures a square matmul's throughput (median of `trials`, after a warm-up) in GFLOP/s."""
    import mlx.core as mx

    dtype = dtype or default_dtype()
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    mx.eval(a @ b)
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9


def describe() -> dict:
    """Backend facts for `mlx-persona doctor` and benchmark headers."""
    import mlx.core as mx

    blas, reason = blas_status()
    info = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(getattr(mx, "metal", None) and mx.metal.is_available()),
        "dtype": str(default_dtype()).replace("mlx.core.", ""),
        "blas": (blas or "bundled reference BLAS (slow)") if sys.platform == "linux" else "Accelerate",
        "blas_note": reason,
        "blas_core": _state.get("core"),
        "sgemm": sgemm.status() if sys.platform == "linux" else "the BLAS's own",
        "precision": sgemm.bf16_status() if sys.platform == "linux" else "the dtype's own",
        "jit": jit_status()[1] if sys.platform == "linux" else "not needed (not Linux)",
        "cpu_count": os.cpu_count(),
    }
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:  # pragma: no cover - mlx-lm is a core dependency
        pass
    return info
