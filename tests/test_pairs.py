"""`mlx-persona data pairs`: preference pairs from a ratings database (the contract's schema, built here with
sqlite3) and from rules over an eval's results.jsonl (its shape pinned by a real eval of builtin:tiny), with
exact expected pairs and counts, the pairs file checked against the contract, and bad input as one line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_persona.cli import main
from mlx_persona.data.pair_rules import Rule, RuleError, parse_rule
from mlx_persona.data.pairs import load_pairs
from mlx_persona.eval.metrics import reply_metrics
from mlx_persona.eval.options import DEFAULT_PERSONA
from mlx_persona.eval.persona import load_persona

REPO = Path(__file__).resolve().parents[1]

# The ratings database of the shared contract (issue 15), verbatim.
SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
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
);
"""
SYSTEM = [{"role": "system", "content": "Be Bluey."}, {"role": "user", "content": "Tell a joke"}]
# id, rater, prompt_key, prompt, messages, reply_a, reply_b, verdict, undone
JUDGEMENTS = [
    (1, "human", "0", "Hi!", None, "Hooray!", "Hello.", "a", 0),
    (2, "human", "0", "Hi!", None, "G'day!", "Greetings.", "b", 0),
    (3, "human", "1", "Why?", None, "Because.", "Dunno.", "tie", 0),
    (4, "human", "1", "Why?", None, "Because!", "No idea.", "both_bad", 0),
    (5, "human", "2", "Play?", None, "Yes please!", "No.", "b", 1),       # undone ...
    (6, "human", "2", "Play?", None, "Yes please!", "No.", "a", 0),       # ... and judged again
    (7, "judge:tiny", "0", "Hi!", None, "Hello.", "Hooray!", "a", 0),    # row 1's pair, sides swapped: human wins
    (8, "judge:tiny", "3", "Tell a joke", json.dumps(SYSTEM), "Knock knock!", "No.", "b", 0),
    (9, "human", "0", "Hi!", None, "Hooray!", "Hello.", "a", 0),          # row 1 again: a duplicate, the latest decides
    (10, "judge:tiny", "4", "Sing?", None, "La la la!", "Hmm.", "a", 0),  # then a human calls it a tie: human wins
    (11, "human", "4", "Sing?", None, "Hmm.", "La la la!", "tie", 0),
]
KEYS = {"prompt", "messages", "chosen", "rejected", "source", "prompt_key"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def check_contract(path: Path) -> list[dict]:
    """The rows of a pairs file, each checked against the shared contract's pairs format."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        assert isinstance(row, dict) and set(row) <= KEYS, (i, row)
        assert ("prompt" in row) != ("messages" in row), i
        if "prompt" in row:
            assert isinstance(row["prompt"], str) and row["prompt"].strip(), i
        else:
            msgs = row["messages"]
            assert isinstance(msgs, list) and msgs and msgs[-1]["role"] == "user", i
            assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                       and isinstance(m["content"], str) and m["content"] for m in msgs), i
        for key in ("chosen", "rejected"):
            assert isinstance(row[key], str) and row[key].strip(), (i, key)
        assert row["chosen"] != row["rejected"], i
        assert all(isinstance(row[k], str) for k in ("source", "prompt_key") if k in row), i
        rows.append(row)
    # The validator `train --method dpo` reads them with agrees (data.pairs: every line, duplicates included).
    assert [(p.chosen, p.rejected) for p in load_pairs(path)] == [(r["chosen"], r["rejected"]) for r in rows]
    return rows


def test_the_contract_schema_is_the_one_rate_creates(tmp_path):
    """SCHEMA above is the contract's own text, kept apart from rate.store so that the pairs tests do not follow
    the store if it drifts; this is what keeps the two the same table."""
    from mlx_persona.rate import store

    def columns(conn):
        return [tuple(r)[1:] for r in conn.execute("PRAGMA table_info(judgements)")]

    ours = sqlite3.connect(":memory:")
    ours.executescript(SCHEMA)
    assert columns(store.connect(tmp_path / "ratings.db")) == columns(ours)


def make_db(path: Path, rows=JUDGEMENTS, version: int = 1, schema: str = SCHEMA) -> sqlite3.Connection:
    """A ratings database as `rate` writes it; the connection is left open (a running rate server)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA user_version={version}")
    db.executescript(schema)
    for n, (i, rater, key, prompt, messages, a, b, verdict, undone) in enumerate(rows):
        db.execute("INSERT INTO judgements (id, created, rater, prompt_key, prompt, messages, model_a, reply_a, "
                   "model_b, reply_b, left_is, verdict, note, undone) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (i, 1000.0 + n, rater, key, prompt, messages, "m1", a, "m2", b, "ab"[n % 2], verdict, None, undone))
    db.commit()
    return db


def pair(prompt, chosen, rejected, source, key):
    context = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    return {**context, "chosen": chosen, "rejected": rejected, "source": source, "prompt_key": key}


# ------------------------------------------------------------------------------------------- database
@pytest.mark.parametrize("rater, expected, left", [
    ("human", [pair("Hi!", "Greetings.", "G'day!", "human", "0"), pair("Play?", "Yes please!", "No.", "human", "2"),
               pair("Hi!", "Hooray!", "Hello.", "human", "0")],
     "left out: 2 ties, 1 both bad, 1 undone skipped, 1 duplicate; 3 judgement(s) by other raters not used"),
    ("judge", [pair("Hi!", "Hello.", "Hooray!", "judge:tiny", "0"),
               pair(SYSTEM, "No.", "Knock knock!", "judge:tiny", "3"),
               pair("Sing?", "La la la!", "Hmm.", "judge:tiny", "4")],
     "left out: 0 ties, 0 both bad, 1 undone skipped, 0 duplicates; 7 judgement(s) by other raters not used"),
    ("all", [pair("Hi!", "Greetings.", "G'day!", "human", "0"), pair("Play?", "Yes please!", "No.", "human", "2"),
             pair(SYSTEM, "No.", "Knock knock!", "judge:tiny", "3"), pair("Hi!", "Hooray!", "Hello.", "human", "0")],
     "left out: 2 ties, 1 both bad, 1 undone skipped, 1 duplicate; a human verdict replaced the judge's 2 time(s)"),
])
def test_pairs_from_a_ratings_database(tmp_path, rater, expected, left):
    db_path = tmp_path / "ratings.db"
    writer = make_db(db_path)  # still open, as while `rate` runs
    before = db_path.read_bytes()
    out = tmp_path / "pairs.jsonl"
    args = [] if rater == "human" else ["--rater", rater]
    result = run("data", "pairs", db_path, "-o", out, *args)
    assert result.exit_code == 0, result.output
    assert check_contract(out) == expected
    assert f"{out}: {len(expected)} pairs (from 11 judgements; {left}" in result.output
    assert db_path.read_bytes() == before  # opened read-only
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "pairs" in p.name) == ["pairs.jsonl"]  # no temporary file


def test_database_problems_are_one_line(tmp_path):
    out = tmp_path / "pairs.jsonl"
    cases = []
    make_db(tmp_path / "v0.db", version=0).close()
    cases.append((tmp_path / "v0.db", "not a ratings database this version reads (user_version 0, expected 1)"))
    make_db(tmp_path / "cols.db", rows=[], schema="CREATE TABLE judgements (id INTEGER PRIMARY KEY, rater TEXT);").close()
    cases.append((tmp_path / "cols.db", "its judgements table lacks created, prompt_key, prompt"))
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    other.close()
    cases.append((tmp_path / "other.db", "has no judgements table, so it is not a ratings database"))
    (tmp_path / "torn.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 80)
    cases.append((tmp_path / "torn.db", "cannot be read as a ratings database"))
    bad = [(12, "human", "0", "Hi!", "[{\"role\": \"user\"}]", "Yes.", "No.", "a", 0)]
    make_db(tmp_path / "msgs.db", rows=bad).close()
    cases.append((tmp_path / "msgs.db", 'judgement 12: messages: expected a list of {"role"'))
    for path, why in cases:
        result = run("data", "pairs", path, "-o", out)
        assert result.exit_code == 1, (path, result.output)
        assert result.output.startswith(f"error: {path}: ") and why in result.output, result.output
        assert result.output.count("\n") == 1 and not out.exists()
    make_db(tmp_path / "ties.db", rows=[JUDGEMENTS[2]]).close()
    result = run("data", "pairs", tmp_path / "ties.db", "-o", out)
    assert result.exit_code == 1 and "no pairs to write (from 1 judgements; left out: 1 tie" in result.output
    assert not out.exists()
    result = run("data", "pairs", tmp_path / "v0.db", "--prefer", "complete", "-o", out)
    assert result.exit_code == 1 and "is a ratings database; --prefer and --persona apply" in result.output


# ------------------------------------------------------------------------------------------- results.jsonl
@pytest.fixture(scope="module")
def real_eval(tmp_path_factory) -> Path:
    """A real eval of builtin:tiny (two prompts, two seeds, the card's system prompt): results.jsonl's shape."""
    folder = tmp_path_factory.mktemp("eval")
    prompts = folder / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hi Bluey!"}\n{"prompt": "Why is the sky blue?"}\n')
    result = run("eval", "--model", "builtin:tiny", "--prompts", prompts, "--seeds", "0,1", "--max-new-tokens", 6,
                 "--no-valid", "--persona-system", "-o", folder / "ev")
    assert result.exit_code == 0, result.output
    return folder / "ev"


PERSONA = load_persona(DEFAULT_PERSONA)


def row(prompt_id, prompt, text, stop_reason, model="a", seed=0) -> dict:
    """A results.jsonl row as `eval` writes it (the metrics measured the eval's way, with the shipped card)."""
    return {"model": model, "prompt_id": prompt_id, "prompt": prompt, "seed": seed, "text": text,
            "tokens": [1, 2], "generated_tokens": 2, "stop_reason": stop_reason, "decode_tps": 10.0,
            "metrics": reply_metrics(text, stop_reason, persona=PERSONA)}


P0, P1 = "What are you playing?", "Why is the sky blue?"
A = "Hooray! Let's play."                    # complete, 3 words, 3 markers
B = "Let's go to the park and then we"       # cut (max_new_tokens), 8 words, 1 marker
C = "As an AI, I cannot play games."         # complete, 7 words, breaks character
D = "Okay then, sure"                        # the model stopped mid-sentence: cut, 3 words, no marker
ROWS = [row(0, P0, A, "end_token", "a", 0), row(0, P0, B, "length", "a", 1), row(0, P0, C, "end_token", "b", 0),
        row(0, P0, D, "end_token", "b", 1), row(0, P0, "", "end_token", "c", 0), row(0, P0, A, "end_token", "c", 1),
        row(1, P1, "Because the sun", "length"), row(1, P1, "It is blue because the air", "end_token", seed=1),
        row(1, P1, "The sky is really blue\ufffd.", "end_token", "b")]  # complete, but undecodable: never chosen


def rule_pairs_of(texts, source):
    return [pair(P0, chosen, rejected, source, "0") for chosen, rejected in texts]


def test_the_rows_are_shaped_as_eval_writes_them(real_eval):
    real = [json.loads(line) for line in (real_eval / "results.jsonl").read_text().splitlines()]
    assert len(real) == 4
    for r in real:
        assert set(r) == set(ROWS[0]) and set(r["metrics"]) == set(ROWS[0]["metrics"])
    assert [ROWS[i]["metrics"][k] for i, k in ((0, "catchphrase_hits"), (0, "vocabulary_hits"), (2, "breaking_hits"),
                                               (3, "mid_sentence"), (1, "vocabulary_hits"))] == [1, 2, 2, True, 1]


def test_real_eval_folder_gives_contract_pairs_with_its_system_prompt(real_eval, tmp_path):
    folder = tmp_path / "ev"
    folder.mkdir()
    real = [json.loads(line) for line in (real_eval / "results.jsonl").read_text().splitlines()]
    real[0].update(text="Hooray, a game!", stop_reason="end_token")  # prompt 0, seed 0 now ends its sentence
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in real))
    (folder / "summary.json").write_bytes((real_eval / "summary.json").read_bytes())
    out = tmp_path / "pairs.jsonl"
    result = run("data", "pairs", folder, "--prefer", "complete", "-o", out)
    assert result.exit_code == 0, result.output
    system = json.loads((real_eval / "summary.json").read_text())["system"]
    assert system.startswith("You are Bluey")
    assert check_contract(out) == [pair([{"role": "system", "content": system}, {"role": "user", "content": "Hi Bluey!"}],
                                        "Hooray, a game!", real[1]["text"], "rule:complete", "0")]


