"""What the commands' options share: mlx-lm's names as aliases, the one output flag, and messages that
name the flag the user typed.

mlx-lm's flags (``mlx_lm.generate``, ``mlx_lm.lora``, ``mlx_lm.fuse``) are second names of ours wherever
they mean the same thing (``--temp`` is ``--temperature``, ``--iters`` is ``--steps``, ...); click lists
them on the option's own line of ``--help``. One difference: ``-m`` is ``--model`` on every command
(mlx_lm.lora has no ``-m``; in ``mlx_lm.generate`` and ``mlx_lm.chat`` it is ``--max-tokens``, so a
number given as the model says to use ``--max-tokens``).

Every command that writes a folder takes it as ``-o/--output`` (older spellings, ``--out``, still work).
"""

from __future__ import annotations

import re

import click

_ARGV = "mlx_persona.argv"


class Group(click.Group):
    """The command group; it keeps the arguments as typed, so that a message can name the flag used."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)  # ctx.meta is shared with every subcommand's context
        return super().parse_args(ctx, args)


def output_option(*extra: str, dest: str = "output", **kwargs):
    """``-o/--output`` (and `extra` older names) for the folder a command writes."""
    return click.option("-o", "--output", *extra, dest, type=click.Path(), **kwargs)


def model_option(**kwargs):
    """``-m/--model``: a model folder, hub id or ``builtin:NAME`` (commands that load one add run folders)."""
    kwargs.setdefault("help", "Local folder, hub id, or builtin:tiny | builtin:gemma-3-270m | builtin:gemma-3-1b.")
    return click.option("-m", "--model", "model", **kwargs)


def typed_flag(name: str, ctx: click.Context | None = None) -> str:
    """The spelling of option `name` (its parameter name) that the user typed; its first long name when it
    was not typed (or the command ran without the group)."""
    ctx = ctx or click.get_current_context()
    param = next((p for p in ctx.command.params if p.name == name), None)
    if param is None:
        return name
    names = [*param.opts, *param.secondary_opts]
    typed = None
    for token in ctx.meta.get(_ARGV, ()):
        if token == "--":
            break
        for opt in names:
            long = opt.startswith("--")
            if token == opt or (long and token.startswith(opt + "=")) or \
                    (not long and token.startswith(opt) and not token.startswith("--")):
                typed = opt
    return typed or next((o for o in names if o.startswith("--")), names[0])


def from_command_line(name: str, ctx: click.Context | None = None) -> bool:
    """Whether option `name` was given on the command line (not its default)."""
    ctx = ctx or click.get_current_context()
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def name_flags(message: str, keys: dict[str, str], ctx: click.Context | None = None) -> str:
    """`message` (``KEY: reason``) with KEY replaced by the flag the user typed, when KEY is one of `keys`
    (setting -> option name) and that option was given on the command line."""
    ctx = ctx or click.get_current_context(silent=True)
    key, sep, rest = message.partition(":")
    name = keys.get(key)
    if ctx is None or not sep or name is None or not from_command_line(name, ctx):
        return message
    return f"{typed_flag(name, ctx)}:{rest}"


_GENERATION_FIELD = re.compile(r"^GenerationConfig\.(\w+) (must .*)$", re.DOTALL)


def generation_message(message: str) -> str:
    """A GenerationConfig error as the command line says it: the flag typed, not the field
    (``GenerationConfig.top_p must be ...`` -> ``--top-p: must be ...``)."""
    m = _GENERATION_FIELD.match(message)
    if not m:
        return message
    field, rest = m.groups()
    ctx = click.get_current_context(silent=True)
    if ctx is None or all(p.name != field for p in ctx.command.params):
        return f"{field}: {rest}"
    return f"{typed_flag(field, ctx)}: {rest}"
