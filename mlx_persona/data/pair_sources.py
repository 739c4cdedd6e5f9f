"""Where preference pairs come from, and the pairs file they go to.

* A ratings database (SQLite, written by ``mlx-persona rate``; recognised by its header, opened read-only):
  every judgement of its ``judgements`` table that was not undone decides its pair of replies. One verdict
  per pair (the same prompt and the same two replies, either side): the latest human one, else (with
  ``rater="judge"`` or ``"all"``) the latest judge one, so a human verdict replaces a judge's. A verdict
  ``a``/``b`` is a pair (chosen: the winner's reply); ``tie`` and ``both_bad`` are counted and left out.
* An evaluation's ``results.jsonl`` (or the folder holding it, as ``eval`` and ``sweep`` write it): its
  replies, for the rules of :mod:`mlx_persona.data.pair_rules`. A ``summary.json`` beside it that records a
  system prompt makes every pair ``{"messages": [system, user]}``, as the replies were generated.

Bad input is one line per problem (``path:line: reason``, ``path: judgement ID: reason``), raised as
:class:`~mlx_persona.safe_io.InputError`. :func:`write_pairs` writes the pairs file whole or not at all.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

from mlx_persona.data.pair_rules import Reply, persona_counts
from mlx_persona.outputs import OutputError, output_lock
from mlx_persona.rate.store import _COLUMNS as _STORE_COLUMNS
from mlx_persona.rate.store import SCHEMA_VERSION, VERDICTS
from mlx_persona.safe_io import InputError, clip, writing

SQLITE_HEADER = b"SQLite format 3\x00"
USER_VERSION = SCHEMA_VERSION
RATERS = ("human", "judge", "all")
STOP_REASONS = ("end_token", "stop_string", "length")
_COLUMNS = tuple(_STORE_COLUMNS["judgements"])
_ROLES = ("system", "user", "assistant")
_VERDICTS = VERDICTS
MAX_PROBLEMS = 20


def input_kind(path: str | Path) -> tuple[str, Path]:
    """``("db" | "results", file)``: a ratings database, or a results file (a folder: its ``results.jsonl``).

    Raises:
        InputError: no such file, or a folder without ``results.jsonl``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "results.jsonl").is_file():
            raise InputError(f"{path}: holds no results.jsonl (give an eval or sweep output folder, its "
                             "results.jsonl, or a ratings database)")
        return "results", path / "results.jsonl"
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    return ("db" if head == SQLITE_HEADER else "results"), path


# ------------------------------------------------------------------------------------------- ratings database
def _open_db(path: Path) -> sqlite3.Connection:
    """A read-only connection to a ratings database whose schema is checked."""
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        columns = {row[1] for row in db.execute("PRAGMA table_info(judgements)")}
    except sqlite3.Error as e:
        raise InputError(f"{path}: cannot be read as a ratings database ({clip(str(e), 120)})") from None
    if not columns:
        db.close()
        raise InputError(f"{path}: has no judgements table, so it is not a ratings database of `mlx-persona rate`")
    missing = [c for c in _COLUMNS if c not in columns]
    if missing or version != USER_VERSION:
        db.close()
        why = f"user_version {version}, expected {USER_VERSION}" if version != USER_VERSION else \
            f"its judgements table lacks {', '.join(missing)}"
        raise InputError(f"{path}: not a ratings database this version reads ({why})")
    return db


def _messages(path: Path, row_id: int, text: str | None):
    """The judgement's chat messages (None when it has only a prompt), checked."""
    if text is None:
        return None
    where = f"{path}: judgement {row_id}: messages"
    try:
        messages = json.loads(text)
    except ValueError as e:
        raise InputError(f"{where}: invalid JSON ({clip(str(e), 80)})") from None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in _ROLES and
            isinstance(m["content"], str) and m["content"].strip() for m in messages):
        raise InputError(f'{where}: expected a list of {{"role": system|user|assistant, "content": "..."}}')
    if messages[-1]["role"] != "user":
        raise InputError(f"{where}: must end with the user's message")
    return messages


def _wanted(rater: str, which: str) -> bool:
    is_human = rater == "human"
    return which == "all" and (is_human or rater.startswith("judge:")) or \
        (which == "human" and is_human) or (which == "judge" and rater.startswith("judge:"))


