"""Building the speed layer's native code (``native/*.c``, ``*.cpp``) once into the private cache."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

from mlx_persona.backend.cpu import cpu_flags, file_stamp
from mlx_persona.backend.folders import check_file, private_dir
from mlx_persona.paths import cache_dir

SOURCES = Path(__file__).parent / "native"


class BuildError(OSError):
    """The compiler failed; the message is its last line of output."""


def build(source: str, compiler: str, flags: tuple[str, ...], *, folder: str, name: str,
          libs: tuple[str, ...] = ()) -> Path:
    """Compiles ``native/<source>`` into ``cache_dir()/<folder>/<key>/<name>`` unless it is there already.

    The key covers the source, the compiler, the flags and the CPU (the flags may say -march=native).

    Raises:
        UnsafeFolder: the folder (or a library in it) is not ours alone: nothing is built or loaded.
        BuildError: the compiler failed, or ran for two minutes.
        OSError: the cache cannot be written.
    """
    src = SOURCES / source
    key = hashlib.sha256(repr((src.read_bytes(), file_stamp(compiler), flags, libs, sorted(cpu_flags()),
                               platform.machine())).encode()).hexdigest()[:12]
    home = private_dir(cache_dir(), folder, key)
    lib = home / name
    if lib.exists():
        check_file(lib)
        return lib
    tmp = home / f"{name}.{os.getpid()}.tmp"
    try:
        proc = subprocess.run([compiler, *flags, str(src), "-o", str(tmp), *libs], check=False,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess([], 1, "", f"{compiler} ran for 120 s")
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError((proc.stderr.strip().splitlines() or ["compile failed"])[-1])
    os.replace(tmp, lib)
    return lib
