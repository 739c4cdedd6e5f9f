"""`fuse` (adapter into base, a Hugging Face folder), `export onnx` (for transformers.js) and `web` (the chat page)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors
from mlx_persona.cli.options import model_option, output_option, typed_flag


def _export_errors():
    from mlx_persona.export import ExportError

    return user_errors() + (ExportError,)


def _errors_of_exports():
    return _export_errors() + (ValueError,)


@click.command()
@model_option(default=None, help="Base model (folder, hub id or builtin:NAME), or a LoRA/DoRA run folder "
              "alone; default: the base the adapter records.")
@click.option("--adapter", "--adapter-path", "adapter", type=click.Path(),
              help="Output folder of `mlx-persona train` (LoRA/DoRA adapters, or a full fine-tune).")
@output_option("--out", "--save-path", dest="out", required=True,
               help="Folder to write the fused Hugging Face model to.")
@click.option("--preset", default="persona", show_default=True,
              help="Generation preset written to generation_config.json.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def fuse(model, adapter, out, preset, overwrite):
    """Fuse an adapter into its base model and write a plain Hugging Face folder."""
    from mlx_persona.export.hf import fuse as run
    from mlx_persona.sampling import preset as get_preset

    try:
        path = run(model, adapter, out, overwrite=overwrite, generation=get_preset(preset))
    except _errors_of_exports() as e:
        fail(str(e))
    click.echo(f"wrote {path}")


@contextmanager
def _model_folder(source: str, out: str, overwrite: bool):
    """`source` as the fused model folder ONNX export reads: itself, or for an output folder of `train`
    (LoRA/DoRA or full) the run fused (persona preset) into a private temporary folder, removed after."""
    from mlx_persona.export.hf import fuse
    from mlx_persona.outputs import check_output_dir
    from mlx_persona.runs import is_adapter_folder, is_run_folder

    path = Path(source).expanduser()
    if not (is_adapter_folder(path) or is_run_folder(path)):
        yield path
        return
    check_output_dir(out, overwrite)  # before the fuse, which takes a while
    parent = Path(out).expanduser().absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=".mlx-persona-fuse-", dir=parent if parent.is_dir() else None))  # 0700
    try:
        yield fuse(None, str(path), tmp / "fused")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(source: str, out: str, dtypes: str, overwrite: bool) -> Path:
    """``export onnx SOURCE -o OUT``; a run folder is fused first (OUT locked throughout)."""
    from mlx_persona.export.onnx import export_onnx
    from mlx_persona.outputs import output_lock

    with output_lock(out), _model_folder(source, out, overwrite) as folder:
        return export_onnx(folder, out, tuple(d.strip() for d in dtypes.split(",") if d.strip()),
                           overwrite=overwrite, log=log_to_stderr)


@click.group("export")
def export_group():
    """Export a fused model folder (or a run folder of `train`) for other runtimes."""


_DTYPES = click.option("--dtype", "dtypes", default="fp32,q4", show_default=True, help="Comma-separated: fp32, q4.")


@export_group.command("onnx")
@click.argument("hf_dir", type=click.Path())
@output_option("--out", dest="out", required=True, help="Folder to write (transformers.js layout).")
@_DTYPES
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export_onnx_cmd(hf_dir, out, dtypes, overwrite):
    """Write an ONNX decoder (fp32 and/or 4-bit) of a fused folder, or of a run folder of `train` (fused
    first), loadable by transformers.js."""
    try:
        path = _export(hf_dir, out, dtypes, overwrite)
    except _errors_of_exports() as e:
        fail(str(e))
    click.echo(f"wrote {path}")


def _web_folder(web_dir: str, output: str | None, dtypes: str, overwrite: bool) -> str:
    """The ONNX export to put the page in: WEB_DIR itself, or WEB_DIR (a run or fused model folder)
    exported to OUTPUT first."""
    folder = Path(web_dir)
    exportable = not (folder / "onnx").is_dir() and any((folder / f).is_file()
                                                         for f in ("config.json", "adapter_config.json"))
    if not exportable:  # an ONNX export (or not: install_page says what it lacks)
        if output is not None:
            fail(f"{typed_flag('output')} {output}: {web_dir} is not a model or run folder to export; the page "
                 "goes into the ONNX export itself (mlx-persona web EXPORT)")
        return web_dir
    if output is None:
        fail(f"{web_dir}: not an ONNX export (no onnx/); pass -o DIR to export it to DIR and serve that, or run "
             f"`mlx-persona export onnx {web_dir} -o DIR` first")
    try:
        return str(_export(web_dir, output, dtypes, overwrite))
    except _errors_of_exports() as e:
        fail(str(e))


@click.command()
@click.argument("web_dir", type=click.Path())
@output_option(help="With a run folder of `train` or a fused model as WEB_DIR: the folder to export it to "
                    "(ONNX) and serve.")
@_DTYPES
@click.option("--overwrite", is_flag=True, help="With -o: replace OUTPUT if it exists.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0 = any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: one address (not 0.0.0.0); requests must name it or a loopback "
                   "name (127.0.0.1, localhost, [::1]) with the port in their Host header.")
@click.option("--no-serve", is_flag=True, help="Only copy the page and runtime into WEB_DIR.")
def web(web_dir, output, dtypes, overwrite, port, host, no_serve):
    """Put the chat page next to an ONNX export and serve it on 127.0.0.1 (runs in the browser). WEB_DIR may
    also be a run folder of `train` or a fused model, exported to -o DIR first."""
    from mlx_persona.export.web import WebError, install_page, serve

    web_dir = _web_folder(web_dir, output, dtypes, overwrite)
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
