"""`data validate`, `data stats` and `data pairs`: check training JSONL, show its length statistics, and make
preference pairs from ratings or from rules over an eval's replies."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, user_errors
from mlx_persona.cli.options import model_option, output_option


@click.group()
def data():
    """Validate training data, show its length statistics, make preference pairs."""


def _examples(path, system_ok: bool = True, pairs_ok: bool = False):
    """``(training, validation)`` examples of a data folder (as `train` reads one), or ``(examples, None)``
    of one JSONL file; with `pairs_ok`, preference pairs where the (training) file's first line is one."""
    from mlx_persona.data import load_jsonl, load_splits
    from mlx_persona.data.pairs import is_pairs_file, load_pair_splits, load_pairs
    from mlx_persona.paths import data_path

    folder = data_path(path).is_dir()
    if pairs_ok and is_pairs_file(data_path(path) / "train.jsonl" if folder else path):
        return load_pair_splits(path, system_ok=system_ok) if folder else (load_pairs(path, system_ok=system_ok), None)
    if folder:
        return load_splits(path, system_ok=system_ok)
    return load_jsonl(path, system_ok=system_ok), None


@data.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-system", is_flag=True, help="Reject system turns (for templates without a system role).")
def data_validate(paths, no_system):
    """Check JSONL files, or data folders (train.jsonl [+ valid.jsonl], as `train` reads them), line by
    line; print every problem as file:line: reason. A file whose first line has 'chosen' or 'rejected' is
    checked as preference pairs (for method dpo/orpo)."""
    from mlx_persona.data import DataError

    bad = False
    for path in paths:
        try:
            train, valid = _examples(path, system_ok=not no_system, pairs_ok=True)
        except DataError as e:
            bad = True
            click.echo(str(e), err=True)
            continue
        what = "preference pairs" if train and hasattr(train[0], "chosen") else "examples"
        counts = f"{len(train)} {what}" if valid is None else \
            f"{len(train)} training + {len(valid)} validation {what}"
        click.echo(f"{path}: ok, {counts}")
    if bad:
        raise SystemExit(1)


