"""`data validate` and `data stats`: check training JSONL and show its length statistics."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, user_errors
from mlx_persona.cli.options import model_option


@click.group()
def data():
    """Validate training data and show its length statistics."""


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
