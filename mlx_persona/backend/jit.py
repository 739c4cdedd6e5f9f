"""MLX's fused CPU kernels built for this CPU, in a private folder (Linux).

``mx.compile`` fuses elementwise ops into C++ that MLX builds at run time with ``g++ -O3``, for the
baseline x86-64 (SSE2) and with ``exp``/``tanh`` left as out-of-line calls, one element at a time: ~40
million exp/s here. The same kernel built with :func:`jit_flags` (for the host CPU, math errno off, MLX's
inline vector ``exp`` actually inlined) runs ~25x faster (AVX-512). MLX keeps its kernels by name under
``temp_directory_path()/mlx`` (``$TMPDIR``, usually the shared ``/tmp``) and loads any library it finds
there.

:func:`install` changes both for MLX alone: it builds ``native/jit_hook.cpp`` with ``g++`` and
:func:`jit_flags` (so the build also proves that the compiler takes them) and points two entries of
``libmlx.so``'s own global offset table at it: ``popen`` (MLX's compile command gets the flags and the
compiler's absolute path; any other command runs unchanged) and ``std::filesystem::temp_directory_path``
(the kernel folder becomes ``cache_dir()/jit/<key>``, created 0700 and checked to be ours alone before
use). ``os.environ`` (``PATH``, ``TMPDIR``), child processes and every other library are untouched.

MLX loads any library it finds in its kernel folder, so that folder is never one another user can write:
- a cache that is refused (not ours alone, or reached through a folder or link another user can change)
  or cannot be written: the hook and the kernels go to a fresh private folder of this run
  (:func:`mlx_persona.backend.folders.run_dir`), with a warning naming the refused folder;
- the hook cannot be put in place (it does not build, a ``libmlx.so`` without those imports, no safe
  run folder): MLX keeps its own folder, ``$TMPDIR/mlx/<version>/cpu``, which is then created 0700 (or
  checked to be ours alone); if it is not ours, MLX's kernel compiler is turned off
  (``mx.disable_compile()``), with a warning naming the folder.

No ``g++``: MLX does not fuse kernels on the CPU at all. ``MLX_PERSONA_JIT=0`` turns all of this off:
MLX as it is, kernels in ``$TMPDIR/mlx`` unchecked (set a private ``TMPDIR`` then; see SECURITY.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
from pathlib import Path

from mlx_persona.backend import native
from mlx_persona.backend.cpu import cpu_flags, file_stamp, march_flags, warn
from mlx_persona.backend.folders import private_dir
from mlx_persona.paths import cache_dir

# Added to MLX's `g++ -std=c++17 -O3 -Wall -fPIC -shared` for its fused CPU kernels (see the module doc), after
# -march=native and the -mno- switches of the flags $MLX_PERSONA_CPU_FLAGS_MASK hides (cpu.march_flags).
MATH_FLAGS = ("-fno-math-errno", "-fno-trapping-math",
              "--param", "max-inline-insns-single=2000", "--param", "max-inline-insns-auto=2000")


def jit_flags() -> tuple[str, ...]:
    return (*march_flags(), *MATH_FLAGS)


def hook_flags() -> tuple[str, ...]:
    return (*jit_flags(), "-std=c++17", "-O2", "-fPIC", "-shared")


_state = {"lib": None, "folder": None, "reason": "not set up"}


def requested() -> bool:
    return os.environ.get("MLX_PERSONA_JIT", "1").lower() not in ("0", "off", "no", "false")


def kernel_folder(gxx: str, root: Path | None = None) -> Path:
    """``<root>/jit/<key>`` (root: ``cache_dir()``), one per compiler, flags and CPU (kernels built for
    this CPU only fit it).

    Raises:
        UnsafeFolder: a folder on the way is not ours alone.
    """
    key = hashlib.sha256(repr((file_stamp(gxx), jit_flags(), sorted(cpu_flags()), platform.machine()))
                         .encode()).hexdigest()[:12]
    return private_dir(root or cache_dir(), "jit", key)


def _hook_in(gxx: str, root: Path) -> tuple[Path, ctypes.CDLL]:
    """(the kernel folder, the hook library loaded), both under `root`."""
    folder = kernel_folder(gxx, root)
    path = native.build("jit_hook.cpp", gxx, hook_flags(), folder="jit-hook", name="libmlxp_jit.so",
                        libs=("-ldl",), root=root)
    return folder, ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)


def mlx_kernel_folder() -> Path:
    """The folder MLX itself keeps its kernels in: ``std::filesystem::temp_directory_path()/mlx/<version>/cpu``."""
    import mlx.core as mx

    base = next((os.environ[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(k)), "/tmp")
    return Path(base) / "mlx" / mx.__version__ / "cpu"


def _guard_mlx_folder(reason: str) -> None:
    """The hook is not in place: MLX's own kernel folder must be ours alone, or MLX compiles no kernels."""
    import mlx.core as mx

    folder = mlx_kernel_folder()
    try:
        private_dir(folder.parents[2], *folder.parts[-3:], shared_root=True)
    except OSError as e:
        warn(f"MLX's fused CPU kernels are off (mx.disable_compile()): its kernel folder is not safe: {e}")
        mx.disable_compile()
        _state["reason"] = f"{reason}; MLX's kernel folder refused ({e}): compiled kernels off"
        return
    _state["reason"] = f"{reason}; MLX's own compiler flags, kernels in {folder} (checked: ours, 0700)"


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
        (folder, lib), refused = native.cache_or_run_dir(lambda root: _hook_in(gxx, root))
    except native.BuildError as e:
        _guard_mlx_folder(f"g++ cannot build the hook with {' '.join(jit_flags())}: {e}")
        return
    except OSError as e:  # no safe folder to build in, even for this run alone
        _guard_mlx_folder(f"not set up: {e}")
        return
    if refused is not None:
        warn(f"MLX's kernels are built in {folder}, for this run alone (not kept): {refused}")
    import mlx.core  # noqa: F401  (loads libmlx.so, whose table entries are written)

    lib.mlxp_jit_install.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.mlxp_jit_error.restype = ctypes.c_char_p
    lib.mlxp_jit_last_command.argtypes = [ctypes.c_char_p, ctypes.c_long]
    lib.mlxp_jit_last_command.restype = ctypes.c_long
    lib.mlxp_jit_compiles.restype = ctypes.c_long
    compiler = " ".join(shlex.quote(word) for word in (gxx, *jit_flags()))
    rc = lib.mlxp_jit_install(compiler.encode(), str(folder).encode())
    if rc != 0:
        _guard_mlx_folder(f"not installed ({lib.mlxp_jit_error().decode()})")
        return
    where = f" (for this run alone: {refused})" if refused is not None else ""
    _state.update(lib=lib, folder=str(folder), reason=f"g++ {' '.join(jit_flags())}; kernels in {folder}{where}")


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
