"""Building the speed layer's native code (``native/*.c``, ``*.cpp``) once into the private cache (or,
when the cache is refused, into a private folder of this run: :func:`cache_or_run_dir`)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mlx_persona.backend.cpu import cpu_flags, file_stamp
from mlx_persona.backend.folders import check_file, private_dir, run_dir
from mlx_persona.paths import cache_dir

SOURCES = Path(__file__).parent / "native"
T = TypeVar("T")


class BuildError(OSError):
    """The compiler failed; the message is its last line of output."""


def build(source: str | tuple[str, ...], compiler: str, flags: tuple[str, ...], *, folder: str, name: str,
          libs: tuple[str, ...] = (), root: Path | None = None) -> Path:
    """Compiles ``native/<source>`` (one file or several) into ``<root>/<folder>/<key>/<name>`` unless it is
    there already.

    `root` is ``cache_dir()`` unless given.

    The key covers the sources and every header beside them, the compiler, the flags and the CPU (the flags
    may say -march=native).

    Raises:
        UnsafeFolder: the folder (or a library in it) is not ours alone: nothing is built or loaded.
        BuildError: the compiler failed, or ran for two minutes.
        OSError: the cache cannot be written.
    """
    srcs = [SOURCES / s for s in ((source,) if isinstance(source, str) else source)]
    texts = [p.read_bytes() for p in srcs + sorted(SOURCES.glob("*.h"))]
    key = hashlib.sha256(repr((texts, file_stamp(compiler), flags, libs, sorted(cpu_flags()),
                               platform.machine())).encode()).hexdigest()[:12]
    home = private_dir(root or cache_dir(), folder, key)
    lib = home / name
    if lib.exists():
        check_file(lib)
        return lib
    tmp = home / f"{name}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run([compiler, *flags, *map(str, srcs), "-o", str(tmp), *libs], check=False,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 1, "", f"{compiler} ran for 120 s")
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError((proc.stderr.strip().splitlines() or ["compile failed"])[-1])
    os.replace(tmp, lib)
    return lib


def cache_or_run_dir(use: Callable[[Path], T]) -> tuple[T, OSError | None]:
    """``use(cache_dir())``; if the cache is refused or cannot be written, ``use(run_dir())`` instead.

    Returns (what `use` returned, the cache's problem or None). A :class:`BuildError` is raised as it is
    (another folder would not help); so is an :class:`UnsafeFolder` for the run folder.
    """
    try:
        return use(cache_dir()), None
    except BuildError:
        raise
    except OSError as e:
        return use(run_dir()), e
