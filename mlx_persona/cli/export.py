"""`fuse` (adapter into base, a Hugging Face folder), `export onnx` (for transformers.js) and `web` (the chat page)."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors


def _export_errors():
    from mlx_persona.export import ExportError

    return user_errors() + (ExportError,)


@click.command()
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
        fail(str(e))
    except _export_errors() as e:
        fail(str(e))
    click.echo(f"wrote {path}")


@click.group("export")
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
                           overwrite=overwrite, log=log_to_stderr)
    except _export_errors() as e:
        fail(str(e))
    click.echo(f"wrote {path}")


@click.command()
@click.argument("web_dir", type=click.Path())
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0 = any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: one address (not 0.0.0.0); requests must name it or a loopback "
                   "name (127.0.0.1, localhost, [::1]) with the port in their Host header.")
@click.option("--no-serve", is_flag=True, help="Only copy the page and runtime into WEB_DIR.")
def web(web_dir, port, host, no_serve):
    """Put the chat page next to an ONNX export and serve it on 127.0.0.1 (runs in the browser)."""
    from mlx_persona.export.web import WebError, install_page, serve

    try:
        install_page(web_dir, log=log_to_stderr)
    except (WebError, FileNotFoundError) as e:
        fail(str(e))
    click.echo(f"page installed in {web_dir}")
    if not no_serve:
        try:
            serve(web_dir, port=port, host=host, log=lambda m: click.echo(m))
        except (OSError, ValueError) as e:
            fail(f"cannot serve on {host}:{port}: {e}")
