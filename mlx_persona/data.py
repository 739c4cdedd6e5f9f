"""Training data: JSONL formats, validation, chat-template rendering, loss masks and statistics.

Every line of a JSONL file is one example in one of four formats (detected per line):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* ``{"instruction": "...", "input": "...", "response": "...", "system": "..."}`` (input, system optional)
* ``{"prompt": "...", "completion": "..."}``
* ``{"text": "..."}`` (raw text, trained on every token)

All but ``text`` normalize to ``messages``. A file is validated as a whole and every problem is
reported as ``path:line: reason`` in one `DataError`, so a user fixes a file in one pass instead of
one error per run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "Example",
    "EncodedDataset",
    "FORMATS",
    "load_jsonl",
    "load_splits",
    "template_supports_system",
    "render",
    "encode_example",
    "prepare_dataset",
    "compute_stats",
    "format_stats",
]

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
_UTF8_BOM = b"\xef\xbb\xbf"
_NO_SYSTEM_ROLE = "the chat template has no system role"


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


@dataclass
class EncodedDataset:
    """Token ids and loss masks ready for batching.

    Attributes:
        tokens: one int32 array per kept example.
        masks: one bool array per kept example, True where the token is a loss target.
        report: counts: ``examples`` (seen), ``kept``, ``truncated`` (kept examples that were cut),
            ``dropped`` (too long under ``drop``, or no loss token left), ``loss_tokens`` and
            ``tokens`` (totals over the kept examples). ``examples == kept + dropped``.
    """

    tokens: list[np.ndarray]
    masks: list[np.ndarray]
    report: dict


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


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
    data = _read_bytes(path)
    problems: list[str] = []
    examples: list[Example] = []
    first_line_of: dict[tuple, int] = {}
    for lineno, raw in _split_lines(data):
        example, reasons = _parse_line(raw, f"{path}:{lineno}", system_ok)
        if example is not None:
            key = _example_key(example)
            if key in first_line_of:
                reasons.append(f"duplicate of line {first_line_of[key]}")
            else:
                first_line_of[key] = lineno
                examples.append(example)
        problems.extend(f"{path}:{lineno}: {reason}" for reason in reasons)
    if not examples and not problems:
        problems.append(f"{path}: empty file (no examples)")
    if problems:
        raise DataError(_cap(problems, max_problems, str(path)))
    return examples


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
    if not os.path.isdir(train_path):
        return train_path, valid_path
    folder = Path(train_path)
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
    return _cap(problems, max_problems, "train/valid overlap")


def _cap(problems: list[str], max_problems: int, where: str) -> list[str]:
    """Keep the first `max_problems` problems and say how many more there were."""
    if len(problems) <= max_problems:
        return problems
    more = len(problems) - max_problems
    return problems[:max_problems] + [f"{where}: ... and {more} more problem{'s' if more != 1 else ''}"]


def _read_bytes(path) -> bytes:
    """Read a file, turning the usual failures into `DataError`s that name the path."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a JSONL file")
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _split_lines(data: bytes) -> Iterable[tuple[int, bytes]]:
    """Yield ``(line number, bytes)`` for each non-blank line; BOM and CR removed."""
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if raw.strip():
            yield lineno, raw


def _parse_line(raw: bytes, source: str, system_ok: bool) -> tuple[Example | None, list[str]]:
    """Decode, parse and validate one line. Returns the example (or None) and the problems."""
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
        return None, [f"expected a JSON object, got {_json_type(obj)}"]
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


def _json_type(value) -> str:
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
        return None, f"{where}'{key}' must be a string, got {_json_type(value)}"
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
        what = "an empty array" if messages == [] else _json_type(messages)
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
        return None, f"{where} must be an object with 'role' and 'content', got {_json_type(msg)}"
    role = msg.get("role")
    if "role" not in msg:
        return None, f"{where}: missing 'role'"
    if not isinstance(role, str):
        return None, f"{where}: 'role' must be a string, got {_json_type(role)}"
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


# --------------------------------------------------------------------------------------------
# Rendering and loss masks
# --------------------------------------------------------------------------------------------