@pytest.mark.parametrize("rules, cap, expected, left", [
    (["complete"], None, rule_pairs_of([(A, B), (C, D), (A, D), (C, B)], "rule:complete"),
     "0 over --max-per-prompt 8, 0 overruled by an earlier rule, 0 duplicates, 1 empty reply"),
    (["complete"], 2, rule_pairs_of([(A, B), (C, D)], "rule:complete"), "2 over --max-per-prompt 2"),
    (["longer-than", "5"], None, rule_pairs_of([(B, A), (C, D), (B, D), (C, A)], "rule:longer-than:5"), "0 over"),
    (["in-character"], None, rule_pairs_of([(A, C), (B, D), (B, C), (A, D), (D, C), (A, B)], "rule:in-character"),
     "0 over"),
    (["complete", "--prefer", "longer-than=5"], None,
     rule_pairs_of([(A, B), (C, D), (A, D), (C, B)], "rule:complete") +
     rule_pairs_of([(B, D), (C, A)], "rule:longer-than:5"), "1 overruled by an earlier rule, 1 duplicate"),
])
def test_rules_give_exact_pairs(tmp_path, rules, cap, expected, left):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "pairs.jsonl"
    args = ["data", "pairs", results, "--prefer", *rules, "-o", out] + (["--max-per-prompt", cap] if cap else [])
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert check_contract(out) == expected
    assert "from 9 replies to 2 prompts; left out: " in result.output and left in result.output, result.output
    assert "1 undecodable reply(s) (U+FFFD) never chosen; 1 prompt(s) gave no pair" in result.output
    first = out.read_bytes()
    assert run(*args, "--overwrite").exit_code == 0 and out.read_bytes() == first  # deterministic
    again = run(*args)
    assert again.exit_code == 1 and "already exists (pass --overwrite to replace it)" in again.output


