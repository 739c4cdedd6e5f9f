"""What this machine is: the platform, the CPU's feature flags, and file stamps for build-cache keys."""

from __future__ import annotations

import functools
import os
import platform
import sys


def is_linux() -> bool:
    """Read at each call, so that a test can fake another platform."""
    return sys.platform.startswith("linux")


def is_x86_64() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


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


def file_stamp(path: str) -> str:
    """A file's real path and modification time: part of a cache key for what a tool builds."""
    try:
        return f"{os.path.realpath(path)}:{os.stat(path).st_mtime_ns}"
    except OSError:
        return path


def warn(message: str) -> None:
    """One line on stderr: what the speed layer could not do, and what to do about it."""
    print(f"mlx_persona: warning: {message}", file=sys.stderr, flush=True)