def _hf(tokenizer):
    """The transformers tokenizer behind an mlx-lm `TokenizerWrapper` (or the tokenizer itself)."""
    # Imported here so that validating data (`mlx-persona data validate`) never imports transformers.
    from mlx_persona.tokenizer import unwrap_tokenizer

    return unwrap_tokenizer(tokenizer)


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render messages to text with the tokenizer's chat template.

    Called on the object given (not the HF tokenizer behind a wrapper) because mlx-lm's wrapper may
    carry its own template function for some models.
    """
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def template_supports_system(tokenizer) -> bool:
    """Whether the tokenizer's chat template accepts a system message and keeps its text.

    Args:
        tokenizer: a transformers tokenizer or an mlx-lm `TokenizerWrapper`.

    Returns:
        True if a probe conversation with a system message renders and contains the system text;
        False if the template raises, has no template, or silently drops the system message.
    """
    probe = "mlx-persona system probe 7d1f"
    messages = [
        {"role": "system", "content": probe},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]
    try:
        return probe in _apply_template(tokenizer, messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - any template failure means "no system role"
        return False


def render(tokenizer, example: Example, *, add_generation_prompt: bool = False) -> str:
    """Render an example to the exact text the model is trained on.

    Args:
        tokenizer: a transformers tokenizer or an mlx-lm `TokenizerWrapper`.
        example: a chat example (rendered with the chat template) or a ``text`` example (the raw
            text with the bos token prepended when the tokenizer has one).
        add_generation_prompt: append the assistant header (chat examples only).

    Returns:
        The rendered text (special tokens written out as text).

    Raises:
        DataError: ``source: the chat template failed: ...`` when the template rejects the example.
    """
    if example.text is not None:
        return _bos_text(tokenizer) + example.text
    return _render_messages(tokenizer, example.messages, example.source, add_generation_prompt)


def _bos_text(tokenizer) -> str:
    """The bos token as text, or '' when the tokenizer has none."""
    return getattr(_hf(tokenizer), "bos_token", None) or ""


def _render_messages(tokenizer, messages: list[dict], source: str, add_generation_prompt: bool) -> str:
    """`_apply_template` with template errors reported against the example's source."""
    try:
        return _apply_template(tokenizer, messages, add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - Jinja raises many types; all mean the same to the user
        raise DataError(f"{source}: the chat template failed: {err}") from err


def _loss_spans(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans ``[start, end)`` the loss is computed on.

    For a chat example each assistant turn's span starts after its header and ends after the
    turn's closing text (``<end_of_turn>`` for Gemma) without trailing whitespace. The header's
    end is found by rendering ``messages[:i]`` with the generation prompt and the turn's end by
    rendering ``messages[:i+1]``; this only works if each rendering is a prefix of the next, which
    is checked.
    """
    full = render(tokenizer, example)
    if example.text is not None:
        return full, [(len(_bos_text(tokenizer)), len(full))]
    spans = []
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        before = _render_messages(tokenizer, example.messages[:i], example.source, True)
        last = i == len(example.messages) - 1
        through = full if last else _render_messages(tokenizer, example.messages[: i + 1], example.source, False)
        _check_prefix(before, through, full, i, example.source)
        start = len(before)
        spans.append((start, start + len(through[start:].rstrip())))
    return full, spans


def _check_prefix(before: str, through: str, full: str, i: int, source: str) -> None:
    """Raise if the template is not prefix-stable at assistant message `i`."""
    if through.startswith(before) and full.startswith(through):
        return
    raise DataError(
        f"{source}: the chat template is not prefix-stable at messages[{i}]: rendering the conversation "
        "up to a turn (with the generation prompt) is not a prefix of rendering it further, so the "
        "assistant turns cannot be located for the loss mask (templates that rewrite earlier turns, "
        "such as ones that drop past reasoning, are not supported)"
    )


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[bool]]:
    """Tokenize an example and mark the tokens the loss is computed on.

    Chat examples: every assistant turn's content and its end-of-turn marker are masked in; the bos
    token, system/user turns, role headers and the newline after each turn are not. Text examples:
    every token but bos. A token counts when its first character lies inside a loss span.

    Args:
        tokenizer: a fast transformers tokenizer or an mlx-lm `TokenizerWrapper` around one.
        example: the example.

    Returns:
        ``(token ids, mask)`` of equal length.

    Raises:
        DataError: when the chat template fails or is not prefix-stable.
        TypeError: when the tokenizer cannot report character offsets (a slow tokenizer).
    """
    text, spans = _loss_spans(tokenizer, example)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    mask = [_starts_inside(start, spans) for start, _ in offsets]
    return ids, mask


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; special tokens come from the text itself."""
    hf = _hf(tokenizer)
    if not getattr(hf, "is_fast", False):
        raise TypeError(f"{type(hf).__name__} is not a fast tokenizer; loss masks need character offsets")
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _starts_inside(start: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a character position lies in any ``[start, end)`` span."""
    return any(lo <= start < hi for lo, hi in spans)


def prepare_dataset(
    tokenizer, examples: Sequence[Example], max_seq_len: int, on_long: str = "truncate"
) -> EncodedDataset:
    """Encode examples and apply the length policy.

    Args:
        tokenizer: as in `encode_example`.
        examples: the examples.
        max_seq_len: the longest token sequence to keep.
        on_long: what to do with longer examples: ``"truncate"`` (keep the first `max_seq_len`
            tokens), ``"drop"`` (leave them out) or ``"error"`` (raise).

    Returns:
        The encoded dataset. Examples left without any loss token (e.g. truncated before the first
        reply) are dropped and counted in ``report["dropped"]``.

    Raises:
        ValueError: for a bad `on_long` or `max_seq_len`.
        DataError: with ``on_long="error"``, one problem per long example naming its source and
            length.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    tokens, masks, too_long = [], [], []
    report = {"examples": 0, "kept": 0, "truncated": 0, "dropped": 0, "loss_tokens": 0, "tokens": 0}
    for example in examples:
        report["examples"] += 1
        ids, mask = encode_example(tokenizer, example)
        cut = len(ids) > max_seq_len
        if cut and on_long != "truncate":
            too_long.append(f"{example.source}: {len(ids)} tokens, longer than max_seq_len={max_seq_len}")
            report["dropped"] += 1
            continue
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            report["dropped"] += 1
            continue
        report["kept"] += 1
        report["truncated"] += int(cut)
        report["tokens"] += len(ids)
        report["loss_tokens"] += sum(mask)
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(mask, dtype=bool))
    if on_long == "error" and too_long:
        raise DataError(too_long)
    return EncodedDataset(tokens=tokens, masks=masks, report=report)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

# The narrow-band warning: replies whose p90/p10 ratio is below this, or whose central 80% fit in
# a band this many words wide that is also relatively tight, teach the model one reply length.
_NARROW_RATIO = 2.0
_NARROW_BAND_WORDS = 30
_NARROW_BAND_SHARE = 0.8
_NARROW_MIN_REPLIES = 5
_FEW_EXAMPLES = 50
_HIST_BINS = 10
_BAR_WIDTH = 40


def compute_stats(examples: Sequence[Example], tokenizer=None) -> dict:
    """Summarize a dataset, focusing on the length of assistant replies.

    Reply length matters most for a persona: a model fine-tuned on replies of one length learns to
    stop at that length whatever it is asked.

    Args:
        examples: the examples.
        tokenizer: optional; adds token lengths of replies and of whole rendered examples.

    Returns:
        ``{"examples", "conversations", "text_examples", "turns" (user + assistant messages),
        "assistant_replies", "system_messages", "reply_words", "reply_tokens", "example_tokens",
        "warnings"}``. Each length entry is None or ``{"count", "min", "p10", "median", "p90",
        "max", "mean", "histogram": {"bins": edges, "counts": counts}}`` with integer-aligned
        half-open bins ``[bins[k], bins[k+1])``; the token entries are None without a tokenizer.
    """
    replies = [m["content"].strip() for ex in examples for m in ex.messages if m["role"] == "assistant"]
    words = [len(r.split()) for r in replies]
    stats = {
        "examples": len(examples),
        "conversations": sum(1 for ex in examples if ex.text is None),
        "text_examples": sum(1 for ex in examples if ex.text is not None),
        "turns": sum(1 for ex in examples for m in ex.messages if m["role"] != "system"),
        "assistant_replies": len(replies),
        "system_messages": sum(1 for ex in examples for m in ex.messages if m["role"] == "system"),
        "reply_words": _distribution(words),
        "reply_tokens": None,
        "example_tokens": None,
    }
    if tokenizer is not None:
        hf = _hf(tokenizer)
        stats["reply_tokens"] = _distribution([len(hf.encode(r, add_special_tokens=False)) for r in replies])
        stats["example_tokens"] = _distribution([len(encode_example(tokenizer, ex)[0]) for ex in examples])
    stats["warnings"] = _warnings(stats, words)
    return stats


def _distribution(values: list[int]) -> dict | None:
    """Order statistics and an integer-aligned histogram of non-negative integers."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    p10, median, p90 = (float(x) for x in np.percentile(arr, [10, 50, 90]))
    return {
        "count": len(values),
        "min": int(arr.min()),
        "p10": p10,
        "median": median,
        "p90": p90,
        "max": int(arr.max()),
        "mean": float(arr.mean()),
        "histogram": _histogram(values),
    }


def _histogram(values: list[int]) -> dict:
    """At most `_HIST_BINS` equal integer-width bins covering ``[min, max]``."""
    lo, hi = min(values), max(values)
    n_bins = min(_HIST_BINS, hi - lo + 1)
    width = math.ceil((hi - lo + 1) / n_bins)
    edges = [lo + k * width for k in range(n_bins + 1)]
    counts = [0] * n_bins
    for v in values:
        counts[(v - lo) // width] += 1
    return {"bins": edges, "counts": counts}


def _warnings(stats: dict, words: list[int]) -> list[str]:
    """Human-readable warnings about the dataset."""
    warnings = []
    if stats["examples"] < _FEW_EXAMPLES:
        warnings.append(
            f"only {stats['examples']} examples; teaching a persona usually takes a few hundred conversations"
        )
    if stats["assistant_replies"] == 0:
        warnings.append("no assistant replies (text-format data): reply-length statistics are not available")
    band = _narrow_band(words)
    if band is not None:
        lo, hi, median = band
        warnings.append(
            f"assistant replies cluster in a narrow band ({lo:g}-{hi:g} words, median {median:g}): the model "
            f"will learn to stop at about {median:g} words whatever it is asked; vary reply lengths (short "
            "answers and longer ones) if it should adapt its length to the question"
        )
    return warnings


def _narrow_band(words: list[int]) -> tuple[float, float, float] | None:
    """``(low, high, median)`` in words when reply lengths are clustered, else None.

    Clustered means p90/p10 below `_NARROW_RATIO`, or `_NARROW_BAND_SHARE` of the replies within a
    band at most `_NARROW_BAND_WORDS` wide that is itself tight (high < ratio x low): 5-30 words is
    not one length, 100-125 is.
    """
    if len(words) < _NARROW_MIN_REPLIES:
        return None
    p10, median, p90 = (float(x) for x in np.percentile(words, [10, 50, 90]))
    if p90 / max(p10, 1.0) < _NARROW_RATIO:
        return p10, p90, median
    lo, hi = _densest_band(sorted(words), math.ceil(_NARROW_BAND_SHARE * len(words)))
    if hi - lo <= _NARROW_BAND_WORDS and hi < _NARROW_RATIO * max(lo, 1):
        return lo, hi, median
    return None


def _densest_band(values: list[int], k: int) -> tuple[int, int]:
    """The narrowest ``(low, high)`` window of sorted `values` that holds `k` of them."""
    windows = ((values[i], values[i + k - 1]) for i in range(len(values) - k + 1))
    return min(windows, key=lambda band: band[1] - band[0])


def format_stats(stats: dict) -> str:
    """Format `compute_stats` output for a terminal.

    Args:
        stats: the dict returned by `compute_stats`.

    Returns:
        Multi-line text: counts, each length distribution with an ASCII histogram, and warnings.
    """
    lines = [
        f"examples: {stats['examples']} ({stats['conversations']} conversations, {stats['text_examples']} text)",
        f"turns: {stats['turns']} ({stats['assistant_replies']} assistant replies, "
        f"{stats['system_messages']} system messages)",
    ]
    titles = (
        ("reply_words", "assistant reply length (words)"),
        ("reply_tokens", "assistant reply length (tokens)"),
        ("example_tokens", "example length (tokens, as trained)"),
    )
    for key, title in titles:
        if stats.get(key):
            lines += ["", *_format_distribution(title, stats[key])]
    lines += ["", "warnings:" if stats["warnings"] else "warnings: none"]
    lines += [f"  - {w}" for w in stats["warnings"]]
    return "\n".join(lines)


def _format_distribution(title: str, dist: dict) -> list[str]:
    """A title line with order statistics, then one histogram row per bin."""
    lines = [
        f"{title}: min {dist['min']}, p10 {dist['p10']:g}, median {dist['median']:g}, "
        f"p90 {dist['p90']:g}, max {dist['max']}, mean {dist['mean']:.1f}"
    ]
    edges, counts = dist["histogram"]["bins"], dist["histogram"]["counts"]
    label_width = len(f"{edges[-1] - 1}") * 2 + 1
    peak = max(counts)
    for k, count in enumerate(counts):
        lo, hi = edges[k], edges[k + 1] - 1
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        bar = "#" * max(round(_BAR_WIDTH * count / peak), 1 if count else 0)
        lines.append(f"  {label:>{label_width}} | {bar + ' ' if bar else ''}{count}")
    return lines
