"""Reading JSONL files line by line, and the one error type every data problem is reported in.

Every line is decoded on its own (invalid UTF-8 is reported on its line), blank lines are skipped, a
UTF-8 BOM and CRLF line ends are accepted, and the whole file is checked before anything is returned, so
that a user fixes a file in one pass: each problem is ``path:line: reason``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from mlx_persona.paths import data_path

_UTF8_BOM = b"\xef\xbb\xbf"


class DataError(Exception):
    """Problems found in training data, each ``'path:line: reason'`` (or ``'path: reason'``).

    Args:
        problems: the problems, or a single problem as a string.
    """

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def read_checked(path, parse, key, what: str, max_problems: int = 50) -> list:
    """Reads a JSONL file line by line with `parse`, listing every problem (duplicates included).

    Args:
        path: the file.
        parse: ``parse(raw line bytes, "path:line") -> (item or None, [reasons])``.
        key: an item's identity for the duplicate check.
        what: what the file holds, for an empty file's message.
        max_problems: how many problems to list before summarizing the rest as a count.

    Raises:
        DataError: every problem as ``path:line: reason``.
    """
    problems: list[str] = []
    items: list = []
    first_line_of: dict[tuple, int] = {}
    for lineno, raw in split_lines(read_bytes(path)):
        item, reasons = parse(raw, f"{path}:{lineno}")
        if item is not None:
            k = key(item)
            if k in first_line_of:
                reasons.append(f"duplicate of line {first_line_of[k]}")
            else:
                first_line_of[k] = lineno
                items.append(item)
        problems.extend(f"{path}:{lineno}: {reason}" for reason in reasons)
    if not items and not problems:
        problems.append(f"{path}: empty file (no {what})")
    if problems:
        raise DataError(cap(problems, max_problems, str(path)))
    return items


def cap(problems: list[str], max_problems: int, where: str) -> list[str]:
    """Keep the first `max_problems` problems and say how many more there were."""
    if len(problems) <= max_problems:
        return problems
    more = len(problems) - max_problems
    return problems[:max_problems] + [f"{where}: ... and {more} more problem{'s' if more != 1 else ''}"]


def read_bytes(path) -> bytes:
    """Read a file, turning the usual failures into `DataError`s that name the path."""
    p = data_path(path)  # ``data/bluey/...``: the shipped files
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a JSONL file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def split_lines(data: bytes) -> Iterable[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for each non-blank line; BOM and CR removed."""
    data = data.removeprefix(_UTF8_BOM)
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if raw.strip():
            yield lineno, raw


def json_object(raw: bytes) -> tuple[dict | None, list[str]]:
    """One line decoded and parsed as a JSON object, or None and the problem."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.end]
        return None, [f"invalid UTF-8 at byte {err.start + 1} of the line ({bad!r})"]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return None, [f"bad JSON: {err.msg} (column {err.colno})"]
    except ValueError as err:  # e.g. an integer longer than Python's int-conversion limit
        return None, [f"bad JSON: {err}"]
    except RecursionError:
        return None, ["bad JSON: nested too deeply"]
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {json_type(obj)}"]
    return obj, []


def json_type(value) -> str:
    """The JSON name of a Python value's type, for messages users understand."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
