"""`export gguf` (one GGUF file for llama.cpp and LM Studio) and `export ollama` (the GGUF plus a Modelfile)."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors

_DTYPE_HELP = "Weights: f32, f16, q8_0, q4_0, or q4_K_M (quantized by llama.cpp; needs llama-cpp-python)."


def _errors():
    from mlx_persona.export import ExportError

    return user_errors() + (ExportError,)


@click.command("gguf")
@click.argument("source")
@click.option("-o", "--output", "--out", "out", required=True, type=click.Path(), help="The .gguf file to write.")
@click.option("--dtype", default="f16", show_default=True, help=_DTYPE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace the file if it exists.")
def gguf_cmd(source, out, dtype, overwrite):
    """Write SOURCE as one GGUF file (llama.cpp's gemma3) for llama.cpp, LM Studio and Ollama.

    SOURCE is a Hugging Face folder, a run folder of `mlx-persona train` (a LoRA/DoRA run is fused
    first), or a model spec (builtin:NAME, a hub id).
    """
    from mlx_persona.export.gguf import export_gguf

    try:
        path = export_gguf(source, out, dtype, overwrite=overwrite, log=log_to_stderr)
    except _errors() as e:
        fail(str(e))
    click.echo(f"wrote {path}")


@click.command("ollama")
@click.argument("source")
@click.option("-o", "--output", "--out", "out", required=True, type=click.Path(),
              help="The folder to write: model.gguf and Modelfile.")
@click.option("--dtype", default="f16", show_default=True, help=_DTYPE_HELP)
@click.option("--preset", default="persona", show_default=True,
              help="Generation preset written as the Modelfile's parameters.")
@click.option("--overwrite", is_flag=True, help="Replace the folder if it exists.")
def ollama_cmd(source, out, dtype, preset, overwrite):
    """Write SOURCE as an Ollama model folder: the GGUF file and a Modelfile (ollama create NAME -f OUT/Modelfile).

    SOURCE is as for `export gguf`. The Modelfile's template renders the conversation as Gemma's chat
    template does; its parameters are the preset's (Ollama has no min_new_tokens; the file says so).
    """
    from mlx_persona.export.ollama import export_ollama

    try:
        path = export_ollama(source, out, dtype, preset=preset, overwrite=overwrite, log=log_to_stderr)
    except _errors() as e:
        fail(str(e))
    click.echo(f"wrote {path}; import it with: ollama create NAME -f {path}/Modelfile")
