"""MLX's fused CPU kernels built for this CPU, in a private folder (Linux).

``mx.compile`` fuses elementwise ops into C++ that MLX builds at run time with ``g++ -O3``, for the
baseline x86-64 (SSE2) and with ``exp``/``tanh`` left as out-of-line calls, one element at a time: ~40
million exp/s here. The same kernel built with :data:`JIT_FLAGS` (for the host CPU, math errno off, MLX's
inline vector ``exp`` actually inlined) runs ~25x faster (AVX-512). MLX keeps its kernels by name under
``temp_directory_path()/mlx`` (``$TMPDIR``, usually the shared ``/tmp``) and loads any library it finds
there.

:func:`install` changes both for MLX alone: it builds ``native/jit_hook.cpp`` with ``g++`` and
:data:`JIT_FLAGS` (so the build also proves that the compiler takes them) and points two entries of
``libmlx.so``'s own global offset table at it: ``popen`` (MLX's compile command gets the flags and the
compiler's absolute path; any other command runs unchanged) and ``std::filesystem::temp_directory_path``
(the kernel folder becomes ``cache_dir()/jit/<key>``, created 0700 and checked to be ours alone before
use). ``os.environ`` (``PATH``, ``TMPDIR``), child processes and every other library are untouched.
Anything that does not fit (no ``g++``, an unsafe folder, a ``libmlx.so`` without those imports)
leaves MLX as it is, with the reason in :func:`status`. ``MLX_PERSONA_JIT=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil

from mlx_persona.backend import native
from mlx_persona.backend.cpu import cpu_flags, file_stamp, warn
from mlx_persona.backend.folders import UnsafeFolder, private_dir
from mlx_persona.paths import cache_dir

# Added to MLX's `g++ -std=c++17 -O3 -Wall -fPIC -shared` for its fused CPU kernels (see the module doc).
JIT_FLAGS = ("-march=native", "-fno-math-errno", "-fno-trapping-math",
             "--param", "max-inline-insns-single=2000", "--param", "max-inline-insns-auto=2000")
_HOOK_FLAGS = (*JIT_FLAGS, "-std=c++17", "-O2", "-fPIC", "-shared")

_state = {"lib": None, "folder": None, "reason": "not set up"}


def requested() -> bool:
    return os.environ.get("MLX_PERSONA_JIT", "1").lower() not in ("0", "off", "no", "false")


def kernel_folder(gxx: str):
    """``cache_dir()/jit/<key>``, one per compiler, flags and CPU (kernels built for this CPU only fit it).

    Raises:
        UnsafeFolder: a folder on the way is not ours alone.
    """
    key = hashlib.sha256(repr((file_stamp(gxx), JIT_FLAGS, sorted(cpu_flags()), platform.machine()))
                         .encode()).hexdigest()[:12]
    return private_dir(cache_dir(), "jit", key)


def install() -> None:
    """Gives MLX's kernel compiler our flags and folder (see the module doc); never raises."""
    if _state["lib"] is not None:
        return
    if not requested():
        _state["reason"] = "off (MLX_PERSONA_JIT=0)"
        return
    gxx = shutil.which("g++")  # the compiler MLX would run, by its absolute path
    if gxx is None:
        _state["reason"] = "no g++ on the PATH: MLX does not fuse kernels on the CPU"
        return
    try:
        folder = kernel_folder(gxx)
        path = native.build("jit_hook.cpp", gxx, _HOOK_FLAGS, folder="jit-hook", name="libmlxp_jit.so",
                            libs=("-ldl",))
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    except UnsafeFolder as e:
        warn(f"MLX's kernels keep MLX's own compiler flags and folder: {e}")
        _state["reason"] = f"refused: {e}; MLX's own compiler flags and kernel folder"
        return
    except native.BuildError as e:
        _state["reason"] = f"g++ cannot build the hook with {' '.join(JIT_FLAGS)}: {e}"
        return
    except OSError as e:  # e.g. a read-only cache: MLX still works, only slower
        _state["reason"] = f"not set up: {e}"
        return
    import mlx.core  # noqa: F401  (loads libmlx.so, whose table entries are written)

    lib.mlxp_jit_install.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.mlxp_jit_error.restype = ctypes.c_char_p
    lib.mlxp_jit_last_command.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.mlxp_jit_last_command.restype = ctypes.c_long
    lib.mlxp_jit_compiles.restype = ctypes.c_long
    compiler = " ".join(shlex.quote(word) for word in (gxx, *JIT_FLAGS))
    rc = lib.mlxp_jit_install(compiler.encode(), str(folder).encode())
    if rc != 0:
        _state["reason"] = f"not installed ({lib.mlxp_jit_error().decode()}): MLX's own compiler flags and folder"
        return
    _state.update(lib=lib, folder=str(folder), reason=f"g++ {' '.join(JIT_FLAGS)}; kernels in {folder}")


def status() -> tuple[str | None, str]:
    """(the private kernel folder MLX uses, or None; a sentence saying why)."""
    return _state["folder"], _state["reason"]


def last_command() -> str:
    """The last kernel compile command MLX ran through the hook ('' if none): for tests and doctor."""
    lib = _state["lib"]
    if lib is None:
        return ""
    size = lib.mlxp_jit_last_command(None, 0) + 1
    buf = ctypes.create_string_buffer(size)
    lib.mlxp_jit_last_command(buf, size)
    return buf.value.decode(errors="replace")


def compiles() -> int:
    """Kernels MLX compiled through the hook since it was installed."""
    lib = _state["lib"]
    return int(lib.mlxp_jit_compiles()) if lib is not None else 0
