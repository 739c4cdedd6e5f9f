"""What this machine is: the platform, the CPU's feature flags, and file stamps for build-cache keys.

The flags decide the OpenBLAS kernels (:mod:`.blas`), what the sgemm layer says bf16 runs on
(:mod:`.sgemm`) and, through ``-march=native``, the instructions of everything built here (:mod:`.jit`,
:mod:`.native`). ``MLX_PERSONA_CPU_FLAGS_MASK`` hides flags from all of these, so that one machine can run
the code paths of a CPU with fewer features (the tests' "without AVX-512" and "without AMX" runs; see
docs/testing.md): a comma- or space-separated list of /proc/cpuinfo flag names, ``*`` and ``?`` matching as
in a shell (``avx512*,amx*``). It can only take features away, never claim one the CPU lacks, and it names
no file: nothing another user controls is read. A hidden flag with a compiler switch (:data:`GCC_SWITCHES`)
becomes ``-mno-<switch>`` after ``-march=native``; one without (``sha_ni``, say) is hidden from this
package's choices only. Libraries that dispatch at run time on their own (oneMKL, oneDNN, NumPy) have
their own switches; docs/testing.md lists them.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import platform
import re
import sys

MASK_ENV = "MLX_PERSONA_CPU_FLAGS_MASK"

# /proc/cpuinfo name -> gcc's -m switch, for the features gcc may use under -march=native (GCC 11 knows all
# of them). Turning one off turns off those built on it: -mno-avx512f all of AVX-512, -mno-amx-tile all of AMX.
GCC_SWITCHES = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx_vnni": "avxvnni",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512_vbmi2": "avx512vbmi2", "avx512_vnni": "avx512vnni", "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq", "avx512_bf16": "avx512bf16",
    "avx512_vp2intersect": "avx512vp2intersect",
    "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8",
}
# Hiding a feature hides those built on it too, as the compiler's -mno- switches do.
_BUILT_ON = {"avx": ("avx2", "fma", "f16c", "avx_vnni", "avx512*"), "avx2": ("avx_vnni", "avx512*"),
             "avx512f": ("avx512*",), "amx_tile": ("amx*",)}
_ENTRY = re.compile(r"[a-z0-9_*?]+")


def is_linux() -> bool:
    """Read at each call, so that a test can fake another platform."""
    return sys.platform.startswith("linux")


def is_x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), nothing hidden."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=8)
def mask_patterns(value: str) -> tuple[str, ...]:
    """The entries of a mask (comma or space separated, lower-cased); a malformed one is left out, with a
    warning (once per mask)."""
    entries = [e for e in re.split(r"[\s,]+", value.strip().lower()) if e]
    bad = [e for e in entries if not _ENTRY.fullmatch(e)]
    if bad:
        warn(f"{MASK_ENV}: ignoring {', '.join(map(repr, bad))} (flag names from /proc/cpuinfo, * and ? allowed)")
    return tuple(e for e in entries if e not in bad)


def hidden_flags(flags: frozenset[str] | None = None, mask: str | None = None) -> frozenset[str]:
    """Which of `flags` (the host's) `mask` (``$MLX_PERSONA_CPU_FLAGS_MASK``) hides."""
    flags = host_cpu_flags() if flags is None else flags
    patterns = mask_patterns(os.environ.get(MASK_ENV, "") if mask is None else mask)
    hidden = {f for f in flags if any(fnmatch.fnmatchcase(f, p) for p in patterns)}
    for base in sorted(hidden & _BUILT_ON.keys()):
        hidden |= {f for f in flags if any(fnmatch.fnmatchcase(f, p) for p in _BUILT_ON[base])}
    return frozenset(hidden)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo, less those ``$MLX_PERSONA_CPU_FLAGS_MASK`` hides."""
    return host_cpu_flags() - hidden_flags()


def march_flags(hidden: frozenset[str] | None = None) -> tuple[str, ...]:
    """``-march=native``, then ``-mno-<switch>`` for each hidden flag the compiler has a switch for."""
    hidden = hidden_flags() if hidden is None else hidden
    return ("-march=native", *(f"-mno-{GCC_SWITCHES[f]}" for f in sorted(hidden) if f in GCC_SWITCHES))


def describe_flags(flags: frozenset[str] | None = None, hidden: frozenset[str] | None = None) -> str:
    """The features the speed layer looks at, for doctor: ``AVX2 FMA AVX-512 AVX512-BF16 (hidden by ...)``."""
    flags = cpu_flags() if flags is None else flags
    hidden = hidden_flags() if hidden is None else hidden
    names = [("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"),
             ("amx_bf16", "AMX-BF16")]
    text = " ".join(label for flag, label in names if flag in flags) or "none of AVX2, AVX-512, AMX"
    if hidden:
        text += f" (hidden by {MASK_ENV}: {' '.join(sorted(hidden))})"
    return text


def file_stamp(path: str) -> str:
    """A file's real path and modification time: part of a cache key for what a tool builds."""
    try:
        return f"{os.path.realpath(path)}:{os.stat(path).st_mtime_ns}"
    except OSError:
        return path


def warn(message: str) -> None:
    """One line on stderr: what the speed layer could not do, and what to do about it."""
    print(f"mlx_persona: warning: {message}", file=sys.stderr, flush=True)
