"""A model as a rater: any OpenAI-compatible endpoint (Ollama, LM Studio, ``mlx_lm.server``,
``mlx-persona serve``) judges every pair it has not judged, stored as rater ``judge:NAME``.

The judge gets a rubric (system message: :func:`default_rubric` of the persona card, or a file's text)
and the prompt with the two replies as "Reply A" and "Reply B" -- which of the pair is A is drawn per
pair from the seed (:func:`mlx_persona.rate.schedule.left_is`, recorded as ``left_is``), against position
bias -- and must answer in a fixed format: ``A``, ``B``, ``TIE`` or ``BOTH BAD`` (:func:`parse_verdict`).
Greedy (temperature 0), at most a few tokens. An answer that is none of these is *unparsable*, a request
that fails (connection, HTTP error, timeout, no choices) *failed*: both are counted and written to
``judge_log`` with the answer or the error, never stored as a verdict, and the next pair goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mlx_persona.rate import schedule, store

ANSWER_TOKENS = 8
_VERDICT = re.compile(r"^(?:verdict\s*[:=-]?\s*)?(a|b|tie|both[ _-]?bad)$")


@dataclass
class JudgeCounts:
    stored: int = 0
    unparsable: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the log


def default_rubric(persona) -> str:
    """The rubric the judge reads, written from a persona card."""
    lines = [f"You judge replies written in the voice of {persona.name}.",
             f"Who {persona.name} is: {persona.description.strip()}"]
    if persona.catchphrases:
        lines.append(f"Phrases {persona.name} says: {', '.join(persona.catchphrases)}.")
    if persona.vocabulary:
        lines.append(f"Words of {persona.name}'s voice: {', '.join(persona.vocabulary)}.")
    if persona.breaking_phrases:
        lines.append(f"Phrases that break character (a reply using them is worse): "
                     f"{', '.join(persona.breaking_phrases)}.")
    lines += ["",
              ("You are given a prompt and two replies, A and B. The better reply sounds like "
               f"{persona.name} throughout, answers the prompt, and ends with a finished sentence; a reply "
               "that stops mid-sentence, rambles, repeats itself or breaks character is worse. Length alone "
               "and the order of the replies do not matter."),
              ("Answer with exactly one of: A, B, TIE (equally good), BOTH BAD (neither sounds like "
               f"{persona.name} or answers). Write nothing else.")]
    return "\n".join(lines)


def parse_verdict(text: str | None) -> str | None:
    """``'a'``, ``'b'``, ``'tie'`` or ``'both_bad'`` from the judge's answer; None when it is none of them.

    Case, surrounding white space, quotes, markdown emphasis, a final full stop and a leading
    ``Verdict:`` are allowed; anything more (``A or B``, a sentence) is not."""
    if not isinstance(text, str):
        return None
    t = text.strip().strip("*_`\"'").strip().rstrip(".").strip().lower()
    m = _VERDICT.match(t)
    if not m:
        return None
    v = m.group(1)
    return "both_bad" if v.startswith("both") else v


def judge_messages(rubric: str, pair: store.Pair, first: str) -> list[dict]:
    """The chat the judge gets: `first` (``'a'``/``'b'``) is the pair's reply shown as "Reply A"."""
    a, b = (pair.reply_a, pair.reply_b) if first == "a" else (pair.reply_b, pair.reply_a)
    user = (f"Prompt:\n{pair.prompt}\n\nReply A:\n{a}\n\nReply B:\n{b}\n\n"
            "Which reply is better? Answer A, B, TIE or BOTH BAD.")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def _ask(client, model: str, messages: list[dict]) -> str:
    """The judge's answer text; raises on any failure (the caller counts it)."""
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=ANSWER_TOKENS)
    if not reply.choices or reply.choices[0].message is None:
        raise ValueError("the answer has no choices")
    return reply.choices[0].message.content or ""


def run_judge(conn, url: str, model: str, rubric: str, *, seed: int = 0, api_key: str | None = None,
              timeout: float = 60.0, log=print) -> JudgeCounts:
    """Judges every pair `model` at `url` has not judged yet (module docstring); the counts."""
    import openai

    rater = f"judge:{model}"
    client = openai.OpenAI(base_url=url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)
    done = set(store.judged(conn, rater))
    todo = [p for p in store.pairs(conn) if p.key not in done]
    counts = JudgeCounts()
    log(f"{rater}: {len(todo)} pairs to judge ({len(done)} judged already)")
    for k, pair in enumerate(todo, 1):
        first = schedule.left_is(seed, pair, "judge")
        try:
            answer = _ask(client, model, judge_messages(rubric, pair, first))
        except Exception as e:  # noqa: BLE001 - any failure of the endpoint is counted, never a crash
            counts.failed += 1
            error = f"{type(e).__name__}: {str(e)[:300]}"
            counts.errors.append(error)
            store.log_judge(conn, rater, pair, "failed", None, error)
            continue
        verdict = parse_verdict(answer)
        if verdict is None:
            counts.unparsable += 1
            store.log_judge(conn, rater, pair, "unparsable", answer[:2000], None)
            continue
        # Reply A is the pair's `first`: the verdict in a/b terms of the pair.
        if verdict in ("a", "b") and first == "b":
            verdict = "b" if verdict == "a" else "a"
        store.record(conn, pair, rater, first, verdict)
        store.log_judge(conn, rater, pair, "stored", answer[:2000], None)
        counts.stored += 1
        if k % 10 == 0:
            log(f"{rater}: {k}/{len(todo)} pairs")
    return counts
