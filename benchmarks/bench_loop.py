"""The persona loop, end to end on the built-in tiny model: a length habit learned, seen, and trained away.

The original experiment's model stopped after 52-76 words because every training reply had that length.
This script makes that failure on purpose and then fixes it with the tools of the loop:

1. **Data with one length band.** Every assistant reply of the shipped Bluey data (data/bluey, train and
   valid) is cut to 12-20 words (:func:`short_reply`): the longest run of whole sentences from its start
   that fits in 20 words; when those hold fewer than 12 words, the words up to the 20th are cut after the
   last comma, semicolon or dash past the 12th word (else at the 20th word, dropping trailing small words
   such as "and", "the", "to"), and end with a full stop. So every reply still ends its sentence (the
   model is not taught to stop mid-sentence) and only its *length* is uniform.
2. **SFT** (``configs/loop-sft.yaml``: builtin:tiny, every weight) on that data.
3. **Eval** (``mlx-persona sweep``) at ``max_new_tokens`` 120 (about 85 words of this tokenizer: room for
   long replies, and for seeing whether they still end by themselves), with two settings:
   ``min_new_tokens=0`` (what the model does on its own: it ends early) and ``min_new_tokens=64`` (its end
   token held back for 64 tokens, about 45 words, so that every prompt also gets long replies to prefer).
4. **Rule pairs**: ``mlx-persona data pairs EVAL --prefer longer-than 40 --prefer complete``: a reply of 40
   words or more over one the model ended itself before 40 words, then a complete reply over a cut one.
5. **DPO** (``configs/loop-dpo.yaml``, ``--from`` the SFT run) on those pairs (``--also-try`` adds runs
   with other settings from the same SFT run and pairs).
6. **Eval again**, the same sweep.

Reported, at ``min_new_tokens=0`` before and after DPO: the *early-end rate* (replies the model ended
itself, its end token, before 40 words; the eval's ``early end`` with ``--early-tokens 53``), the mean
reply length in words, and the share that hit ``max_new_tokens``. Every step is the real command
(``python -m mlx_persona ...``) in a private temporary folder; the steps' wall times are printed but this
is a demonstration, not a speed benchmark.

    python benchmarks/bench_loop.py                           # the whole loop, seeds 0,1,2, 40 prompts
    python benchmarks/bench_loop.py --skip-dpo                # data, SFT and the first eval only
    python benchmarks/bench_loop.py --dpo-set preference.beta=0.5 --dpo-set steps=60
    python benchmarks/bench_loop.py --also-try optim.learning_rate=5e-4 --also-try preference.beta=0.5,epochs=2
    python benchmarks/bench_loop.py --write-data runs/loop/data   # only the short-reply data (for the configs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine_info, write_results

SOURCE = REPO / "data" / "bluey"
SFT_CONFIG = REPO / "configs" / "loop-sft.yaml"
DPO_CONFIG = REPO / "configs" / "loop-dpo.yaml"
LOW, HIGH = 12, 20  # the band every training reply is cut into (words)
EARLY_WORDS = 40  # an early end: the model's own end before this many words
_TERMINAL = set(".!?…")
_CLOSERS = "\"'”’)"
_CLAUSE_END = ",;:—–-"
_SMALL = {"a", "an", "the", "and", "or", "but", "so", "to", "of", "for", "by", "in", "on", "at", "with", "like",
          "where", "when", "that", "which", "who", "my", "your", "her", "his", "their", "our", "can't", "is",
          "are", "was", "were", "be", "into", "from", "up", "about", "as", "if", "because", "then", "some"}


# ------------------------------------------------------------------------------------------ data
def short_reply(text: str, low: int = LOW, high: int = HIGH) -> str:
    """`text` cut to `low`-`high` words, ending its sentence (see the module docstring)."""
    words = text.split()
    if len(words) <= high:
        return " ".join(words)
    ends = [i + 1 for i, w in enumerate(words[:high]) if w.rstrip(_CLOSERS)[-1:] in _TERMINAL]
    if ends and ends[-1] >= low:
        return " ".join(words[:ends[-1]])
    words = words[:high]
    for i in range(len(words) - 1, low - 2, -1):
        if words[i][-1] in _CLAUSE_END:
            return " ".join(words[:i] + [words[i].rstrip(_CLAUSE_END)]) + "."
    while len(words) > low and words[-1].lower().strip(_CLAUSE_END) in _SMALL:
        words.pop()
    return " ".join(words).rstrip(_CLAUSE_END) + "."


def write_short_data(dst: Path, src: Path = SOURCE) -> dict:
    """``dst/train.jsonl`` and ``dst/valid.jsonl``: `src`'s conversations with every assistant reply cut
    by :func:`short_reply`; returns the reply-length band measured on what was written."""
    dst.mkdir(parents=True, exist_ok=True)
    lengths = []
    for split in ("train", "valid"):
        lines = []
        for line in (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            for m in obj["messages"]:
                if m["role"] == "assistant":
                    m["content"] = short_reply(m["content"])
                    lengths.append(len(m["content"].split()))
            lines.append(json.dumps(obj, ensure_ascii=False))
        tmp = dst / f".{split}.jsonl.part"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(dst / f"{split}.jsonl")
    return {"replies": len(lengths), "min_words": min(lengths), "max_words": max(lengths),
            "mean_words": round(sum(lengths) / len(lengths), 1)}


# ------------------------------------------------------------------------------------------ steps
def cli(args: list[str], log: Path) -> float:
    """Runs ``python -m mlx_persona ARGS`` (this checkout's code), its output to `log`; returns seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "mlx_persona", *args], check=False, stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=log.parent)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"bench_loop: `mlx-persona {' '.join(args)}` failed ({proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - t


def sweep(model: Path, name: str, data: Path, out: Path, a) -> float:
    return cli(["sweep", "--model", f"{name}={model}", "--preset", "persona", "--max-new-tokens", str(a.max_new_tokens),
                "--grid", f"min_new_tokens=0,{a.force_tokens}", "--seeds", a.seeds, "--limit", str(a.limit),
                "--train-data", str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"),
                "--early-tokens", "53", "-o", str(out)], out.parent / f"{out.name}.log")


def measure(results: Path) -> dict:
    """Per grid setting: replies, early-end rate (< 40 words, own end), mean words, hit max_new_tokens,
    ends mid-sentence and repeated 3-grams (the eval's definitions)."""
    from mlx_persona.eval.metrics import word_count

    by = {}
    for line in results.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        by.setdefault(r["setting"], []).append(r)
    out = {}
    for setting, rows in by.items():
        words = [word_count(r["text"]) for r in rows]
        early = [r["stop_reason"] == "end_token" and w < EARLY_WORDS for r, w in zip(rows, words)]
        out[setting] = {"replies": len(rows), "early_end": sum(early) / len(rows),
                        "mean_words": sum(words) / len(rows), "min_words": min(words), "max_words": max(words),
                        "hit_max_new_tokens": sum(r["stop_reason"] == "length" for r in rows) / len(rows),
                        "mid_sentence": sum(r["metrics"]["mid_sentence"] for r in rows) / len(rows),
                        "rep3": sum(r["metrics"]["rep_3"] for r in rows) / len(rows)}
    return out


def pair_count(path: Path) -> dict:
    sources = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        s = json.loads(line).get("source", "")
        sources[s] = sources.get(s, 0) + 1
    return sources


def run_loop(a, tmp: Path) -> dict:
    res = {"data": write_short_data(tmp / "data"), "seconds": {}}
    print(f"loop: short-reply data {res['data']}", file=sys.stderr)
    sft = tmp / "sft"
    res["seconds"]["sft"] = cli(["train", "--config", str(SFT_CONFIG), "--data", str(tmp / "data"),
                                 "--adapter-path", str(sft), "--no-progress", *_sets(a.sft_set)], tmp / "sft.log")
    res["sft_summary"] = _summary(sft)
    res["seconds"]["eval_before"] = sweep(sft, "sft", tmp / "data", tmp / "eval-sft", a)
    res["before"] = measure(tmp / "eval-sft" / "results.jsonl")
    print(f"loop: before DPO {res['before']}", file=sys.stderr)
    if a.skip_dpo:
        return res
    pairs = tmp / "pairs.jsonl"
    rules = [x for rule in a.prefer for x in ("--prefer", rule)]
    res["seconds"]["pairs"] = cli(["data", "pairs", str(tmp / "eval-sft"), *rules, "-o", str(pairs)],
                                  tmp / "pairs.log")
    res["pairs"] = pair_count(pairs)
    res["tried"] = []
    for i, sets in enumerate([a.dpo_set] + [t.split(",") for t in a.also_try]):
        dpo, seconds = tmp / f"dpo-{i}", {}
        seconds["dpo"] = cli(["train", "--config", str(DPO_CONFIG), "--data", str(pairs), "--from", str(sft),
                              "--adapter-path", str(dpo), "--no-progress", *_sets(sets)], tmp / f"dpo-{i}.log")
        seconds["eval_after"] = sweep(dpo, "dpo", tmp / "data", tmp / f"eval-dpo-{i}", a)
        tried = {"set": sets, "dpo_summary": _summary(dpo), "after": measure(tmp / f"eval-dpo-{i}" / "results.jsonl"),
                 "seconds": seconds}
        print(f"loop: DPO {sets or 'as configured'}: {tried['after']}", file=sys.stderr)
        res["tried"].append(tried)
    res["after"], res["dpo_summary"] = res["tried"][0]["after"], res["tried"][0]["dpo_summary"]
    res["seconds"].update(res["tried"][0]["seconds"])
    return res


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _summary(run: Path) -> dict:
    """Steps, training seconds and the last metrics row's loss (and DPO's reward accuracy and margin)."""
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    out = {"steps": s["steps"], "train_sec": round(s["train_time_sec"], 1), "last_loss": round(last["loss"], 4)}
    out.update({k: round(last[k], 3) for k in ("reward_accuracy", "reward_margin") if k in last})
    return out


# ------------------------------------------------------------------------------------------ report
def _row(name: str, setting: str, m: dict) -> str:
    return (f"| {name} | {setting} | {m['replies']} | **{100 * m['early_end']:.0f}%** | "
            f"{m['mean_words']:.1f} ({m['min_words']}-{m['max_words']}) | {100 * m['hit_max_new_tokens']:.0f}% | "
            f"{100 * m['mid_sentence']:.0f}% | {100 * m['rep3']:.1f}% |")


def markdown(res: dict, a) -> str:
    own, forced = "min_new_tokens=0", f"min_new_tokens={a.force_tokens}"
    d = res["data"]
    title = (f"### The loop on builtin:tiny: SFT on {d['min_words']}-{d['max_words']}-word replies, then DPO on "
             f"rule pairs (`--prefer {' --prefer '.join(a.prefer)}`)")
    head = ("| model | setting | replies | early end (< 40 words, own end) | mean words (min-max) | "
            "hit max_new_tokens | ends mid-sentence | repeated 3-grams |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [title, "", head, rule]
    for name, key in (("SFT", "before"), ("SFT + DPO", "after")):
        lines += [_row(name, setting, res[key][setting]) for setting in (own, forced) if setting in res.get(key, {})]
    lines += ["", (f"Training data: {d['replies']} assistant replies, {d['min_words']}-{d['max_words']} words "
                   f"(mean {d['mean_words']}). Eval: `mlx-persona sweep`, {a.limit or 40} prompts x seeds {a.seeds}, "
                   f"persona preset, max_new_tokens {a.max_new_tokens}. SFT ({SFT_CONFIG.name}): {res['sft_summary']}.")]
    if "pairs" in res:
        lines.append(f"Pairs: {res['pairs']}. DPO ({DPO_CONFIG.name}, overrides: {a.dpo_set or 'none'}): "
                     f"{res['dpo_summary']}.")
    if len(res.get("tried", [])) > 1:
        note = f"Other DPO settings, from the same SFT run and pairs (the model's own length, {own}):"
        lines += ["", note, "", head.replace("| model |", "| DPO overrides |"), rule]
        lines += [_row(", ".join(t["set"]) or "as configured", own, t["after"][own]) for t in res["tried"]]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    lines += ["", f"Wall time per step (2 shared cores; a demonstration, not a speed benchmark): {secs}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--limit", type=int, default=0, help="first N eval prompts (0 = all 40)")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--force-tokens", type=int, default=64, help="min_new_tokens of the eval's second setting")
    p.add_argument("--prefer", action="append", help="pair rules, in order [default: longer-than 40, complete]")
    p.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE", help="override loop-sft.yaml")
    p.add_argument("--dpo-set", action="append", default=[], metavar="KEY=VALUE", help="override loop-dpo.yaml")
    p.add_argument("--also-try", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="another DPO run from the same SFT run and pairs, with these overrides (repeatable)")
    p.add_argument("--skip-dpo", action="store_true", help="data, SFT and the first eval only")
    p.add_argument("--keep", metavar="DIR", help="copy the working folder (runs, evals, pairs, logs) here")
    p.add_argument("--write-data", metavar="DIR", help="only write the short-reply data to DIR and exit")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    a.prefer = a.prefer or [f"longer-than {EARLY_WORDS}", "complete"]
    if a.write_data:
        print(json.dumps(write_short_data(Path(a.write_data))))
        return None
    command = "python benchmarks/bench_loop.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"benchmark": "the loop: SFT on one length band, rule pairs, DPO", "command": command.strip(),
              "machine": machine_info()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_loop."))  # private (0700)
    try:
        result.update(run_loop(a, tmp))
    finally:
        if a.keep:
            shutil.copytree(tmp, a.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(Path(a.out), "bench_loop", result, markdown(result, a), append=not a.no_results)
    return result


if __name__ == "__main__":
    main()
