"""The `mlx-persona` command line: thin click commands over the library.

Every command imports its module lazily so that `mlx-persona --help` is instant and a missing
extra only breaks the command that needs it.
"""

from __future__ import annotations

import click

from mlx_persona import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-persona")
def main():
    """Teach small chat models (Gemma 3) a personality on MLX."""


# Commands are added below, one block per concern (data, models, train, generate, chat, eval, export).
