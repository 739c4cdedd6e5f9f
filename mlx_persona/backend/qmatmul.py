"""Building and loading ``native/qmatmul.cpp``: an MLX extension (a primitive of its own, nanobind bindings)
whose CPU quantized matmul decodes 4- and 8-bit models several times faster than MLX's own.

The extension is built on first use (a quantized model loaded on the Linux CPU, or a call of
:func:`load`), never at import: CMake and nanobind (the ``cpu-quant`` extra; ``scripts/setup.sh`` installs
it) compile it against the MLX headers and library the ``mlx`` wheel ships, with ``-march=native``, into a
private 0700 folder of the cache (:mod:`.folders`; a refused cache means a folder of this run), keyed by
the source, the tools, MLX, Python and the CPU. Nothing is downloaded. nanobind modules share types only
with modules built with the same internals ABI, so before building, the one in MLX's own ``core`` module
is read and compared with this nanobind's; where they differ nothing is built and :func:`status` says
which nanobind to install. Every failure leaves MLX's ``mx.quantized_matmul`` in place, with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_persona.backend import native
from mlx_persona.backend.cpu import cpu_flags, file_stamp, march_flags, warn
from mlx_persona.backend.folders import UnsafeFolder, check_file, private_dir

MODULE = "mlx_persona_qmatmul"  # NB_MODULE's name in qmatmul.cpp
ENV = "MLX_PERSONA_QMATMUL"  # 0: never built or used
SOURCE = native.SOURCES / "qmatmul.cpp"
_state: dict = {"module": None, "tried": False, "reason": "not loaded yet (it is built when a quantized model loads)"}

CMAKE_LISTS = """cmake_minimum_required(VERSION 3.18)
project(mlx_persona_qmatmul LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
find_package(Python COMPONENTS Interpreter Development.Module REQUIRED)
find_package(nanobind CONFIG REQUIRED)
find_package(MLX CONFIG REQUIRED)
# MLX's own module is built NB_STATIC, STABLE_ABI, FREE_THREADED in the domain "mlx"; types are shared
# only within one domain and ABI.
nanobind_add_module(mlx_persona_qmatmul NB_STATIC STABLE_ABI FREE_THREADED NOMINSIZE NB_DOMAIN mlx
                    "${QMATMUL_SOURCE}")
target_link_libraries(mlx_persona_qmatmul PRIVATE mlx)
"""


def cmake() -> str | None:
    """CMake: the one beside this Python (pip's ``cmake`` package), else the one on PATH."""
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else shutil.which("cmake")


def nanobind_abi(nanobind_dir: Path) -> tuple[str, str] | None:
    """(backend ABI major, internals version) of the nanobind in `nanobind_dir`, from its sources."""
    try:
        internals = (nanobind_dir / "src" / "nb_internals.h").read_text()
        backend = (nanobind_dir / "include" / "nanobind" / "nb_backend.h").read_text()
    except OSError:
        return None
    v = re.search(r"define NB_INTERNALS_VERSION (\d+)", internals)
    a = re.search(r"define NB_BACKEND_ABI_MAJOR (\d+)", backend)
    return (a.group(1), v.group(1)) if a and v else None


def mlx_abi(core_path: str) -> tuple[str, str] | None:
    """(backend ABI major, internals version) MLX's ``core`` module was built with: the nanobind internals
    key in its binary, ``..._a<major>_v<internals>``. None where there is none (an older nanobind)."""
    with open(core_path, "rb") as f:
        found = re.search(rb"nanobind_[A-Za-z0-9_]*?_a(\d+)_v(\d+)", f.read())
    return (found.group(1).decode(), found.group(2).decode()) if found else None


def _tools() -> tuple[str, Path, str]:
    """(cmake, nanobind's folder, nanobind's version), or OSError saying what is missing or does not fit."""
    import mlx.core as mx

    tool = cmake()
    try:
        import nanobind
    except ImportError:
        nanobind = None
    if tool is None or nanobind is None or shutil.which("c++") is None:
        missing = [name for name, ok in (("cmake", tool), ("nanobind", nanobind), ("c++", shutil.which("c++")))
                   if not ok]
        raise OSError(f"{' and '.join(missing)} not found: pip install 'mlx_persona[cpu-quant]' (and a C++ compiler)")
    where = Path(nanobind.__file__).parent
    ours, theirs = nanobind_abi(where), mlx_abi(mx.__file__)
    if ours is None or theirs is None or ours != theirs:
        raise OSError(f"nanobind {nanobind.__version__} (ABI {ours}) cannot share arrays with MLX {mx.__version__}'s "
                      f"module (ABI {theirs}): install the nanobind MLX was built with (MLX 0.32.4: nanobind 3.1.0)")
    return tool, where, nanobind.__version__


def _key(tool: str, nb_version: str, flags: tuple[str, ...]) -> str:
    import mlx.core as mx

    parts = (SOURCE.read_bytes(), CMAKE_LISTS, file_stamp(tool), file_stamp(shutil.which("c++") or ""),
             nb_version, mx.__version__, file_stamp(mx.__file__), sys.version, flags, sorted(cpu_flags()),
             platform.machine())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def build(root: Path) -> Path:
    """The extension under ``root/qmatmul/<key>/``, built there unless it is there already.

    Raises:
        UnsafeFolder: a folder (or the library) is not ours alone: nothing is built or loaded.
        native.BuildError: CMake or the compiler failed, or ran for five minutes.
        OSError: a tool is missing or does not fit (the message says which), or the folder cannot be written.
    """
    import mlx.core as mx

    tool, nb_dir, nb_version = _tools()
    flags = ("-O3", *march_flags())
    home = private_dir(root, "qmatmul", _key(tool, nb_version, flags))
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    lib = home / f"{MODULE}{suffix}"
    if lib.exists():
        check_file(lib)
        return lib
    work = Path(tempfile.mkdtemp(prefix="build-", dir=home))  # 0700, ours
    try:
        (work / "CMakeLists.txt").write_text(CMAKE_LISTS)
        configure = [tool, "-S", str(work), "-B", str(work / "out"), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CXX_FLAGS={' '.join(flags)}", f"-DPython_EXECUTABLE={sys.executable}",
                     f"-Dnanobind_DIR={nb_dir / 'cmake'}", f"-DMLX_DIR={Path(mx.__file__).parent / 'share/cmake/MLX'}",
                     f"-DQMATMUL_SOURCE={SOURCE}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={work / 'lib'}"]
        for step in (configure, [tool, "--build", str(work / "out"), "-j", str(max(1, os.cpu_count() or 1))]):
            _run(step)
        built = sorted((work / "lib").glob(f"{MODULE}*.so"))
        if not built:
            raise native.BuildError("CMake built no mlx_persona_qmatmul module")
        os.replace(built[0], lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise native.BuildError(f"{Path(cmd[0]).name} ran for 300 s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()]
        raise native.BuildError(f"{Path(cmd[0]).name} failed: {(lines or ['see its output'])[0].strip()}")


def load():
    """The extension module, built first if needed; None where it cannot be (:func:`status` says why).

    Tried once per process; never raises.
    """
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get(ENV, "1").strip().lower() in ("0", "off", "no", "false"):
        _state["reason"] = f"off ({ENV}=0): MLX's quantized matmul"
        return None
    try:
        path, refused = native.cache_or_run_dir(build)
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except UnsafeFolder as e:
        _state["reason"] = f"refused: {e}"
    except (OSError, ImportError) as e:
        _state["reason"] = f"not built: {e}"
    else:
        if refused is not None:
            warn(f"the quantized-matmul extension is built in {path.parent}, for this run alone (not kept): {refused}")
        where = f"; built for this run alone: {refused}" if refused is not None else ""
        _state.update(module=module, reason=f"on: 2/4/8-bit, {module.threads()} threads{where}")
        return module
    warn(f"4/8-bit models use MLX's slower quantized matmul: {_state['reason']}")
    return None


def status() -> str:
    """A sentence for doctor: whether the fast quantized matmul is on, and why not."""
    return _state["reason"]
