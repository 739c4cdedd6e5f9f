"""`serve`: an OpenAI-compatible HTTP server for one model (mlx_persona.serve)."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors
from mlx_persona.cli.options import model_option


@click.command()
@model_option(required=True, help="[NAME=]SPEC[@ADAPTER]: a folder, hub id, builtin:NAME or a `train` "
              "output folder; NAME (default: the folder's name) is the id clients send as `model`.")
@click.option("--adapter", "--adapter-path", "adapter", type=click.Path(exists=True, file_okay=False),
              help="Adapter folder from `train`.")
@click.option("--persona", type=click.Path(exists=True, dir_okay=False),
              help="Put a persona card's system_prompt before conversations that have no system message.")
@click.option("--preset", type=click.Choice(["persona", "greedy", "default"]), default="persona", show_default=True,
              help="Settings of every field a request does not send (temperature, min_new_tokens, ...).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (one, not 0.0.0.0).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--api-key", envvar="MLX_PERSONA_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer KEY` (prefer the variable: a flag shows in `ps`).")
@click.option("--queue-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Requests that may wait while the batch is full; one more gets 503.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Requests decoded together  [default: as many as fit a quarter of the free memory, at most 16].")
@click.option("--max-body", type=click.IntRange(1024), default=1_000_000, show_default=True,
              help="Largest request body in bytes (413 above).")
@click.option("--request-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds for a request's headers, and for its body, to arrive.")
def serve(model, adapter, persona, preset, host, port, api_key, queue_size, max_batch, max_body, request_timeout):
    """Serve one model over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    try:
        from mlx_persona.eval.options import EvalError
        from mlx_persona.serve.server import ServeError, ServeOptions, run
    except ImportError as e:
        fail(f"serve needs its extra: pip install 'mlx_persona[serve]' ({e.name} is missing)")
    options = ServeOptions(model, adapter, persona, preset, host, port, api_key or None, queue_size, max_body,
                           request_timeout, max_batch)
    try:
        run(options, log_to_stderr)
    except (user_errors() + (EvalError, ServeError)) as e:
        fail(str(e))