def judgement_pairs(path: str | Path, rater: str = "human") -> tuple[list[dict], Counter]:
    """Preference pairs from a ratings database (see the module doc).

    Args:
        path: the database.
        rater: ``human``, ``judge`` (every ``judge:NAME``) or ``all`` (a human verdict wins).

    Returns:
        ``(pairs, counts)``: the pairs file's objects in the order of their deciding judgements, and the
        counts ``judgements``, ``ties``, ``both_bad``, ``undone``, ``duplicates`` (a pair judged again by the
        same kind of rater: the latest counts), ``overruled`` (judge verdicts a human one replaced),
        ``same_reply`` (both sides the same text), ``empty`` (an empty reply), ``other_raters`` (not asked for).
    """
    if rater not in RATERS:
        raise ValueError(f"rater must be one of {RATERS}, not {rater!r}")
    path = Path(path)
    db = _open_db(path)
    try:
        rows = db.execute("SELECT id, created, rater, prompt_key, prompt, messages, reply_a, reply_b, verdict, "
                          "undone FROM judgements ORDER BY id").fetchall()
    except sqlite3.Error as e:
        raise InputError(f"{path}: cannot be read as a ratings database ({clip(str(e), 120)})") from None
    finally:
        db.close()
    counts: Counter = Counter(judgements=len(rows))
    best: dict[tuple, tuple] = {}  # the pair -> the judgement that decides it
    for row in rows:
        row_id, _, who, key, prompt, messages, reply_a, reply_b, verdict, undone = row
        if undone:
            counts["undone"] += 1
            continue
        if not isinstance(who, str) or not _wanted(who, rater):
            counts["other_raters"] += 1
            continue
        pair = (key, prompt, messages, frozenset((reply_a, reply_b)))
        rank = (who == "human", row_id)  # the latest: ids only grow (another tool's `created` may not compare)
        if pair in best:
            counts["duplicates" if best[pair][0][0] == rank[0] else "overruled"] += 1
            if rank < best[pair][0]:
                continue
        best[pair] = (rank, row)
    pairs = []
    for _, row in sorted(best.values(), key=lambda v: v[1][0]):
        row_id, _, who, key, prompt, messages, reply_a, reply_b, verdict, _ = row
        if not all(isinstance(v, str) for v in (prompt, reply_a, reply_b)) or verdict not in _VERDICTS:
            raise InputError(f"{path}: judgement {row_id}: prompt, reply_a and reply_b must be text and verdict "
                             f"one of {', '.join(_VERDICTS)}")
        if verdict in ("tie", "both_bad"):
            counts["ties" if verdict == "tie" else "both_bad"] += 1
            continue
        chosen, rejected = (reply_a, reply_b) if verdict == "a" else (reply_b, reply_a)
        if not chosen.strip() or not rejected.strip():
            counts["empty"] += 1
            continue
        if chosen == rejected:
            counts["same_reply"] += 1
            continue
        context = {"messages": m} if (m := _messages(path, row_id, messages)) is not None else {"prompt": prompt}
        pairs.append({**context, "chosen": chosen, "rejected": rejected, "source": who, "prompt_key": str(key)})
    return pairs, counts


# ------------------------------------------------------------------------------------------- results.jsonl
def _reply(obj, line: int, persona, markers: bool) -> tuple[Reply | None, str | None]:
    """One results row as a :class:`Reply`, or the reason it is not one."""
    if not isinstance(obj, dict):
        return None, f"expected an object (a row of results.jsonl), got {type(obj).__name__}"
    for key, kind in (("model", str), ("prompt", str), ("text", str), ("stop_reason", str)):
        if not isinstance(obj.get(key), kind):
            return None, f"{key}: missing or not a string (a row of results.jsonl has model, prompt, text, stop_reason)"
    if not obj["prompt"].strip():
        return None, "prompt: empty"
    if obj["stop_reason"] not in STOP_REASONS:
        return None, f"stop_reason: {clip(obj['stop_reason'], 40)!r} is not one of {', '.join(STOP_REASONS)}"
    key = obj.get("prompt_id", obj["prompt"])
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        return None, "prompt_id: must be an integer"
    breaking = found = None
    if persona is not None:
        breaking, found = persona_counts(obj["text"], persona)
    elif markers:
        m = obj.get("metrics")
        names = ("breaking_hits", "catchphrase_hits", "vocabulary_hits")
        if not isinstance(m, dict) or not all(isinstance(m.get(n), int) and not isinstance(m.get(n), bool)
                                              for n in names):
            return None, ("metrics: no breaking_hits, catchphrase_hits and vocabulary_hits to tell in-character "
                          "by; pass --persona CARD to count them")
        breaking, found = m["breaking_hits"], m["catchphrase_hits"] + m["vocabulary_hits"]
    return Reply(str(key), obj["prompt"], obj["text"], obj["stop_reason"], line, obj["model"], breaking, found), None


