"""Output folders: one rule for every command that writes one.

A command writes into a folder that is absent or empty, or, with ``--overwrite``, replaces one; it
never writes into (or deletes) a folder that holds one of its inputs. :func:`check_output_dir`
checks that, :func:`prepare_output_dir` also empties and creates the folder, and
:func:`atomic_output_dir` builds a result next to the folder and swaps it in with one rename, so an
interrupted command leaves the old folder as it was.

One writer per folder: every command that writes ``OUT`` (``train``, ``eval``, ``sweep``, ``compare``,
``fuse``, ``export onnx``, ``init-model``) holds :func:`output_lock` from before its first look at
``OUT`` (the "already exists" check, ``--resume``'s checkpoints) until its last write. The lock is
``fcntl.flock`` on ``.OUT.lock`` *beside* the folder, in its parent (``runs/a`` -> ``runs/.a.lock``;
symbolic links resolved first, so two spellings of one folder share one lock), and a second writer
fails at once with :class:`OutputInUse`: "OUT is in use by process PID (started TIME)". Beside, not
inside, because

- ``fuse``/``export onnx``/``init-model`` replace ``OUT`` by renaming a sibling folder over it: a lock
  file inside would be swapped out with the old folder, and a second writer could lock the new one
  while the first still writes;
- ``--overwrite`` deletes the folder's contents, and a lock must exist before the folder does (a
  refused command creates nothing); beside it, neither can touch the lock;
- the folder then holds exactly the command's results: an empty folder stays empty for the
  "already exists" rule, copies of a run folder carry no lock, and file lists compare as before.

The kernel drops the lock when its process dies (even by SIGKILL), so a stale file never blocks
anyone; the holder writes its PID, host and start time into it for the message, and removes the file
when it lets go. The file is opened with ``O_NOFOLLOW`` and must be a regular file, so a planted
symbolic link in a shared parent cannot make a command truncate someone else's file. The lock is
re-entrant within a process (``compare`` holds its report folder, then ``evaluate`` takes it again), and
data-parallel ranks other than 0 never take it (only rank 0 touches ``OUT``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """The output folder cannot be used; the message says why and what to do."""


class OutputInUse(OutputError):
    """Another process holds the output folder's lock (:func:`output_lock`)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


def check_output_dir(out: str | Path, overwrite: bool, *, inputs: tuple = (), must_hold: str | None = None,
                     hint: str = "") -> Path:
    """Refuses an output folder that exists (unless `overwrite`) or that would destroy an input.

    Args:
        out: the folder to write.
        overwrite: allow replacing an existing non-empty folder.
        inputs: folders the command reads; `out` may be neither one of them nor a parent of one.
        must_hold: with `overwrite`, a file the folder must contain to be replaced (e.g. a run's
            ``config.yaml``), so that ``--overwrite`` deletes earlier results and nothing else.
        hint: more ways out, added to the "already exists" message (e.g. ", --resume to continue it").

    Returns:
        `out` as an absolute path.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    for src in inputs:
        if src is None:
            continue
        src = Path(src).expanduser().resolve()
        real = out.resolve()
        if real == src or real in src.parents:
            raise OutputError(f"{out}: is (or contains) the input folder {src}; choose another output folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: already exists and is not empty. Pass --overwrite to replace it{hint}, "
                              "or choose another output folder.")
        if must_hold and not (out / must_hold).is_file():
            raise OutputError(f"{out}: holds no {must_hold}, so it is not an earlier result of this command; "
                              "refusing to delete it. Choose another output folder.")
    return out


def prepare_output_dir(out: str | Path, overwrite: bool, **checks) -> Path:
    """:func:`check_output_dir`, then empties the folder (with `overwrite`) and creates it.

    Returns:
        `out` as an absolute path, an existing empty folder.
    """
    out = check_output_dir(out, overwrite, **checks)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def atomic_output_dir(out: Path):
    """Yields a fresh temporary folder next to `out`; on success it replaces `out` in one rename.

    A failed or interrupted command leaves `out` as it was and removes the temporary folder.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if out.exists():
            # Move the old folder aside first so that `out` is never half-replaced.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HOLDER_BYTES = 4096  # what a lock file may say about its holder; read no more
