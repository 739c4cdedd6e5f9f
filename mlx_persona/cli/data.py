"""`data validate` and `data stats`: check training JSONL and show its length statistics."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, user_errors
from mlx_persona.cli.options import model_option


@click.group()
def data():
    """Validate training data and show its length statistics."""


@data.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-system", is_flag=True, help="Reject system turns (for templates without a system role).")
def data_validate(paths, no_system):
    """Check JSONL files, or data folders (train.jsonl [+ valid.jsonl], as `train` reads them), line by
    line; print every problem as file:line: reason."""
    from pathlib import Path

    from mlx_persona.data import DataError, load_jsonl, load_splits

    bad = False
    for path in paths:
        try:
            if Path(path).is_dir():
                train, valid = load_splits(path, system_ok=not no_system)
                click.echo(f"{path}: ok, {len(train)} training + {len(valid)} validation examples")
            else:
                examples = load_jsonl(path, system_ok=not no_system)
                click.echo(f"{path}: ok, {len(examples)} examples")
        except DataError as e:
            bad = True
            click.echo(str(e), err=True)
    if bad:
        raise SystemExit(1)


@data.command("stats")
@click.argument("path", type=click.Path())
@model_option(default=None, help="Also count tokens with this model's tokenizer.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def data_stats(path, model, as_json):
    """Examples, turns, and the length distribution of assistant replies."""
    import json as _json

    from mlx_persona.data import compute_stats, format_stats, load_jsonl, load_splits
    from mlx_persona.paths import data_path

    try:
        if data_path(path).is_dir():
            train, valid = load_splits(path)
            examples = train + valid
        else:
            examples = load_jsonl(path)
        tokenizer = None
        if model:
            from mlx_persona.models import load_model

            _, tokenizer = load_model(model)
        stats = compute_stats(examples, tokenizer)
    except user_errors() as e:
        fail(str(e))
    click.echo(_json.dumps(stats, indent=2) if as_json else format_stats(stats))
