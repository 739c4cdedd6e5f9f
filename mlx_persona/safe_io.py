"""Reading what a user hands us, and writing results, within bounds and with one-line errors.

- :func:`read_text`: at most ``max_bytes``, strict UTF-8 (``path: not valid UTF-8 (byte N, line L)``).
- :func:`load_yaml` / :func:`parse_yaml`: PyYAML's safe loader without anchors and aliases (a few
  hundred bytes of aliases expand to gigabytes: "billion laughs"), nested at most ``MAX_YAML_DEPTH``
  deep, every problem as ``path:line: invalid YAML: ...``. No YAML file the project reads needs them.
- :func:`shorten` / :func:`clip`: a value (or text) as an error message shows it, at most about 80
  characters, so that a huge value never becomes a huge message.
- :func:`first_nonfinite`: the first floating-point tensor of a dict holding NaN or inf.
- :func:`writing`: a context for writes that turns a full disk (or any write failure) into one
  :class:`WriteError` line naming the file, after removing the temporary files it was given.
"""

from __future__ import annotations

import errno
import os
import reprlib
import shutil
from contextlib import contextmanager
from pathlib import Path

MAX_YAML_BYTES = 64 << 10  # configs, persona cards and recipes are 1-2 kB; PyYAML reads ~50 kB/s at worst
MAX_YAML_DEPTH = 64
SHORT = 80


class InputError(ValueError):
    """A file that cannot be read as what it should be; one line, ``path[:line]: what is wrong``."""


class WriteError(Exception):
    """A result that could not be written (a full disk, no permission); one line naming the file."""


def clip(text: str, limit: int = SHORT) -> str:
    """`text` itself when short, else its first `limit` characters and ``... (N chars)``."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 3, 6, 8, 8, 8
_repr.maxstring, _repr.maxother, _repr.maxlong = SHORT, SHORT, 40


def shorten(value, limit: int = SHORT) -> str:
    """``repr(value)`` for an error message, in bounded time and at most about `limit` characters.

    A longer one is cut and ends with ``... (N chars)`` (a string) or ``... (N items)`` (a container).
    """
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        return text if len(value) <= limit and len(text) <= limit + 3 else \
            f"{text[:limit]}... ({len(value)} chars)"
    text = _repr.repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} items)" if isinstance(value, (list, tuple, dict, set, frozenset)) else ""
    return f"{text[:limit]}...{size}"


def read_text(path: str | Path, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The text of a UTF-8 file of at most `max_bytes` bytes.

    Raises:
        InputError: ``path: not valid UTF-8 (byte N, line L)``, a file over `max_bytes`, or one that
            cannot be read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: larger than {max_bytes:,} bytes; this is not a file of this kind")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start}, line {line})") from None


def _yaml():
    import yaml

    class _Loader(yaml.SafeLoader):
        """The safe loader, refusing anchors and aliases and nesting deeper than MAX_YAML_DEPTH."""

        depth = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                what = "aliases (*" if isinstance(event, yaml.AliasEvent) else "anchors (&"
                raise yaml.composer.ComposerError(
                    None, None, f"YAML {what}{clip(event.anchor, 40)}) are not allowed here; write the value out",
                    event.start_mark)
            if self.depth >= MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                                  event.start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return yaml, _Loader


def parse_yaml(text: str, source: str):
    """``(root node, data)`` of one YAML document (both None for an empty one).

    The node tree keeps every key's line (persona cards report them); `source` names the file in errors.

    Raises:
        InputError: ``source:line: invalid YAML: reason``, one line.
    """
    yaml, loader_class = _yaml()
    loader = None
    try:
        loader = loader_class(text)
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise InputError(f"{where}: invalid YAML: {clip(e.problem or e.context or 'unreadable', 200)}") from None
    except yaml.reader.ReaderError as e:
        line = text[:e.position].count("\n") + 1
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise InputError(f"{source}:{line}: invalid YAML: unacceptable character {char} ({e.reason})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{source}: invalid YAML: {clip(str(e).splitlines()[0] if str(e) else 'unreadable', 200)}") \
            from None
    except (ValueError, OverflowError, RecursionError, TypeError) as e:  # e.g. 2024-13-45, 5000-digit ints
        raise InputError(f"{source}: invalid YAML: {clip(str(e), 200)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | Path, max_bytes: int = MAX_YAML_BYTES):
    """The data of a YAML file (see :func:`read_text` and :func:`parse_yaml`)."""
    return parse_yaml(read_text(path, max_bytes), str(path))[1]


def first_nonfinite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf (one pass, one evaluation), or None.

    float32 tensors on the Linux CPU are checked by the native layer (:mod:`mlx_persona.backend.checks`:
    MLX's ``isfinite(...).all()`` there takes ~6 ns an element, seconds for a model); the rest by MLX."""
    import mlx.core as mx

    from mlx_persona.backend.checks import has_nonfinite

    names = [k for k, v in tensors.items() if mx.issubdtype(v.dtype, mx.floating)]
    if not names:
        return None
    mx.eval([tensors[k] for k in names])
    fast = {k: has_nonfinite(tensors[k]) for k in names}
    rest = [k for k in names if fast[k] is None]
    if rest:
        flags = mx.stack([mx.isfinite(tensors[k]).all() for k in rest])
        fast.update((k, not ok) for k, ok in zip(rest, flags.tolist()))
    bad = [k for k in names if fast[k]]
    return bad[0] if bad else None


def describe_write_error(path: str | Path, exc: BaseException) -> str:
    """``path: no space left on device (...)`` (or what else went wrong), one line."""
    err = getattr(exc, "errno", None)
    if err is None:  # MLX's writers raise RuntimeError("[write] Unable to write N bytes to file.")
        try:
            full = shutil.disk_usage(Path(path).parent if not Path(path).is_dir() else path).free < (1 << 20)
        except OSError:
            full = False
        err = errno.ENOSPC if full else None
    why = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(err)
    detail = clip(" ".join(str(exc).split()), 120)
    return f"{path}: {why} ({detail})" if why else f"{path}: could not be written ({detail})"


@contextmanager
def writing(path: str | Path, *cleanup: str | Path):
    """Runs a write of `path`; on failure removes `cleanup` (temporary files or folders) and raises one line.

    Raises:
        WriteError: the write failed with an OSError or MLX's RuntimeError (``path: no space left on device``).
    """
    try:
        yield
    except (OSError, RuntimeError) as e:
        for p in cleanup:
            p = Path(p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        if isinstance(e, RuntimeError) and not str(e).startswith("[") and "write" not in str(e).lower():
            raise  # not a write failure: a bug, shown as one
        raise WriteError(describe_write_error(path, e)) from None
