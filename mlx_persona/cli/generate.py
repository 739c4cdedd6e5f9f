"""`generate` (one reply) and `chat` (interactive), and the generation options they share with eval."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, user_errors
from mlx_persona.cli.options import (
    from_command_line,
    generation_message,
    model_option,
    typed_flag,
)


def generation_options(f):
    """Every GenerationConfig field as an option (mlx-lm's names too); unset options keep the preset's value."""
    options = [
        click.option("--preset", type=click.Choice(["persona", "greedy", "default"]), default="default",
                     show_default=True, help="persona: min_new_tokens=50, temperature=0.8, top_k=50, "
                                             "top_p=0.95, repetition_penalty=1.1; greedy: temperature=0."),
        click.option("--max-new-tokens", "--max-tokens", "max_new_tokens", type=int),
        click.option("--min-new-tokens", type=int, help="Suppress every end token until this many new tokens "
                                                        "(at most --max-new-tokens)."),
        click.option("--temperature", "--temp", "temperature", type=float, help="0 = greedy."),
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


def _check_lengths(cfg, preset: str) -> None:
    """--min-new-tokens above the max (--max-new-tokens, or the preset's) would run every reply to the
    length limit: an error. A preset's own min_new_tokens above a smaller --max-new-tokens is not (a short
    reply in the preset's other settings; transformers' semantics)."""
    if cfg.min_new_tokens <= cfg.max_new_tokens or click.get_current_context(silent=True) is None or \
            not from_command_line("min_new_tokens"):
        return
    high = f"{typed_flag('max_new_tokens')} {cfg.max_new_tokens}" if from_command_line("max_new_tokens") else \
        f"max_new_tokens {cfg.max_new_tokens} (of --preset {preset})"
    fail(f"{typed_flag('min_new_tokens')} {cfg.min_new_tokens} is greater than {high}: every reply would run to "
         f"the length limit; lower {typed_flag('min_new_tokens')} or raise {typed_flag('max_new_tokens')}")


def make_generation_config(preset, **settings):
    """GenerationConfig from a preset name plus the options given on the command line; a bad value is an
    error naming the flag typed."""
    from mlx_persona.generation import generation_config

    try:
        cfg = generation_config(preset, **{k: v for k, v in settings.items() if v != ()})
    except ValueError as e:
        fail(generation_message(str(e)))
    _check_lengths(cfg, preset)
    return cfg


def _persona_system(system, persona):
    if system or not persona:
        return system
    from mlx_persona.eval.persona import load_persona

    return load_persona(persona).system_prompt


def _persona_name(persona):
    """The card's name (the label of the model's turns in `chat`), or None without a card."""
    if not persona:
        return None
    from mlx_persona.eval.persona import load_persona

    try:
        return load_persona(persona).name
    except user_errors() as e:
        fail(str(e))


def _load_for_generation(model, adapter, system, persona):
    """(system prompt, model, tokenizer, resolved model path), or a clean exit on the user's mistakes.

    `model` or `adapter` may be an output folder of `train` (see :func:`mlx_persona.runs.resolve_run`)."""
    from pathlib import Path

    from mlx_persona.models import load_model, resolve_model
    from mlx_persona.runs import resolve_run

    if model is not None and model.isdigit() and not Path(model).exists():
        fail(f"{typed_flag('model')} {model}: not a model. -m is --model here; for mlx_lm.generate's -m "
             f"(the number of tokens) use --max-tokens {model}")
    try:
        spec, adapter = resolve_run(model, adapter, model_flag=typed_flag("model"))
        system = _persona_system(system, persona)
        m, tok = load_model(spec, adapter_path=adapter)
        path = resolve_model(spec)
    except user_errors() as e:
        fail(str(e))
    return system, m, tok, path


def _read_prompt(prompt: str) -> str:
    """The prompt; ``-`` reads it from stdin (as mlx_lm.generate does)."""
    import sys

    return sys.stdin.read() if prompt == "-" else prompt


_MODEL_HELP = ("A model (folder, hub id, builtin:NAME), or an output folder of `train` (a LoRA/DoRA run stands "
               "for its recorded base + itself).")
_ADAPTER_HELP = "An output folder of `train` (LoRA/DoRA, or full) applied to --model [default --model: its base]."


@click.command()
@model_option(help=_MODEL_HELP)
@click.option("--adapter", "--adapter-path", "adapter", type=click.Path(), help=_ADAPTER_HELP)
@click.option("-p", "--prompt", required=True, help="The user message ('-' reads it from stdin).")
@click.option("--system", "--system-prompt", "system", help="System/persona prompt.")
@click.option("--persona", type=click.Path(exists=True, dir_okay=False), help="Use a persona card's system_prompt.")
@click.option("--raw", "--ignore-chat-template", "raw", is_flag=True,
              help="Feed the prompt as plain text, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (text, tokens, stop reason, speed) as JSON.")
@generation_options
def generate(model, adapter, prompt, system, persona, raw, as_json, preset, **settings):
    """Generate one reply, streaming it to stdout."""
    import dataclasses
    import json as _json

    from mlx_persona.generation import end_token_ids, stream_generate

    config = make_generation_config(preset, **settings)
    prompt = _read_prompt(prompt)
    system, m, tok, path = _load_for_generation(model, adapter, system, persona)
    try:
        end_ids = end_token_ids(tok, path)
    except user_errors() as e:
        fail(str(e))
    result = None
    try:
        for chunk in stream_generate(m, tok, prompt, config, system=system, end_ids=end_ids, chat_template=not raw):
            if chunk.text and not as_json:
                click.echo(chunk.text, nl=False)
            result = chunk.result or result
    except user_errors() as e:  # e.g. the chat template failed on this prompt
        fail(f"{model or adapter}: {e}")
    if as_json:
        click.echo(_json.dumps(dataclasses.asdict(result), indent=2))
    else:
        click.echo()
        click.echo(f"[{result.generated_tokens} tokens, stopped: {result.stop_reason}, prompt "
                   f"{result.prompt_tps:.1f} tok/s, decode {result.decode_tps:.1f} tok/s]", err=True)


@click.command()
@model_option(help=_MODEL_HELP)
@click.option("--adapter", "--adapter-path", "adapter", type=click.Path(), help=_ADAPTER_HELP)
@click.option("--system", "--system-prompt", "system", help="System/persona prompt.")
@click.option("--persona", type=click.Path(exists=True, dir_okay=False), help="Use a persona card's system_prompt.")
@generation_options
def chat(model, adapter, system, persona, preset, **settings):
    """Interactive multi-turn chat (/reset, /settings, /system, /help, /quit). Reads lines from a pipe too.

    At a terminal: line editing and history (kept in $MLX_PERSONA_HISTORY, default
    ~/.local/state/mlx_persona/chat_history; empty: not kept), Ctrl-C stops a reply, Ctrl-D leaves."""
    from mlx_persona.chat import ChatSession, run_chat

    config = make_generation_config(preset, **settings)
    name = _persona_name(persona)
    system, m, tok, path = _load_for_generation(model, adapter, system, persona)
    try:
        run_chat(ChatSession(m, tok, config, system=system, model_path=path, name=name))
    except user_errors() as e:  # e.g. the chat template failed on the conversation
        fail(f"{model or adapter}: {e}")
