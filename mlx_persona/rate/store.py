"""The ratings database: one SQLite file (WAL, ``synchronous=FULL``) holding the replies to rate and every
judgement, each written in its own transaction, so a killed process or a power cut loses at most the
judgement being made.

Tables: ``judgements`` (the shared contract of issue 15, read by ``mlx-persona data pairs``: one row per
judgement, in a/b terms, with the side shown on the left and ``undone``); ``items`` (this command's own:
one reply per prompt key and model, with the prompt and its chat messages); ``judge_log`` (every answer a
judge gave, or the error instead, and what became of it). ``PRAGMA user_version`` is 1.

A file that is not SQLite, or whose tables are not these, is refused with one line (:class:`RateError`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
HUMAN = "human"
VERDICTS = ("a", "b", "tie", "both_bad")

_JUDGEMENTS = """CREATE TABLE IF NOT EXISTS judgements (
  id INTEGER PRIMARY KEY,
  created REAL NOT NULL,
  rater TEXT NOT NULL,
  prompt_key TEXT NOT NULL,
  prompt TEXT NOT NULL,
  messages TEXT,
  model_a TEXT NOT NULL, reply_a TEXT NOT NULL,
  model_b TEXT NOT NULL, reply_b TEXT NOT NULL,
  left_is TEXT NOT NULL CHECK (left_is IN ('a','b')),
  verdict TEXT NOT NULL CHECK (verdict IN ('a','b','tie','both_bad')),
  note TEXT,
  undone INTEGER NOT NULL DEFAULT 0
)"""
_ITEMS = """CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY,
  prompt_key TEXT NOT NULL,
  prompt TEXT NOT NULL,
  messages TEXT,
  model TEXT NOT NULL,
  reply TEXT NOT NULL,
  UNIQUE (prompt_key, model)
)"""
_JUDGE_LOG = """CREATE TABLE IF NOT EXISTS judge_log (
  id INTEGER PRIMARY KEY,
  created REAL NOT NULL,
  rater TEXT NOT NULL,
  prompt_key TEXT NOT NULL,
  model_a TEXT NOT NULL,
  model_b TEXT NOT NULL,
  outcome TEXT NOT NULL CHECK (outcome IN ('stored','unparsable','failed')),
  answer TEXT,
  error TEXT
)"""
_COLUMNS = {
    "judgements": ["id", "created", "rater", "prompt_key", "prompt", "messages", "model_a", "reply_a", "model_b",
                   "reply_b", "left_is", "verdict", "note", "undone"],
    "items": ["id", "prompt_key", "prompt", "messages", "model", "reply"],
    "judge_log": ["id", "created", "rater", "prompt_key", "model_a", "model_b", "outcome", "answer", "error"],
}


class RateError(ValueError):
    """A problem the user can fix (the database, the inputs, the options); one line, says where."""


@dataclass(frozen=True)
class Pair:
    """Two models' replies to one prompt; ``model_a < model_b`` always (the order they are stored in)."""

    prompt_key: str
    prompt: str
    messages: str | None
    model_a: str
    reply_a: str
    model_b: str
    reply_b: str

    @property
    def key(self) -> tuple[str, str, str]:
        return self.prompt_key, self.model_a, self.model_b