def eval_system(results: Path) -> str | None:
    """The system prompt the replies were generated with, from the ``summary.json`` beside them."""
    summary = results.parent / "summary.json"
    if not summary.is_file():
        return None
    try:
        system = json.loads(summary.read_text(encoding="utf-8")).get("system")
    except (ValueError, AttributeError, OSError) as e:
        raise InputError(f"{summary}: cannot be read for the system prompt of {results.name} "
                         f"({clip(str(e), 80)})") from None
    return system if isinstance(system, str) and system.strip() else None


def read_results(path: str | Path, *, persona=None, markers: bool = False) -> tuple[list[Reply], str | None]:
    """The replies of an eval's ``results.jsonl``, and the system prompt they answered (None: none).

    Args:
        path: the results file.
        persona: a persona card to count breaking phrases and markers with (None: the row's own counts,
            read only when `markers`).
        markers: the rules need the persona counts.

    Raises:
        InputError: every bad line, as ``path:line: reason`` (at most 20, then a count).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    replies, problems = [], []
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            reply, why = _reply(json.loads(raw.decode("utf-8")), line, persona, markers)
        except UnicodeDecodeError as e:
            reply, why = None, f"not valid UTF-8 (byte {e.start} of the line)"
        except (ValueError, RecursionError) as e:
            reply, why = None, f"invalid JSON ({clip(str(e), 80) if isinstance(e, ValueError) else 'nested too deep'})"
        if why:
            problems.append(f"{path}:{line}: {why}")
        else:
            replies.append(reply)
    if problems:
        extra = len(problems) - MAX_PROBLEMS
        raise InputError("\n".join(problems[:MAX_PROBLEMS]) + (f"\n... and {extra} more problems" if extra > 0 else ""))
    if not replies:
        raise InputError(f"{path}: no replies (an eval's results.jsonl has one row per reply)")
    return replies, eval_system(path)


# ------------------------------------------------------------------------------------------- the pairs file
def dedupe(pairs: list[dict], counts: Counter) -> list[dict]:
    """`pairs` without repeats of the same prompt, chosen and rejected (the first kept; ``duplicates`` counted)."""
    seen, out = set(), []
    for p in pairs:
        key = json.dumps([p.get("prompt"), p.get("messages"), p["chosen"], p["rejected"]])
        if key in seen:
            counts["duplicates"] += 1
        else:
            seen.add(key)
            out.append(p)
    return out


def _json_line(obj) -> bytes:
    """`obj` as one UTF-8 JSON line; escaped as ASCII when it holds a lone surrogate (a ``\\ud800`` escape in
    the input), which UTF-8 cannot hold."""
    try:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(obj) + "\n").encode("ascii")


def write_pairs(out: str | Path, pairs: list[dict], *, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Writes `pairs` as JSONL at `out`: a temporary file beside it, synced, renamed over it.

    An interrupted or failed write leaves `out` as it was and no temporary file. Holds `out`'s output
    lock (:func:`mlx_persona.outputs.output_lock`) throughout.

    Raises:
        OutputError: `out` exists (without `overwrite`), is a folder, or is the input `source`.
        WriteError: the write failed (a full disk), one line.
    """
    out = Path(out).expanduser().absolute()
    with writing(out), output_lock(out):  # writing: a full disk or a parent that is a file, as one line
        if out.is_dir():
            raise OutputError(f"{out}: is a folder; give the pairs file to write (e.g. pairs.jsonl)")
        if source is not None and out.exists() and out.resolve() == Path(source).resolve():
            raise OutputError(f"{out}: is the input; choose another output file")
        if out.exists() and not overwrite:
            raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for p in pairs:
                    f.write(_json_line(p))
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
            os.replace(tmp, out)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
    return out