_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_held: dict[Path, list] = {}  # lock file -> [fd, depth]: the locks this process holds
_held_guard = threading.Lock()


def lock_path(out: str | Path) -> Path:
    """The lock file of output folder `out`: ``.NAME.lock`` beside it (see the module docstring)."""
    real = Path(out).expanduser().absolute().resolve()
    if real.parent == real:
        raise OutputError(f"{out}: cannot be an output folder (it has no parent folder to hold its lock)")
    return real.parent / f".{real.name}.lock"


def _holder(fd: int) -> tuple[int | None, str]:
    """Who holds the lock on `fd`, as its file says: (pid, "process PID [on HOST] (started TIME)").

    The file may belong to another user: at most 4 KiB are read, and only a positive PID, a time and a
    host name of the expected shapes are repeated in the message.
    """
    for _ in range(20):  # the holder writes its details just after it takes the lock
        try:
            info = json.loads(os.pread(fd, _HOLDER_BYTES, 0).decode())
            pid = info["pid"]
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
                started = info.get("started")
                host = info.get("host")
                where = f" on {host}" if isinstance(host, str) and _HOST.fullmatch(host) and \
                    host != socket.gethostname() else ""
                when = f" (started {started})" if isinstance(started, str) and _TIME.fullmatch(started) else ""
                return pid, f"process {pid}{where}{when}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        time.sleep(0.025)
    return None, "another process"


def _open_lock_file(path: Path) -> int:
    flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # a planted FIFO must not block the open
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags, 0o644)
        except PermissionError:  # another user's stale lock file: flock works on a read-only descriptor
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{path}: the output folder's lock file is a symbolic link; refusing to "
                              "follow it. Remove it, or choose another output folder.") from None
        if e.errno == errno.EISDIR:
            raise OutputError(f"{path}: the output folder's lock file is not a regular file; remove it, or "
                              "choose another output folder.") from None
        raise OutputError(f"{path}: cannot open the output folder's lock file ({e.strerror}); the folder "
                          "beside it must be writable, or choose another output folder.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: the output folder's lock file is not a regular file; remove it, or "
                          "choose another output folder.")
    return fd


def _acquire(out: Path, path: Path, wait: bool) -> int:
    """Opens and flocks the lock file; returns its descriptor, with this process's details written in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, who = _holder(fd)
                raise OutputInUse(f"{out} is in use by {who}; wait for it to finish, or choose another "
                                  "output folder", pid) from None
            # The previous holder removes the file when it lets go: a lock on a removed file locks nothing.
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            mine = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                info = {"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": str(out)}
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                except OSError:  # read-only (someone else's stale file): the lock holds all the same
                    pass
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Removes the lock file (while still holding it, and only if it is ours), then lets go."""
    try:
        now, mine = os.stat(path, follow_symlinks=False), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


@contextmanager
def output_lock(out: str | Path, *, wait: bool = False):
    """Holds the exclusive lock of output folder `out` (which need not exist yet) for the ``with`` block.

    Args:
        out: the folder the command writes.
        wait: block until the lock is free (e.g. two ranks building one cached model) instead of failing.

    Raises:
        OutputInUse: another process holds it (``wait=False``): "OUT is in use by process PID (started
            TIME)"; nothing was touched.
        OutputError: the lock file cannot be made (a read-only parent, a symbolic link planted there).
    """
    out = Path(out).expanduser().absolute()
    path = lock_path(out)
    with _held_guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
    if entry is None:  # not under the guard: a wait would hold up this process's other locks
        fd = _acquire(out, path, wait)
        with _held_guard:
            _held[path] = [fd, 1]
    try:
        yield out
    finally:
        with _held_guard:
            entry = _held[path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                _release(path, entry[0])