def test_in_character_with_another_card(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("name: X\ndescription: a test card\nbreaking_phrases: [park]\nvocabulary: [sure]\n")
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "pairs.jsonl"
    result = run("data", "pairs", results, "--prefer", "in-character", "--persona", card, "--output", out)
    assert result.exit_code == 0, result.output
    assert check_contract(out) == rule_pairs_of([(D, B), (A, B), (D, A), (C, B), (D, C)], "rule:in-character")


def test_text_that_utf8_cannot_hold_is_kept_escaped(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [row(0, P0, "Hooray \ud800!", "end_token"), row(0, P0, "Oh no", "end_token", seed=1)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps escapes the lone surrogate
    out = tmp_path / "pairs.jsonl"
    result = run("data", "pairs", results, "--prefer", "complete", "-o", out)
    assert result.exit_code == 0, result.output
    assert '"chosen": "Hooray \\ud800!"' in out.read_text(encoding="ascii")
    assert [json.loads(line) for line in out.read_text().splitlines()] == \
        [pair(P0, "Hooray \ud800!", "Oh no", "rule:complete", "0")]


def test_parse_rule():
    assert [parse_rule(t) for t in ("complete", "in-character", "longer-than 40", "longer-than=7", "longer-than:1")] \
        == [Rule("complete"), Rule("in-character"), Rule("longer-than", 40), Rule("longer-than", 7),
            Rule("longer-than", 1)]
    for text, why in (("longer", "unknown rule"), ("longer-than 0", "word count >= 1"),
                      ("longer-than", "word count >= 1"), ("longer-than -3", "word count >= 1")):
        with pytest.raises(RuleError, match=why):
            parse_rule(text)



def test_judgements_of_another_tool_with_odd_created_times_still_pair(tmp_path):
    """`created` written by another tool (text beside a number) is not compared: the latest judgement is the highest id."""
    db_path = tmp_path / "other.db"
    conn = make_db(db_path, rows=[])
    conn.executemany("INSERT INTO judgements (id, created, rater, prompt_key, prompt, messages, model_a, reply_a, "
                     "model_b, reply_b, left_is, verdict) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                     [(1, "early", "human", "0", "Hi!", None, "a", "Hooray!", "b", "Hello.", "a", "b"),
                      (2, 5.0, "human", "0", "Hi!", None, "a", "Hooray!", "b", "Hello.", "a", "a"),
                      (3, "noon", "human", "1", "Play?", None, "a", "Yes!", "b", "No.", "a", "a")])
    conn.commit()
    out = tmp_path / "pairs.jsonl"
    result = run("data", "pairs", db_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert check_contract(out) == [pair("Hi!", "Hooray!", "Hello.", "human", "0"),
                                   pair("Play?", "Yes!", "No.", "human", "1")]


def test_a_deeply_nested_results_line_is_one_line(tmp_path):
    results, out = tmp_path / "results.jsonl", tmp_path / "pairs.jsonl"
    results.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b"[" * 200000 + b"\n")
    result = run("data", "pairs", results, "--prefer", "complete", "-o", out)
    assert result.exit_code == 1 and not out.exists()
    assert f"{results}:2: invalid JSON (nested too deep)" in result.output

# ------------------------------------------------------------------------------------------- bad input
def test_bad_results_are_path_line_reason(tmp_path):
    out = tmp_path / "pairs.jsonl"
    lines = [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "{not json", json.dumps({**ROWS[2], "stop_reason": "eos"})]
    results = tmp_path / "results.jsonl"
    results.write_text("\n".join(lines) + "\n")
    result = run("data", "pairs", results, "--prefer", "complete", "-o", out)
    assert result.exit_code == 1 and not out.exists()
    assert result.output.splitlines() == [
        f"error: {results}:3: invalid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        f"{results}:4: stop_reason: 'eos' is not one of end_token, stop_string, length"]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "empty").mkdir()
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({k: v for k, v in ROWS[0].items() if k != "metrics"}) + "\n")
    for args, why in (
            ([tmp_path / "missing.db"], f"error: {tmp_path / 'missing.db'}: no such file"),
            ([tmp_path / "empty"], f"error: {tmp_path / 'empty'}: holds no results.jsonl"),
            ([results], f"error: {results}: an eval's results need at least one --prefer rule"),
            ([results, "--prefer", "longest"], "error: --prefer 'longest': unknown rule; the rules are complete"),
            ([results, "--prefer", "complete", "--rater", "all"],
             f"error: {results}: is an eval's results, not a ratings database; --rater applies to a database"),
            ([bare, "--prefer", "in-character"], f"error: {bare}:1: metrics: no breaking_hits"),
            ([good, "--prefer", "complete", "-o", good, "--overwrite"], f"error: {good}: is the input"),
            ([good, "--prefer", "complete", "-o", tmp_path / "file.txt" / "pairs.jsonl"],
             f"error: {tmp_path / 'file.txt' / 'pairs.jsonl'}: could not be written")):
        (tmp_path / "file.txt").write_text("a file, not a folder")
        result = run("data", "pairs", *args, *([] if "-o" in args else ["-o", out]))
        assert result.exit_code == 1 and result.output.startswith(why), (args, result.output)
        assert result.output.count("\n") == 1 and not out.exists(), result.output


def test_the_command_line_shows_no_traceback(tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(ROWS[0]) + "\n\n{oops\n")
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", "data", "pairs", str(results), "--prefer",
                           "complete", "-o", str(tmp_path / "pairs.jsonl")], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {results}:3: invalid JSON") and proc.stderr.count("\n") == 1, proc.stderr
    assert os.listdir(tmp_path) == ["results.jsonl"]


def test_a_database_written_by_rate_gives_its_verdicts_as_pairs(tmp_path):
    """The two commands meet at the contract: judgements `rate`'s store records (either side shown on the
    left, one undone) come out of `data pairs` with the winner chosen, in a/b terms, not left/right."""
    from mlx_persona.rate import store

    conn = store.connect(tmp_path / "ratings.db")
    store.add_items(conn, [
        {"prompt_key": "0", "prompt": "Hi!", "messages": None, "model": "base", "reply": "Hello."},
        {"prompt_key": "0", "prompt": "Hi!", "messages": None, "model": "tuned", "reply": "Hooray!"},
        {"prompt_key": "1", "prompt": "Play?", "messages": None, "model": "base", "reply": "No."},
        {"prompt_key": "1", "prompt": "Play?", "messages": None, "model": "tuned", "reply": "Yes please!"},
    ])
    first, second = store.pairs(conn)
    store.record(conn, first, store.HUMAN, left_is="b", verdict="b")   # tuned (model_b) shown left, chosen
    store.record(conn, second, store.HUMAN, left_is="a", verdict="a")  # base chosen ...
    store.undo_last(conn)                                              # ... undone
    store.record(conn, second, store.HUMAN, left_is="a", verdict="b")  # then tuned
    out = tmp_path / "pairs.jsonl"
    result = run("data", "pairs", tmp_path / "ratings.db", "-o", out)
    assert result.exit_code == 0, result.output
    assert check_contract(out) == [pair("Hi!", "Hooray!", "Hello.", "human", "0"),
                                   pair("Play?", "Yes please!", "No.", "human", "1")]
    assert "1 undone skipped" in result.output
    conn.close()
