"""`eval` (a persona report), `sweep` (generation settings grid) and `compare` (a recipe of variants)."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors
from mlx_persona.cli.generate import generation_options, make_generation_config
from mlx_persona.cli.options import output_option


def _eval_errors():
    from mlx_persona.eval.options import EvalError
    from mlx_persona.eval.persona import PersonaError

    return user_errors() + (EvalError, PersonaError)


def _command_line(name):
    """The command as typed, for the report (None when not run from a shell, e.g. in tests)."""
    import shlex
    import sys

    args = sys.argv[1:]
    return shlex.join(["mlx-persona", *args]) if args[:1] == [name] else None


def _parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2")
    if not seeds or any(s < 0 for s in seeds):
        fail(f"--seeds {text!r}: expected comma-separated integers >= 0, e.g. --seeds 0,1,2")
    return seeds


batch_size_option = click.option(
    "--batch-size", type=click.IntRange(min=0), default=0, show_default=True,
    help="Replies decoded together (each one as it would be alone); 0 = as many as a quarter of the free "
         "memory holds, at most 16.")


def eval_options(f):
    """Options shared by `eval` and `sweep`: models, prompt set, persona card, data, seeds, output."""
    options = [
        click.option("-m", "--model", "models", multiple=True, required=True, metavar="[NAME=]SPEC[@ADAPTER]",
                     help="A model to evaluate (repeatable): a folder, hub id or builtin:NAME, optionally named "
                          "and with an adapter folder from `train`, e.g. base=google/gemma-3-1b-it, "
                          "ft=google/gemma-3-1b-it@runs/bluey-1b-it. A LoRA output folder alone means its "
                          "recorded base + itself."),
        click.option("--prompts", type=click.Path(), help='JSONL of {"prompt": ...} lines '
                     "[default: data/bluey/eval_prompts.jsonl]."),
        click.option("--limit", type=int, default=0, show_default=True, help="Only the first N prompts (0 = all)."),
        click.option("--seeds", help="Comma-separated sampling seeds, one reply per prompt and seed [default: 0,1,2]."),
        click.option("--persona", "persona_card", type=click.Path(), help="Persona card for the marker counts "
                     "[default: data/bluey/persona.yaml]."),
        click.option("--persona-system", is_flag=True, help="Send the card's system_prompt (off by default: the "
                     "training data has no system turn)."),
        click.option("--train-data", type=click.Path(), help="Training JSONL whose assistant replies are the style "
                     "reference [default: data/bluey/train.jsonl]."),
        click.option("--valid", type=click.Path(), help="Validation JSONL for the loss and the reference row "
                     "[default: data/bluey/valid.jsonl]."),
        click.option("--no-valid", is_flag=True, help="Skip the validation loss and the reference row."),
        click.option("--early-tokens", type=int, default=50, show_default=True,
                     help="An end token before 0.75 x this many words counts as an early end."),
        output_option("--out", dest="out", required=True, help="Report folder to write."),
        click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system, train_data, valid, no_valid,
                   early_tokens, batch_size=0):
    from mlx_persona.eval.entries import check_names, parse_model_arg
    from mlx_persona.eval.options import EvalOptions

    if seeds is not None and seed is not None:
        fail("give --seeds (several) or --seed (one), not both")
    options = EvalOptions(limit=limit, persona_system=persona_system, early_tokens=early_tokens,
                          batch_size=batch_size)
    if seeds is not None:
        options.seeds = _parse_seeds(seeds)
    elif seed is not None:
        options.seeds = [seed]
    for key, value in (("prompts", prompts), ("persona", persona_card), ("train", train_data), ("valid", valid)):
        if value:
            setattr(options, key, value)
    if no_valid:
        options.valid = None
    entries = [parse_model_arg(m) for m in models]
    check_names(entries)
    return entries, options.validate()


@click.command("eval")
@eval_options
@batch_size_option
@click.option("--ratings", type=click.Path(dir_okay=False), metavar="DB",
              help="Show the summary of an `mlx-persona rate` database in the report.")
@generation_options
def eval_cmd(models, prompts, limit, seeds, persona_card, persona_system, train_data, valid, no_valid, early_tokens,
             out, overwrite, batch_size, ratings, preset, seed, **settings):
    """Run a prompt set through one or more models and write a persona report (md, html, jsonl, plots)."""
    from mlx_persona.eval.evaluate import evaluate

    config = make_generation_config(preset, **settings)
    try:
        entries, options = _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system,
                                          train_data, valid, no_valid, early_tokens, batch_size)
        options.ratings = ratings
        evaluate(entries, config, options, out, overwrite=overwrite, command=_command_line("eval"),
                 log=log_to_stderr)
    except _eval_errors() as e:
        fail(str(e))
    click.echo(f"wrote {out}/report.html")


@click.command()
@eval_options
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Generation setting values to try (repeatable; every combination runs), e.g. "
                   "--grid min_new_tokens=0,50 --grid temperature=0.8. Keys: min_new_tokens, max_new_tokens, "
                   "temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size.")
@batch_size_option
@generation_options
def sweep(models, prompts, limit, seeds, persona_card, persona_system, train_data, valid, no_valid, early_tokens,
          out, overwrite, grid, batch_size, preset, seed, **settings):
    """Reply length, truncation and persona metrics for every combination of generation settings."""
    from pathlib import Path

    from mlx_persona.eval.sweep import parse_grid
    from mlx_persona.eval.sweep import sweep as run

    config = make_generation_config(preset, **settings)
    try:
        entries, options = _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system,
                                          train_data, valid, no_valid, early_tokens, batch_size)
        rows = run(entries, config, parse_grid(grid), options, out, overwrite=overwrite,
                   command=_command_line("sweep"), log=log_to_stderr)
    except _eval_errors() as e:
        fail(str(e))
    table = [line for line in (Path(out) / "sweep.md").read_text().splitlines() if line.startswith("|")]
    click.echo("\n".join(table))
    click.echo(f"wrote {out}/sweep.md, sweep.csv, sweep.png ({len(rows)} rows)")


@click.command()
@click.argument("recipe", type=click.Path())
@output_option("--out", dest="out", help="Report folder (default: the recipe's output).")
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
@click.option("--retrain", is_flag=True, help="Train every `train` variant again, even if its run is finished.")
@click.option("--limit", type=int, help="Only the first N prompts (overrides the recipe).")
@click.option("--seeds", help="Comma-separated seeds (overrides the recipe).")
@click.option("--batch-size", type=click.IntRange(min=0), help="Replies decoded together; 0 = from memory "
              "(overrides the recipe's eval.batch_size, default 0).")
def compare(recipe, out, overwrite, retrain, limit, seeds, batch_size):
    """Train (or reuse) and evaluate the variants of a recipe (configs/compare-*.yaml) in one report."""
    from mlx_persona.eval.compare import compare as run
    from mlx_persona.tuner.trainer import TrainingError

    try:
        result = run(recipe, out=out, overwrite=overwrite, retrain=retrain, limit=limit,
                     seeds=_parse_seeds(seeds) if seeds else None, batch_size=batch_size,
                     command=_command_line("compare"),
                     log=log_to_stderr)
    except TrainingError as e:
        fail(str(e), e.exit_code)
    except _eval_errors() as e:
        fail(str(e))
    click.echo(f"wrote {result['out']}/report.html")
