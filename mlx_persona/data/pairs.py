"""Preference pairs: the JSONL format that DPO and ORPO train on, its validation, and its encoding.

One object a line: ``{"prompt": "..."}`` or ``{"messages": [...]}`` (system/user/assistant turns ending
with a user turn), plus ``"chosen"`` and ``"rejected"`` (different, non-empty replies), and optionally
``"source"`` (``"human"``, ``"judge:NAME"``, ``"rule:complete"`` ...) and ``"prompt_key"``. Any other key is
an error. As for the training formats (:mod:`mlx_persona.data.formats`), the whole file is checked and
every problem reported as ``path:line: reason``.

A pair is encoded as two sequences, the prompt rendered with the chat template and its generation prompt
followed by each reply and its ``<end_of_turn>``; the mask (from :func:`mlx_persona.data.masks.encode_example`,
the one renderer) covers only that last reply and its ``<end_of_turn>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mlx_persona.data import formats, lines
from mlx_persona.data.formats import Example
from mlx_persona.data.lines import DataError

PAIR_KEYS = ("chosen", "rejected")
OPTIONAL_KEYS = ("source", "prompt_key")


@dataclass
class Pair:
    """One preference pair.

    Attributes:
        messages: the conversation before the replies (ending with the user's turn), normalized.
        chosen, rejected: the preferred and the dispreferred reply.
        origin: the line's ``"source"`` (who or what preferred it), or None.
        prompt_key: the line's ``"prompt_key"``, or None.
        source: where it came from, ``"path:line"``.
    """

    messages: list[dict]
    chosen: str
    rejected: str
    origin: str | None = None
    prompt_key: str | int | None = None
    source: str = ""

    def example(self, reply: str) -> Example:
        """The conversation with `reply` as its last, assistant turn."""
        return Example(messages=[*self.messages, {"role": "assistant", "content": reply}], source=self.source)


def is_pair_object(obj) -> bool:
    """Whether a parsed line is meant as a preference pair (it has ``chosen`` or ``rejected``)."""
    return isinstance(obj, dict) and any(k in obj for k in PAIR_KEYS)


def is_pairs_file(path) -> bool:
    """Whether the first non-blank line of a JSONL file is a preference pair (how ``data validate`` tells
    a pairs file from training data). Unreadable or malformed first lines count as not."""
    try:
        data = lines.read_bytes(path)
    except DataError:
        return False
    for _, raw in lines.split_lines(data):
        return is_pair_object(lines.json_object(raw)[0])
    return False


def _parse_pair(raw: bytes, source: str, system_ok: bool) -> tuple[Pair | None, list[str]]:
    """Decode, parse and validate one line of a pairs file."""
    obj, problems = lines.json_object(raw)
    if obj is None:
        return None, problems
    has = [k for k in ("prompt", "messages") if k in obj]
    unknown = [k for k in obj if k not in (*has, *PAIR_KEYS, *OPTIONAL_KEYS)]
    if unknown:
        return None, [(f"unknown key {formats._keys(unknown)} in a preference pair; expected 'prompt' or "
                       f"'messages', 'chosen', 'rejected' and optionally {formats._keys(OPTIONAL_KEYS)}")]
    if len(has) != 1:
        return None, ["a preference pair needs exactly one of 'prompt' or 'messages'"
                      + (" (both given)" if has else "")]
    messages, problems = _prompt_messages(obj, system_ok)
    chosen, p1 = formats._text_field(obj, "chosen")
    rejected, p2 = formats._text_field(obj, "rejected")
    problems += [p for p in (p1, p2) if p]
    origin, p3 = formats._text_field(obj, "source", optional=True)
    problems += [p for p in (p3,) if p]
    key = obj.get("prompt_key")
    if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
        problems.append(f"'prompt_key' must be a string or an integer, got {lines.json_type(key)}")
    if not problems and chosen.strip() == rejected.strip():
        problems.append("'chosen' and 'rejected' are the same reply")
    if problems:
        return None, problems
    return Pair(messages, chosen, rejected, origin, key, source), []


def _prompt_messages(obj: dict, system_ok: bool) -> tuple[list[dict], list[str]]:
    """The conversation before the replies: ``prompt`` as one user turn, or ``messages`` checked for roles
    and order ([system] user (assistant user)*)."""
    if "prompt" in obj:
        prompt, problem = formats._text_field(obj, "prompt")
        return ([{"role": "user", "content": prompt}], []) if problem is None else ([], [problem])
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        what = "an empty array" if messages == [] else lines.json_type(messages)
        return [], [f"'messages' must be a non-empty array of {{role, content}} objects, got {what}"]
    normalized, problems = [], []
    for i, msg in enumerate(messages):
        item, problem = formats._parse_message(msg, i)
        problems += [problem] if problem else []
        normalized += [item] if item else []
    if problems:
        return [], problems
    roles = [m["role"] for m in normalized]
    if roles[-1] != "user":
        return [], [(f"messages[{len(roles) - 1}]: the prompt must end with a user message (the replies are "
                     f"'chosen' and 'rejected'), got {roles[-1]!r}")]
    order = formats._order_problem([*roles, "assistant"], system_ok)  # the order a reply would complete
    return ([], [order]) if order else (normalized, [])


def _pair_key(pair: Pair) -> tuple:
    return (tuple((m["role"], m["content"].strip()) for m in pair.messages), pair.chosen.strip(),
            pair.rejected.strip())


def load_pairs(path, *, system_ok: bool = True, max_problems: int = 50) -> list[Pair]:
    """Loads and validates a preference pairs file.

    Args:
        path: the JSONL file.
        system_ok: whether system messages are allowed (see ``formats.load_jsonl``).
        max_problems: how many problems to list before summarizing the rest as a count.

    Returns:
        The pairs in file order.

    Raises:
        DataError: every problem as ``path:line: reason`` (duplicates of an earlier pair included).
    """
    return lines.read_checked(path, lambda raw, source: _parse_pair(raw, source, system_ok), _pair_key,
                                "preference pairs", max_problems)


def load_pair_splits(train_path, valid_path=None, *, system_ok: bool = True) -> tuple[list[Pair], list[Pair]]:
    """The training and (optional) validation pairs: a file, or a folder with ``train.jsonl`` [+ ``valid.jsonl``].

    Raises:
        DataError: every problem of both files, and validation pairs that are also training pairs.
    """
    train_path, valid_path = formats._resolve_split_paths(train_path, valid_path)
    problems: list[str] = []
    loaded = []
    for path in (train_path, valid_path):
        try:
            loaded.append(load_pairs(path, system_ok=system_ok) if path is not None else [])
        except DataError as err:
            problems.extend(err.problems)
            loaded.append([])
    train, valid = loaded
    seen = {_pair_key(p): p.source for p in train}
    problems += [f"{p.source}: also in the training set ({seen[_pair_key(p)]}); validation pairs must not "
                 "overlap training" for p in valid if _pair_key(p) in seen]
    if problems:
        raise DataError(lines.cap(problems, 50, str(train_path)))
    return train, valid


@dataclass
class EncodedPairs:
    """Token ids and reply masks of each pair's two sequences.

    Attributes:
        chosen, rejected: one int32 array per kept pair.
        chosen_masks, rejected_masks: one bool array per kept pair, True on the reply's tokens.
        report: ``examples`` (pairs seen), ``kept``, ``truncated``, ``dropped``, ``loss_tokens`` and
            ``tokens`` (both sequences, kept pairs).
        reference: [kept, 2] float32 reference log-probabilities (chosen, rejected), once computed.
    """

    chosen: list[np.ndarray]
    chosen_masks: list[np.ndarray]
    rejected: list[np.ndarray]
    rejected_masks: list[np.ndarray]
    report: dict
    reference: np.ndarray | None = field(default=None)

    def __len__(self) -> int:
        return len(self.chosen)


def _reply_only(mask: list[bool]) -> list[bool]:
    """`mask` with only its last run of True kept: the last assistant turn (the reply) of the sequence."""
    out = [False] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = True
        i -= 1
    return out


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_seq_len: int, on_long: str = "truncate") -> EncodedPairs:
    """Encodes each pair's two sequences; a pair is kept or dropped as a whole.

    Args:
        tokenizer: as in ``masks.encode_example``.
        pairs: the pairs.
        max_seq_len: the longest sequence to keep.
        on_long: ``truncate`` (a pair whose reply is cut away entirely is dropped), ``drop`` or ``error``.

    Raises:
        DataError: with ``on_long="error"``, one problem per pair with a sequence over `max_seq_len`.
    """
    from mlx_persona.data.masks import encode_example

    out = EncodedPairs([], [], [], [], {"examples": 0, "kept": 0, "truncated": 0, "dropped": 0,
                                        "loss_tokens": 0, "tokens": 0})
    report, too_long = out.report, []
    for pair in pairs:
        report["examples"] += 1
        encoded = [encode_example(tokenizer, pair.example(reply)) for reply in (pair.chosen, pair.rejected)]
        longest = max(len(ids) for ids, _ in encoded)
        if longest > max_seq_len and on_long != "truncate":
            too_long.append(f"{pair.source}: {longest} tokens, longer than max_seq_len={max_seq_len}")
            report["dropped"] += 1
            continue
        seqs = [(np.asarray(ids[:max_seq_len], np.int32), np.asarray(_reply_only(mask)[:max_seq_len], bool))
                for ids, mask in encoded]
        if not all(m.any() for _, m in seqs):
            report["dropped"] += 1
            continue
        report["kept"] += 1
        report["truncated"] += int(longest > max_seq_len)
        report["tokens"] += sum(len(t) for t, _ in seqs)
        report["loss_tokens"] += sum(int(m.sum()) for _, m in seqs)
        (c, cm), (r, rm) = seqs
        out.chosen.append(c)
        out.chosen_masks.append(cm)
        out.rejected.append(r)
        out.rejected_masks.append(rm)
    if on_long == "error" and too_long:
        raise DataError(too_long)
    return out
