"""Folders the speed layer loads code from: ours alone, or not used at all.

What mlx_persona compiles (the sgemm layer, the JIT hook) and what MLX compiles for it (fused kernels)
is later loaded with ``dlopen``, so a file planted there by someone else would run as us. Every folder
from the cache root down is created with mode 0700 and, before use, must be owned by this user and not
writable by group or others; the way to the root must be one that only root or this user can change
(:func:`route_problem`): otherwise another user could re-point it, mid-run, at a folder of theirs.
Anything else raises :class:`UnsafeFolder`, which says which folder and what is wrong, and the caller
falls back to :func:`run_dir` (a fresh private folder of this process) or to not loading at all.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path

_MAX_LINKS = 40
_run: dict[str, Path] = {}


class UnsafeFolder(OSError):
    """A folder (or file) another user could write to or replace; the message names it and says why."""


def _writable_by(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def problem(path: Path, *, follow: bool = False) -> str | None:
    """What makes `path` unsafe to load from (None if nothing): owner, mode, a symbolic link."""
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    uid = os.getuid()
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by {_writable_by(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _on_the_way(path: str, st: os.stat_result, uid: int) -> str | None:
    if st.st_uid not in (0, uid):
        return f"{path} is owned by uid {st.st_uid}, not by root or this user (uid {uid})"
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (f"{path} is writable by {_writable_by(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o}) and "
                "not sticky: another user could replace what it holds")
    return None


def route_problem(path: Path) -> str | None:
    """What lets another user change where `path` leads (None if nothing).

    Walks from ``/`` to `path`, following symbolic links: every folder and link passed must be owned by
    root or this user, and a folder others can write must be sticky (like ``/tmp``), so that they cannot
    rename or replace the entries of ours in it.
    """
    uid = os.getuid()
    todo = list(reversed(Path(os.path.abspath(path)).parts[1:]))
    here, links = "/", 0
    why = _on_the_way(here, os.stat(here), uid)
    while todo and not why:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":  # `here` never holds a link, so its parent is its real parent
            here = os.path.dirname(here)
            continue
        entry = os.path.join(here, name)
        st = os.lstat(entry)
        why = _on_the_way(entry, st, uid)
        if why or not stat.S_ISLNK(st.st_mode):
            here = entry
            continue
        links += 1
        if links > _MAX_LINKS:
            return f"{path}: more than {_MAX_LINKS} symbolic links on the way"
        target = Path(os.readlink(entry))
        if target.is_absolute():
            here, parts = "/", target.parts[1:]
        else:
            parts = target.parts
        todo.extend(reversed(parts))
    return why


def _make(path: Path) -> None:
    """Creates `path` and any missing folder on the way with mode 0700."""
    missing = []
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o700)
        except FileExistsError:
            pass


def private_dir(root: Path, *parts: str, shared_root: bool = False) -> Path:
    """``root/parts...``: missing folders created with mode 0700, every one from `root` down checked.

    `root` itself may be a symbolic link (to a folder of ours) that only root or we can change; the
    folders below it may not be links. With `shared_root` (e.g. ``/tmp``), `root` need not be ours, only
    reached safely, and sticky if others can write it.

    Raises:
        UnsafeFolder: a folder is not ours, others can write to it, or the way to it is not safe.
    """
    path = Path(root)
    _make(path)
    why = route_problem(path) or (None if shared_root else problem(path, follow=True))
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


def run_dir() -> Path:
    """A fresh folder of this process alone (``mkdtemp``: mode 0700, a random name), removed at exit.

    Where the speed layer builds when the cache is refused. Created in the temporary folder, which must
    be reached safely (:func:`route_problem`; a sticky ``/tmp`` is fine).

    Raises:
        UnsafeFolder: the way to the temporary folder is not safe.
    """
    if "path" not in _run:
        base = Path(tempfile.gettempdir())
        why = route_problem(base)
        if why:
            raise UnsafeFolder(why)
        path = Path(tempfile.mkdtemp(prefix="mlx_persona-run-", dir=base))
        atexit.register(shutil.rmtree, path, True)
        _run["path"] = path
    return _run["path"]
