"""The `mlx-persona` command line: thin click commands over the library.

Every command imports its module lazily so that `mlx-persona --help` is instant and a missing
extra only breaks the command that needs it. Nothing in this package imports mlx at module level,
so `mlx_persona.__main__` can set the backend up before mlx loads.

One module per pipeline stage, each with plain click commands; this file is the one list of them:
data (validate, stats, pairs), train, generate (generate, chat and the generation options), eval (eval,
sweep, compare), export (fuse, export onnx, web; export gguf and ollama in export_gguf), doctor (doctor,
init-model), serve, rate (blind rating); errors holds the user-error handling they share, options the
option spellings (mlx-lm's names, ``-o/--output``) and the messages that name the flag typed.
"""

from __future__ import annotations

import click

from mlx_persona import __version__
from mlx_persona.cli import data, doctor, eval, export, export_gguf, generate, rate, serve, train
from mlx_persona.cli.options import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-persona")
def main():
    """Teach small chat models (Gemma 3) a personality on MLX."""


for _command in (doctor.doctor, doctor.init_model_cmd, data.data, train.train, generate.generate, generate.chat,
                 eval.eval_cmd, eval.sweep, eval.compare, export.fuse, export.export_group, export.web, serve.serve,
                 rate.rate):
    main.add_command(_command)
export.export_group.add_command(export_gguf.gguf_cmd)
export.export_group.add_command(export_gguf.ollama_cmd)

__all__ = ["main"]
