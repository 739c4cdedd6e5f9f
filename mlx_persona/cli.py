"""The `mlx-persona` command line: thin click commands over the library.

Every command imports its module lazily so that `mlx-persona --help` is instant and a missing
extra only breaks the command that needs it.
"""

from __future__ import annotations

import os

import click

from mlx_persona import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-persona")
def main():
    """Teach small chat models (Gemma 3) a personality on MLX."""


# Commands are added below, one block per concern (data, models, train, generate, chat, eval, export).


def _fail(message: str, code: int = 1):
    """User mistakes end with a clear message and a non-zero exit, never a traceback."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _user_errors():
    """Exception types that are the user's to fix (bad data, config, model spec)."""
    from mlx_persona.data import DataError
    from mlx_persona.eval.persona import PersonaError
    from mlx_persona.models import ModelError
    from mlx_persona.outputs import OutputError
    from mlx_persona.tuner.config import ConfigError

    return (ConfigError, DataError, ModelError, OutputError, PersonaError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------- doctor
@main.command()
@click.option("--size", default=2048, show_default=True, help="Matrix size of the matmul benchmark.")
def doctor(size):
    """Show the backend, device and dtype in use, and measure fp32 matmul GFLOP/s."""
    import mlx.core as mx

    from mlx_persona import backend as plat
    from mlx_persona.backend import sgemm

    info = plat.describe()
    for key in ("platform", "python", "mlx", "mlx_lm", "device", "metal", "dtype", "blas", "blas_core", "blas_note", "sgemm", "precision", "jit", "cpu_count"):
        click.echo(f"{key:>10}: {info.get(key)}")
    gflops = plat.matmul_gflops(size, mx.float32)
    inputs = ", bf16 inputs" if sgemm.bf16_active() else ""
    click.echo(f"{'matmul':>10}: {gflops:.1f} GFLOP/s (float32{inputs}, {size}x{size}, median of 5)")
    if os.environ.get(sgemm.ENV) and not sgemm.bf16_active() and info["platform"].startswith("Linux"):
        click.echo(f"   warning: {sgemm.ENV} is set but matmuls are exact float32: {sgemm.bf16_status()}", err=True)
    if info["platform"].startswith("Linux") and plat.blas_status()[0] is None:
        click.echo("   warning: MLX is using its bundled reference BLAS, which is slow. "
                   "Install OpenBLAS: sudo apt-get install libopenblas0-pthread", err=True)


# ---------------------------------------------------------------------------------------------- models
@main.command("init-model")
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(["tiny", "gemma-3-270m", "gemma-3-1b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def init_model_cmd(out, preset, seed, overwrite):
    """Write a random-weight Gemma 3 model (tokenizer trained on the shipped data) as a HF folder."""
    from mlx_persona.models import init_model

    try:
        path = init_model(out, preset, seed=seed, overwrite=overwrite)
    except _user_errors() as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- data
@main.group()
def data():
    """Validate training data and show its length statistics."""


@data.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-system", is_flag=True, help="Reject system turns (for templates without a system role).")
def data_validate(paths, no_system):
    """Check JSONL files line by line; print every problem as file:line: reason."""
    from mlx_persona.data import DataError, load_jsonl

    bad = False
    for path in paths:
        try:
            examples = load_jsonl(path, system_ok=not no_system)
            click.echo(f"{path}: ok, {len(examples)} examples")
        except DataError as e:
            bad = True
            click.echo(str(e), err=True)
    if bad:
        raise SystemExit(1)


@data.command("stats")
@click.argument("path", type=click.Path())
@click.option("--model", default=None, help="Also count tokens with this model's tokenizer.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def data_stats(path, model, as_json):
    """Examples, turns, and the length distribution of assistant replies."""
    import json as _json
    from pathlib import Path

    from mlx_persona.data import compute_stats, format_stats, load_jsonl, load_splits

    try:
        if Path(path).is_dir():
            train, valid = load_splits(path)
            examples = train + valid
        else:
            examples = load_jsonl(path)
        tokenizer = None
        if model:
            from mlx_persona.models import load_model

            _, tokenizer = load_model(model)
        stats = compute_stats(examples, tokenizer)
    except _user_errors() as e:
        _fail(str(e))
    click.echo(_json.dumps(stats, indent=2) if as_json else format_stats(stats))


# ---------------------------------------------------------------------------------------------- train
@main.command()
@click.option("--config", "config_path", type=click.Path(), help="YAML config (see configs/).")
@click.option("--model", help="Local folder, hub id, or builtin:tiny | builtin:gemma-3-270m | builtin:gemma-3-1b.")
@click.option("--data", help="Folder with train.jsonl [+ valid.jsonl], or a .jsonl file.")
@click.option("--output", "-o", help="Output folder.")
@click.option("--method", type=click.Choice(["lora", "dora", "full"]))
@click.option("--steps", type=int, help="Optimizer steps (overrides epochs).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--learning-rate", type=float)
@click.option("--rank", type=int, help="LoRA rank.")
@click.option("--seed", type=int)
@click.option("--max-seq-len", type=int)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set lora.alpha=32.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output folder.")
@click.option("--resume", is_flag=True, help="Continue from the newest intact checkpoint in the output folder.")
@click.option("--force", is_flag=True, help="With --resume: continue even if the config changed.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(config_path, model, data, output, method, steps, epochs, batch_size, learning_rate, rank, seed,
          max_seq_len, grad_checkpoint, sets, overwrite, resume, force, no_progress):
    """Fine-tune a model on chat data (LoRA, DoRA or full)."""
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.trainer import TrainingError
    from mlx_persona.tuner.trainer import train as run

    overrides = {"model": model, "data": data, "output": output, "method": method, "steps": steps,
                 "epochs": epochs, "batch_size": batch_size, "optim.learning_rate": learning_rate,
                 "lora.rank": rank, "seed": seed, "max_seq_len": max_seq_len,
                 "grad_checkpoint": grad_checkpoint, "overwrite": overwrite,
                 "progress": False if no_progress else None}
    try:
        cfg = load_config(config_path, overrides, sets)
        run(cfg, resume=resume, force=force, log=lambda m: click.echo(m, err=True))
    except TrainingError as e:
        _fail(str(e), e.exit_code)
    except _user_errors() as e:
        _fail(str(e))


# ---------------------------------------------------------------------------------------------- export
def _export_errors():
    from mlx_persona.export import ExportError

    return _user_errors() + (ExportError,)


@main.command()
@click.option("--model", default=None, help="Base model (folder, hub id or builtin:NAME); default: the one "
              "recorded in the adapter's adapter_config.json.")
@click.option("--adapter", "adapter", required=True, type=click.Path(), help="Output folder of `mlx-persona train`.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write the fused Hugging Face model to.")
@click.option("--preset", default="persona", show_default=True,
              help="Generation preset written to generation_config.json.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def fuse(model, adapter, out, preset, overwrite):
    """Fuse an adapter into its base model and write a plain Hugging Face folder."""
    from mlx_persona.export.hf import fuse as run
    from mlx_persona.sampling import preset as get_preset

    try:
        path = run(model, adapter, out, overwrite=overwrite, generation=get_preset(preset))
    except ValueError as e:
        _fail(str(e))
    except _export_errors() as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@main.group("export")
def export_group():
    """Export a fused model folder for other runtimes."""


@export_group.command("onnx")
@click.argument("hf_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Folder to write (transformers.js layout).")
@click.option("--dtype", "dtypes", default="fp32,q4", show_default=True, help="Comma-separated: fp32, q4.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_onnx_cmd(hf_dir, out, dtypes, overwrite):
    """Write an ONNX decoder (fp32 and/or 4-bit) of a fused folder, loadable by transformers.js."""
    from mlx_persona.export.onnx import export_onnx

    try:
        path = export_onnx(hf_dir, out, tuple(d.strip() for d in dtypes.split(",") if d.strip()),
                           overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    except _export_errors() as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- web
@main.command()
@click.argument("web_dir", type=click.Path())
@click.option("--port", default=8000, show_default=True, help="Port on 127.0.0.1 (0 = any free port).")
@click.option("--no-serve", is_flag=True, help="Only copy the page and runtime into WEB_DIR.")
def web(web_dir, port, no_serve):
    """Put the chat page next to an ONNX export and serve it on 127.0.0.1 (runs in the browser)."""
    from mlx_persona.export.web import WebError, install_page, serve

    try:
        install_page(web_dir)
    except (WebError, FileNotFoundError) as e:
        _fail(str(e))
    click.echo(f"page installed in {web_dir}")
    if not no_serve:
        try:
            serve(web_dir, port=port, log=lambda m: click.echo(m))
        except OSError as e:
            _fail(f"cannot serve on 127.0.0.1:{port}: {e}")


# ---------------------------------------------------------------------------------------------- generation
def generation_options(f):
    """Every GenerationConfig field as an option; unset options keep the preset's value."""
    options = [
        click.option("--preset", type=click.Choice(["persona", "greedy", "default"]), default="default",
                     show_default=True, help="persona: min_new_tokens=50, temperature=0.8, top_k=50, "
                                             "top_p=0.95, repetition_penalty=1.1; greedy: temperature=0."),
        click.option("--max-new-tokens", type=int),
        click.option("--min-new-tokens", type=int, help="Suppress every end token until this many new tokens."),
        click.option("--temperature", type=float, help="0 = greedy."),
        click.option("--top-k", type=int, help="0 = off."),
        click.option("--top-p", type=float, help="1 = off."),
        click.option("--min-p", type=float, help="0 = off."),
        click.option("--repetition-penalty", type=float, help="Over prompt + generated tokens; 1 = off."),
        click.option("--no-repeat-ngram-size", type=int),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--seed", type=int),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def make_generation_config(preset, **settings):
    """GenerationConfig from a preset name plus the options given on the command line."""
    import dataclasses

    from mlx_persona.sampling import GenerationConfig
    from mlx_persona.sampling import preset as get_preset

    cfg = GenerationConfig() if preset == "default" else get_preset(preset)
    given = {k: v for k, v in settings.items() if v is not None and v != ()}
    if "stop" in given:
        given["stop"] = list(given["stop"])
    try:
        return dataclasses.replace(cfg, **given).validate()
    except ValueError as e:
        _fail(str(e))


def _persona_system(system, persona):
    if system or not persona:
        return system
    from mlx_persona.eval.persona import load_persona

    return load_persona(persona).system_prompt


@main.command()
@click.option("--model", required=True, help="Local folder, hub id, or builtin:NAME.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Adapter folder from `train`.")
@click.option("--prompt", required=True, help="The user message.")
@click.option("--system", help="System/persona prompt.")
@click.option("--persona", type=click.Path(exists=True, dir_okay=False), help="Use a persona card's system_prompt.")
@click.option("--raw", is_flag=True, help="Feed the prompt as plain text, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, tokens, stop reason, speed) as JSON.")
@generation_options
def generate(model, adapter, prompt, system, persona, raw, as_json, preset, **settings):
    """Generate one reply, streaming it to stdout."""
    import dataclasses
    import json as _json

    from mlx_persona.generation import end_token_ids, stream_generate
    from mlx_persona.models import load_model, resolve_model

    config = make_generation_config(preset, **settings)
    try:
        system = _persona_system(system, persona)
        m, tok = load_model(model, adapter_path=adapter)
        end_ids = end_token_ids(tok, resolve_model(model))
    except _user_errors() as e:
        _fail(str(e))
    result = None
    for chunk in stream_generate(m, tok, prompt, config, system=system, end_ids=end_ids, chat_template=not raw):
        if chunk.text and not as_json:
            click.echo(chunk.text, nl=False)
        result = chunk.result or result
    if as_json:
        click.echo(_json.dumps(dataclasses.asdict(result), indent=2))
    else:
        click.echo()
        click.echo(f"[{result.generated_tokens} tokens, stopped: {result.stop_reason}, prompt "
                   f"{result.prompt_tps:.1f} tok/s, decode {result.decode_tps:.1f} tok/s]", err=True)


@main.command()
@click.option("--model", required=True, help="Local folder, hub id, or builtin:NAME.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Adapter folder from `train`.")
@click.option("--system", help="System/persona prompt.")
@click.option("--persona", type=click.Path(exists=True, dir_okay=False), help="Use a persona card's system_prompt.")
@generation_options
def chat(model, adapter, system, persona, preset, **settings):
    """Interactive multi-turn chat (/reset, /settings, /system, /quit). Reads lines from a pipe too."""
    from mlx_persona.chat import ChatSession, run_chat
    from mlx_persona.models import load_model, resolve_model

    config = make_generation_config(preset, **settings)
    try:
        system = _persona_system(system, persona)
        m, tok = load_model(model, adapter_path=adapter)
        path = resolve_model(model)
    except _user_errors() as e:
        _fail(str(e))
    run_chat(ChatSession(m, tok, config, system=system, model_path=path))


# ---------------------------------------------------------------------------------------------- eval
def _eval_errors():
    from mlx_persona.eval.evaluate import EvalError
    from mlx_persona.eval.persona import PersonaError

    return _user_errors() + (EvalError, PersonaError)


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
        _fail(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2")
    if not seeds or any(s < 0 for s in seeds):
        _fail(f"--seeds {text!r}: expected comma-separated integers >= 0, e.g. --seeds 0,1,2")
    return seeds


def eval_options(f):
    """Options shared by `eval` and `sweep`: models, prompt set, persona card, data, seeds, output."""
    options = [
        click.option("--model", "models", multiple=True, required=True, metavar="[NAME=]SPEC[@ADAPTER]",
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
        click.option("--out", "-o", required=True, type=click.Path(), help="Report folder to write."),
        click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system, train_data, valid, no_valid,
                   early_tokens):
    from mlx_persona.eval.evaluate import EvalOptions, check_names, parse_model_arg

    if seeds is not None and seed is not None:
        _fail("give --seeds (several) or --seed (one), not both")
    options = EvalOptions(limit=limit, persona_system=persona_system, early_tokens=early_tokens)
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


@main.command("eval")
@eval_options
@generation_options
def eval_cmd(models, prompts, limit, seeds, persona_card, persona_system, train_data, valid, no_valid, early_tokens,
             out, overwrite, preset, seed, **settings):
    """Run a prompt set through one or more models and write a persona report (md, html, jsonl, plots)."""
    from mlx_persona.eval.evaluate import evaluate

    config = make_generation_config(preset, **settings)
    try:
        entries, options = _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system,
                                          train_data, valid, no_valid, early_tokens)
        evaluate(entries, config, options, out, overwrite=overwrite, command=_command_line("eval"),
                 log=lambda m: click.echo(m, err=True))
    except _eval_errors() as e:
        _fail(str(e))
    click.echo(f"wrote {out}/report.html")


@main.command()
@eval_options
@click.option("--grid", multiple=True, metavar="KEY=V1,V2,...",
              help="Generation setting values to try (repeatable; every combination runs), e.g. "
                   "--grid min_new_tokens=0,50 --grid temperature=0.8. Keys: min_new_tokens, max_new_tokens, "
                   "temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size.")
@generation_options
def sweep(models, prompts, limit, seeds, persona_card, persona_system, train_data, valid, no_valid, early_tokens,
          out, overwrite, grid, preset, seed, **settings):
    """Reply length, truncation and persona metrics for every combination of generation settings."""
    from mlx_persona.eval.evaluate import parse_grid
    from mlx_persona.eval.evaluate import sweep as run

    config = make_generation_config(preset, **settings)
    try:
        entries, options = _make_eval_run(models, prompts, limit, seeds, seed, persona_card, persona_system,
                                          train_data, valid, no_valid, early_tokens)
        rows = run(entries, config, parse_grid(grid), options, out, overwrite=overwrite,
                   command=_command_line("sweep"), log=lambda m: click.echo(m, err=True))
    except _eval_errors() as e:
        _fail(str(e))
    from pathlib import Path

    table = [line for line in (Path(out) / "sweep.md").read_text().splitlines() if line.startswith("|")]
    click.echo("\n".join(table))
    click.echo(f"wrote {out}/sweep.md, sweep.csv, sweep.png ({len(rows)} rows)")


@main.command()
@click.argument("recipe", type=click.Path())
@click.option("--out", "-o", type=click.Path(), help="Report folder (default: the recipe's output).")
@click.option("--overwrite", is_flag=True, help="Replace the report folder if it exists.")
@click.option("--retrain", is_flag=True, help="Train every `train` variant again, even if its run is finished.")
@click.option("--limit", type=int, help="Only the first N prompts (overrides the recipe).")
@click.option("--seeds", help="Comma-separated seeds (overrides the recipe).")
def compare(recipe, out, overwrite, retrain, limit, seeds):
    """Train (or reuse) and evaluate the variants of a recipe (configs/compare-*.yaml) in one report."""
    from mlx_persona.eval.evaluate import compare as run
    from mlx_persona.tuner.trainer import TrainingError

    try:
        result = run(recipe, out=out, overwrite=overwrite, retrain=retrain, limit=limit,
                     seeds=_parse_seeds(seeds) if seeds else None, command=_command_line("compare"),
                     log=lambda m: click.echo(m, err=True))
    except TrainingError as e:
        _fail(str(e), e.exit_code)
    except _eval_errors() as e:
        _fail(str(e))
    click.echo(f"wrote {result['out']}/report.html")
