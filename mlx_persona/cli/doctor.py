"""`doctor` (backend, device, dtype, matmul speed) and `init-model` (a random-weight model folder)."""

from __future__ import annotations

import os

import click

from mlx_persona.cli.errors import fail, user_errors
from mlx_persona.cli.options import output_option


@click.command()
@click.option("--size", default=2048, show_default=True, help="Matrix size of the matmul benchmark.")
def doctor(size):
    """Show the backend, device and dtype in use, and measure fp32 matmul GFLOP/s."""
    import mlx.core as mx

    from mlx_persona import backend as plat
    from mlx_persona.backend import qmatmul, sgemm

    if plat.cpu_rewrites_enabled():
        qmatmul.load()  # 4/8-bit models' kernel: built on first use, so doctor can say whether it is on
    info = plat.describe()
    for key in ("platform", "python", "mlx", "mlx_lm", "device", "metal", "dtype", "blas", "blas_core", "blas_note", "sgemm", "precision", "jit", "quantized", "cpu_count", "cpu"):
        click.echo(f"{key:>10}: {info.get(key)}")
    gflops = plat.matmul_gflops(size, mx.float32)
    inputs = ", bf16 inputs" if sgemm.bf16_active() else ""
    click.echo(f"{'matmul':>10}: {gflops:.1f} GFLOP/s (float32{inputs}, {size}x{size}, median of 5)")
    if os.environ.get(sgemm.ENV) and not sgemm.bf16_active() and info["platform"].startswith("Linux"):
        click.echo(f"   warning: {sgemm.ENV} is set but matmuls are exact float32: {sgemm.bf16_status()}", err=True)
    if info["platform"].startswith("Linux") and plat.blas_status()[0] is None:
        click.echo("   warning: MLX is using its bundled reference BLAS, which is slow. "
                   "Install OpenBLAS: sudo apt-get install libopenblas0-pthread", err=True)


@click.command("init-model")
@click.argument("out", required=False, type=click.Path())
@output_option(help="The model folder to write (or give it as OUT).")
@click.option("--preset", type=click.Choice(["tiny", "gemma-3-270m", "gemma-3-1b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def init_model_cmd(out, output, preset, seed, overwrite):
    """Write a random-weight Gemma 3 model (tokenizer trained on the shipped data) as a HF folder."""
    from mlx_persona.models import init_model

    if (out is None) == (output is None):
        fail("give the folder to write once: OUT or -o/--output OUT")
    try:
        path = init_model(out or output, preset, seed=seed, overwrite=overwrite)
    except user_errors() as e:
        fail(str(e))
    click.echo(f"wrote {path}")
