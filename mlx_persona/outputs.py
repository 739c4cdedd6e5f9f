"""Output folders: one rule for every command that writes one.

A command writes into a folder that is absent or empty, or, with ``--overwrite``, replaces one; it
never writes into (or deletes) a folder that holds one of its inputs. :func:`check_output_dir`
checks that, :func:`prepare_output_dir` also empties and creates the folder, and
:func:`atomic_output_dir` builds a result next to the folder and swaps it in with one rename, so an
interrupted command leaves the old folder as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """The output folder cannot be used; the message says why and what to do."""


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