def _check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """Whether the file is a ratings database already (False: an empty one); raises for anything else.

    The ``judgements`` table must be the contract's; this command's own tables, where present, its own
    (a database holding just ``judgements``, written by another tool, gains them when opened)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return False
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for name, columns in _COLUMNS.items():
        found = [r[1] for r in conn.execute(f"PRAGMA table_info({name})")]
        if found != columns and (found or name == "judgements"):
            what = "has no table" if not found else "has a table of other columns:"
            raise RateError(f"{path}: not a ratings database of this version ({what} {name}"
                            f"{'' if not found else ' ' + ', '.join(found)})")
    if version != SCHEMA_VERSION:
        raise RateError(f"{path}: ratings database version {version}; this version reads {SCHEMA_VERSION}")
    return True


def connect(path: str | Path, *, create: bool = True) -> sqlite3.Connection:
    """Opens (or, with `create`, makes) the ratings database at `path`, checked; autocommit mode, so that
    every write below is its own transaction. Without `create` (a reader) nothing is written: a missing
    ``items`` or ``judge_log`` reads as empty (:func:`has_table`)."""
    path = Path(path)
    if not path.exists() and not create:
        raise RateError(f"{path}: no such ratings database")
    if path.exists() and not path.is_file():
        raise RateError(f"{path}: is not a file")
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            if not _check_schema(conn, path) and not create:
                raise RateError(f"{path}: an empty database, not a ratings database")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if create:  # a reader (the summary) writes nothing, so a read-only file can be summarised
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            if create and not tables >= set(_COLUMNS):
                with conn:
                    conn.execute("BEGIN")
                    for sql in (_JUDGEMENTS, _ITEMS, _JUDGE_LOG):
                        conn.execute(sql)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
    except sqlite3.DatabaseError as e:
        raise RateError(f"{path}: not an SQLite ratings database ({e})") from None
    conn.row_factory = sqlite3.Row
    return conn


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def add_items(conn: sqlite3.Connection, rows: list[dict]) -> int:
    """Stores replies (``prompt_key, prompt, messages, model, reply``) not stored yet, in one transaction;
    returns how many were new. A prompt key the database holds with another prompt is an error."""
    known = {r["prompt_key"]: r["prompt"] for r in conn.execute("SELECT DISTINCT prompt_key, prompt FROM items")}
    for row in rows:
        old = known.setdefault(row["prompt_key"], row["prompt"])
        if old != row["prompt"]:
            raise RateError(f"prompt {row['prompt_key']}: the database holds {old[:60]!r} under this key, the "
                            f"input {row['prompt'][:60]!r}; use another --db for another prompt set")
    before = conn.total_changes
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO items (prompt_key, prompt, messages, model, reply) "
                         "VALUES (:prompt_key, :prompt, :messages, :model, :reply)", rows)
    return conn.total_changes - before


def stored_keys(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(prompt_key, model) of every stored reply."""
    return {(r[0], r[1]) for r in conn.execute("SELECT prompt_key, model FROM items")}


def pairs(conn: sqlite3.Connection) -> list[Pair]:
    """Every pair of two models' replies to one prompt, in a fixed order."""
    rows = conn.execute("SELECT prompt_key, prompt, messages, model, reply FROM items "
                        "ORDER BY prompt_key, model").fetchall()
    by_prompt: dict[str, list] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_key"], []).append(r)
    out = []
    for items in by_prompt.values():
        for i, x in enumerate(items):
            for y in items[i + 1:]:
                out.append(Pair(x["prompt_key"], x["prompt"], x["messages"], x["model"], x["reply"], y["model"],
                                y["reply"]))
    return out


def judged(conn: sqlite3.Connection, rater: str) -> list[tuple[str, str, str]]:
    """The pair keys `rater` judged (not undone), oldest first."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT prompt_key, model_a, model_b FROM judgements WHERE rater=? AND undone=0 ORDER BY id", (rater,))]


def record(conn: sqlite3.Connection, pair: Pair, rater: str, left_is: str, verdict: str,
           note: str | None = None) -> int:
    """Writes one judgement in its own transaction (committed when this returns); its row id."""
    if verdict not in VERDICTS or left_is not in ("a", "b"):
        raise RateError(f"verdict {verdict!r} / left_is {left_is!r}: not one of {VERDICTS} / a, b")
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        cur = conn.execute(
            "INSERT INTO judgements (created, rater, prompt_key, prompt, messages, model_a, reply_a, model_b, "
            "reply_b, left_is, verdict, note) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (time.time(), rater, pair.prompt_key, pair.prompt, pair.messages, pair.model_a, pair.reply_a,
             pair.model_b, pair.reply_b, left_is, verdict, note or None))
    return cur.lastrowid


def undo_last(conn: sqlite3.Connection, rater: str = HUMAN) -> sqlite3.Row | None:
    """Marks `rater`'s last judgement (not undone yet) undone; the row as it was, or None when none."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT * FROM judgements WHERE rater=? AND undone=0 ORDER BY id DESC LIMIT 1",
                           (rater,)).fetchone()
        if row is not None:
            conn.execute("UPDATE judgements SET undone=1 WHERE id=?", (row["id"],))
    return row


def log_judge(conn: sqlite3.Connection, rater: str, pair: Pair, outcome: str, answer: str | None,
              error: str | None) -> None:
    """One judge answer (or failure) in ``judge_log``."""
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO judge_log (created, rater, prompt_key, model_a, model_b, outcome, answer, error) "
                     "VALUES (?,?,?,?,?,?,?,?)",
                     (time.time(), rater, pair.prompt_key, pair.model_a, pair.model_b, outcome, answer, error))


def messages_json(messages: list[dict] | None) -> str | None:
    """The ``messages`` column of a chat (None when it is just the prompt)."""
    return None if messages is None else json.dumps(messages, ensure_ascii=False)
