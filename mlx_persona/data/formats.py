"""Training data formats and their validation.

Every line of a JSONL file is one example in one of four formats (detected per line):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``{"instruction": "...", "input": "...", "response": "...", "system": "..."}`` (input, system optional)
* ``{"prompt": "...", "completion": "..."}``
* ``{"text": "..."}`` (raw text, trained on every token)

All but ``text`` normalize to ``messages``. A file is validated as a whole and every problem is
reported as ``path:line: reason`` in one `DataError`, so a user fixes a file in one pass instead of
one error per run (reading lines and collecting problems: :mod:`mlx_persona.data.lines`). Preference
pairs, for DPO and ORPO, are :mod:`mlx_persona.data.pairs`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mlx_persona.data.lines import DataError, cap, json_object, json_type, read_checked
from mlx_persona.paths import data_path

FORMATS = ("messages", "instruction/response", "prompt/completion", "text")
ROLES = ("system", "user", "assistant")
ON_LONG = ("truncate", "drop", "error")

# Keys that identify a format; a line matching none or several of these is rejected.
_FORMAT_KEYS = {
    "messages": ("messages",),
    "instruction/response": ("instruction", "response"),
    "prompt/completion": ("prompt", "completion"),
    "text": ("text",),
}
# Optional keys that only the instruction format understands; elsewhere they would be silently lost.
_INSTRUCTION_ONLY_KEYS = ("input", "system")
_NO_SYSTEM_ROLE = "the chat template has no system role"


@dataclass
class Example:
    """One training example.

    Attributes:
        messages: normalized ``[{"role": ..., "content": str}]``; empty for the ``text`` format.
        text: the raw text of a ``text`` example, else None.
        source: where it came from, ``"path:line"``.
    """

    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    source: str = ""


def load_jsonl(path, *, system_ok: bool = True, max_problems: int = 50) -> list[Example]:
    """Load and validate a JSONL file of training examples.

    The whole file is checked before anything is returned. Blank lines are skipped, a UTF-8 BOM at
    the start and CRLF line ends are accepted, and each line is decoded on its own so that invalid
    UTF-8 is reported on its line.

    Args:
        path: the JSONL file.
        system_ok: whether system messages are allowed (False when the chat template has no system
            role; see `template_supports_system`).
        max_problems: how many problems to list before summarizing the rest as a count.

    Returns:
        The examples in file order.

    Raises:
        DataError: listing every problem as ``path:line: reason``.
    """
    return read_checked(path, lambda raw, source: _parse_line(raw, source, system_ok), _example_key,
                        "examples", max_problems)


def load_splits(train_path, valid_path=None, *, system_ok: bool = True) -> tuple[list[Example], list[Example]]:
    """Load the training and (optional) validation files, checking both before failing.

    Args:
        train_path: the training JSONL, or a folder holding ``train.jsonl`` and optionally
            ``valid.jsonl``.
        valid_path: the validation JSONL; overrides the folder's ``valid.jsonl``.
        system_ok: as in `load_jsonl`.

    Returns:
        ``(train, valid)``; ``valid`` is empty when there is no validation file.

    Raises:
        DataError: every problem of both files, plus validation examples that also occur in the
            training file (a leak that makes validation loss meaningless).
    """
    train_path, valid_path = _resolve_split_paths(train_path, valid_path)
    problems: list[str] = []
    train = _load_collecting(train_path, system_ok, problems)
    valid = _load_collecting(valid_path, system_ok, problems) if valid_path is not None else []
    problems.extend(_overlap_problems(train, valid))
    if problems:
        raise DataError(problems)
    return train, valid


def _resolve_split_paths(train_path, valid_path):
    """Turn a data folder into its train/valid files; explicit paths pass through."""
    folder = data_path(train_path)  # ``data/bluey``: the shipped data, wherever this runs
    if not folder.is_dir():
        return train_path, valid_path
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"{folder}: no train.jsonl in this folder")
    if valid_path is None and (folder / "valid.jsonl").is_file():
        valid_path = folder / "valid.jsonl"
    return folder / "train.jsonl", valid_path


def _load_collecting(path, system_ok: bool, problems: list[str]) -> list[Example]:
    """`load_jsonl`, adding its problems to `problems` instead of raising."""
    try:
        return load_jsonl(path, system_ok=system_ok)
    except DataError as err:
        problems.extend(err.problems)
        return []


def _overlap_problems(train: list[Example], valid: list[Example], max_problems: int = 50) -> list[str]:
    """One problem per validation example that also appears in the training set."""
    train_source = {}
    for ex in train:
        train_source.setdefault(_example_key(ex), ex.source)
    problems = [
        f"{ex.source}: also in the training set ({train_source[_example_key(ex)]}); "
        "validation examples must not overlap training"
        for ex in valid
        if _example_key(ex) in train_source
    ]
    return cap(problems, max_problems, "train/valid overlap")


def _parse_line(raw: bytes, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Decode, parse and validate one line. Returns the example (or None) and the problems."""
    obj, problems = json_object(raw)
    if obj is None:
        return None, problems
    fmt, problem = _detect_format(obj)
    if problem:
        return None, [problem]
    return _PARSERS[fmt](obj, source, system_ok)