@data.command("stats")
@click.argument("path", type=click.Path())
@model_option(default=None, help="Also count tokens with this model's tokenizer.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def data_stats(path, model, as_json):
    """Examples, turns, and the length distribution of assistant replies."""
    import json as _json

    from mlx_persona.data import compute_stats, format_stats

    try:
        train, valid = _examples(path)
        tokenizer = None
        if model:
            from mlx_persona.models import load_model

            _, tokenizer = load_model(model)
        stats = compute_stats(train + (valid or []), tokenizer)
    except user_errors() as e:
        fail(str(e))
    click.echo(_json.dumps(stats, indent=2) if as_json else format_stats(stats))


class _PairsCommand(click.Command):
    """`data pairs`, taking ``--prefer longer-than N`` as the issue writes it (two words) as well as one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        joined, i = [], 0
        while i < len(args):
            token = args[i]
            if token == "--":
                joined += args[i:]
                break
            value_next = token == "--prefer" and i + 2 < len(args) and args[i + 1] == "longer-than"
            if (value_next and args[i + 2].isdigit()) or \
                    (token == "--prefer=longer-than" and i + 1 < len(args) and args[i + 1].isdigit()):
                joined += ["--prefer", f"longer-than {args[i + 2] if value_next else args[i + 1]}"]
                i += 3 if value_next else 2
                continue
            joined.append(token)
            i += 1
        return super().parse_args(ctx, joined)


_LEFT_OUT = {  # count -> (one, many), as the summary line says them
    "ties": ("tie", "ties"), "both_bad": ("both bad", "both bad"), "undone": ("undone skipped", "undone skipped"),
    "duplicates": ("duplicate", "duplicates"), "same_reply": ("with the same reply on both sides",) * 2,
    "empty": ("with an empty reply",) * 2, "capped": ("over --max-per-prompt {cap}",) * 2,
    "overruled": ("overruled by an earlier rule",) * 2, "empty_replies": ("empty reply", "empty replies"),
}


def _counted(counts, keys, always: int, **names) -> str:
    """``"2 ties, 1 both bad"``: the counts of `keys`; the first `always` even when zero, the rest when not."""
    words = []
    for i, key in enumerate(keys):
        n = counts.get(key, 0)
        if n or i < always:
            words.append(f"{n} {_LEFT_OUT[key][n != 1].format(**names)}")
    return ", ".join(words)


def _judgement_summary(counts, rater) -> str:
    left = _counted(counts, ("ties", "both_bad", "undone", "duplicates", "same_reply", "empty"), 4)
    text = f"from {counts['judgements']} judgements; left out: {left}"
    if counts.get("overruled"):
        text += f"; a human verdict replaced the judge's {counts['overruled']} time(s) (human wins)"
    if counts.get("other_raters"):
        text += f"; {counts['other_raters']} judgement(s) by other raters not used (--rater {rater}; --rater all " \
                "uses human and judge verdicts)"
    return text


def _rule_summary(counts, rules, replies, cap) -> str:
    per_rule = ", ".join(f"{r.source} {counts.get(r.source, 0)}" for r in rules)
    left = _counted(counts, ("capped", "overruled", "duplicates", "empty_replies"), 3, cap=cap)
    text = f"{per_rule}; from {len(replies)} replies to {counts['prompts']} prompts; left out: {left}"
    if counts.get("undecodable"):
        text += f"; {counts['undecodable']} undecodable reply(s) (U+FFFD) never chosen"
    if counts.get("no_pair"):
        text += f"; {counts['no_pair']} prompt(s) gave no pair"
    return text


@data.command("pairs", cls=_PairsCommand)
@click.argument("source", metavar="INPUT", type=click.Path())
@output_option(required=True, help="The pairs file to write (JSONL).")
@click.option("--rater", type=click.Choice(["human", "judge", "all"]), default="human", show_default=True,
              help="Whose judgements of a ratings database to use; with all, a human verdict replaces a judge's.")
@click.option("--prefer", "rules", multiple=True, metavar="RULE",
              help="A rule over an eval's results: complete | longer-than N | in-character. Repeatable; "
                   "applied in order (an earlier rule wins a disagreement).")
@click.option("--max-per-prompt", type=click.IntRange(min=0), default=8, show_default=True,
              help="At most this many pairs per prompt from each rule (0 = no cap).")
@click.option("--persona", "persona_card", type=click.Path(),
              help="Count in-character's breaking phrases and markers with this card [default: the eval's counts].")
@click.option("--overwrite", is_flag=True, help="Replace the pairs file if it exists.")
def data_pairs(source, output, rater, rules, max_per_prompt, persona_card, overwrite):
    """Preference pairs (prompt, chosen, rejected) from a ratings database of `rate`, or from rules over an
    eval's results.jsonl (or its folder). See docs/data.md, "Preference pairs"."""
    from mlx_persona.cli.options import from_command_line
    from mlx_persona.data import pair_rules, pair_sources

    try:
        kind, path = pair_sources.input_kind(source)
        if kind == "db":
            if rules or persona_card:
                fail(f"{source}: is a ratings database; --prefer and --persona apply to an eval's results.jsonl")
            pairs, counts = pair_sources.judgement_pairs(path, rater)
            pairs = pair_sources.dedupe(pairs, counts)
            detail = _judgement_summary(counts, rater)
        else:
            if from_command_line("rater"):
                fail(f"{source}: is an eval's results, not a ratings database; --rater applies to a database")
            if not rules:
                fail(f"{source}: an eval's results need at least one --prefer rule "
                     f"({', '.join(pair_rules.RULES)})")
            parsed = [pair_rules.parse_rule(r) for r in rules]
            persona = None
            if persona_card:
                from mlx_persona.eval.persona import load_persona

                persona = load_persona(persona_card)
            markers = any(r.name == "in-character" for r in parsed)
            replies, system = pair_sources.read_results(path, persona=persona, markers=markers)
            messages = (lambda p: [{"role": "system", "content": system}, {"role": "user", "content": p}]) \
                if system else None
            pairs, counts = pair_rules.rule_pairs(replies, parsed, max_per_prompt, messages)
            pairs = pair_sources.dedupe(pairs, counts)
            detail = _rule_summary(counts, parsed, replies, max_per_prompt)
        if not pairs:
            fail(f"{source}: no pairs to write ({detail}); nothing written")
        out = pair_sources.write_pairs(output, pairs, overwrite=overwrite, source=path)
    except (*user_errors(), pair_rules.RuleError) as e:
        fail(str(e))
    click.echo(f"{out}: {len(pairs)} pairs ({detail})")
