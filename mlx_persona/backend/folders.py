"""Folders the speed layer loads code from: ours alone, or not used at all.

What mlx_persona compiles (the sgemm layer, the JIT hook) and what MLX compiles for it (fused kernels)
is later loaded with ``dlopen``, so a file planted there by someone else would run as us. Every folder
from the cache root down is created with mode 0700 and, before use, must be owned by this user and not
writable by group or others; otherwise :class:`UnsafeFolder` says which folder and what is wrong, and
the caller falls back to not loading from it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafeFolder(OSError):
    """A folder (or file) another user could write to or replace; the message names it and says why."""


def problem(path: Path, *, follow: bool = False) -> str | None:
    """What makes `path` unsafe to load from (None if nothing): owner, mode, a symbolic link."""
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    uid = os.getuid()
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit)
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir(root: Path, *parts: str) -> Path:
    """``root/parts...``: missing folders created with mode 0700, every one from `root` down checked.

    `root` itself may be a symbolic link (to a folder of ours); the folders below it may not.

    Raises:
        UnsafeFolder: a folder is not ours or others can write to it.
    """
    path = Path(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    why = problem(path, follow=True)
    for part in parts:
        if why:
            break
        path = path / part
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        why = problem(path)
    if why:
        raise UnsafeFolder(why)
    return path


def check_file(path: Path) -> None:
    """Raises UnsafeFolder if the file at `path` is not ours or others can write to it."""
    why = problem(path)
    if why:
        raise UnsafeFolder(why)