def _detect_format(obj: dict) -> tuple[str | None, str | None]:
    """Name the format of a line from its keys, or explain why none fits."""
    matches = [fmt for fmt, keys in _FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if len(matches) == 1:
        fmt = matches[0]
        stray = [k for k in _INSTRUCTION_ONLY_KEYS if k in obj and fmt != "instruction/response"]
        if stray:
            return None, f"key {_keys(stray)} is only used by the instruction/response format, not by {fmt}"
        return fmt, None
    accepted = "; ".join(FORMATS)
    if not matches:
        return None, f"unknown format: keys found {_keys(obj)}; accepted formats: {accepted}"
    return None, f"ambiguous format: keys {_keys(obj)} match {' and '.join(matches)}; use exactly one of: {accepted}"


def _keys(keys: Iterable[str]) -> str:
    """Render keys as ``'a', 'b'`` (or ``(none)``)."""
    names = [repr(k) for k in keys]
    return ", ".join(names) if names else "(none)"


def _text_field(obj: dict, key: str, where: str = "", optional: bool = False) -> tuple[str | None, str | None]:
    """Fetch a string field. Returns ``(value, problem)``; optional fields may be absent, null or ''.

    `where` prefixes the problem (e.g. ``"messages[2] (user): "``).
    """
    value = obj.get(key)
    if optional and (value is None or value == ""):
        return None, None
    if key not in obj:
        return None, f"{where}missing '{key}'"
    if not isinstance(value, str):
        return None, f"{where}'{key}' must be a string, got {json_type(value)}"
    if not value.strip():
        return None, f"{where}'{key}' is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON escapes like "\ud800" decode to unpaired surrogates
        return None, f"{where}'{key}' is not valid Unicode (unpaired surrogate {value[err.start]!r})"
    return value, None


def _parse_messages(obj: dict, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Validate the ``messages`` format: types, roles, content, then role order."""
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if messages == [] else json_type(messages)
        return None, [f"'messages' must be a non-empty array of {{role, content}} objects, got {what}"]
    normalized, problems = [], []
    for i, msg in enumerate(messages):
        item, problem = _parse_message(msg, i)
        if problem:
            problems.append(problem)
        else:
            normalized.append(item)
    if problems:
        return None, problems
    order = _order_problem([m["role"] for m in normalized], system_ok)
    if order:
        return None, [order]
    return Example(messages=normalized, source=source), []


def _parse_message(msg, i: int) -> tuple[dict | None, str | None]:
    """Validate one message object; returns ``({role, content}, None)`` or ``(None, problem)``."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        return None, f"{where} must be an object with 'role' and 'content', got {json_type(msg)}"
    role = msg.get("role")
    if "role" not in msg:
        return None, f"{where}: missing 'role'"
    if not isinstance(role, str):
        return None, f"{where}: 'role' must be a string, got {json_type(role)}"
    if role not in ROLES:
        return None, f"{where}: unknown role {role!r} (expected one of: {', '.join(ROLES)})"
    content, problem = _text_field(msg, "content", f"{where} ({role}): ")
    if problem:
        return None, problem
    return {"role": role, "content": content}, None


def _order_problem(roles: list[str], system_ok: bool) -> str | None:
    """The first role-order problem: [system] user assistant (user assistant)*, or None."""
    start = 0
    if roles[0] == "system":
        if not system_ok:
            return f"messages[0]: a system message, but {_NO_SYSTEM_ROLE}"
        start = 1
    for i in range(start, len(roles)):
        if roles[i] == "system":
            return f"messages[{i}]: a system message is only allowed as the first message"
    if start == len(roles):
        return "only a system message; a conversation needs user and assistant turns"
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            return (
                f"messages[{i}]: expected {expected!r}, got {roles[i]!r} "
                "(roles must alternate user/assistant, starting with user after an optional system message)"
            )
    if roles[-1] != "assistant":
        last = len(roles) - 1
        return f"messages[{last}]: the conversation ends with a user message; it must end with an assistant reply"
    return None


def _parse_instruction(obj: dict, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Validate ``instruction``/``input``/``response``/``system``; input follows a blank line."""
    instruction, p1 = _text_field(obj, "instruction")
    response, p2 = _text_field(obj, "response")
    extra, p3 = _text_field(obj, "input", optional=True)
    system, p4 = _text_field(obj, "system", optional=True)
    problems = [p for p in (p1, p2, p3, p4) if p]
    if system is not None and not system_ok:
        problems.append(f"'system': {_NO_SYSTEM_ROLE}")
    if problems:
        return None, problems
    user = instruction.strip() if extra is None else f"{instruction.strip()}\n\n{extra.strip()}"
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return Example(messages=messages, source=source), []


def _parse_prompt(obj: dict, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Validate ``prompt``/``completion`` (one user turn, one assistant turn)."""
    prompt, p1 = _text_field(obj, "prompt")
    completion, p2 = _text_field(obj, "completion")
    problems = [p for p in (p1, p2) if p]
    if problems:
        return None, problems
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Example(messages=messages, source=source), []


def _parse_text(obj: dict, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Validate ``text`` (raw text, no chat template)."""
    text, problem = _text_field(obj, "text")
    if problem:
        return None, [problem]
    return Example(messages=[], text=text, source=source), []


_PARSERS = {
    "messages": _parse_messages,
    "instruction/response": _parse_instruction,
    "prompt/completion": _parse_prompt,
    "text": _parse_text,
}


def _example_key(example: Example) -> tuple:
    """Identity of an example for duplicate/overlap checks.

    Contents are stripped because the chat template trims them: examples that differ only in
    surrounding whitespace train the model on identical tokens.
    """
    if example.text is not None:
        return ("text", example.text.strip())
    return tuple((m["role"], m["content"].strip()) for m in example.messages)
