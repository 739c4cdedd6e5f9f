"""`train`: fine-tune a model on chat data (LoRA, DoRA or full) from a config plus command-line overrides."""

from __future__ import annotations

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors


@click.command()
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
    from mlx_persona.tuner import run as tuner_run
    from mlx_persona.tuner.config import load_config
    from mlx_persona.tuner.trainer import TrainingError

    overrides = {"model": model, "data": data, "output": output, "method": method, "steps": steps,
                 "epochs": epochs, "batch_size": batch_size, "optim.learning_rate": learning_rate,
                 "lora.rank": rank, "seed": seed, "max_seq_len": max_seq_len,
                 "grad_checkpoint": grad_checkpoint, "overwrite": overwrite,
                 "progress": False if no_progress else None}
    try:
        cfg = load_config(config_path, overrides, sets)
        tuner_run.run(cfg, resume=resume, force=force, log=log_to_stderr)
    except TrainingError as e:
        fail(str(e), e.exit_code)
    except user_errors() as e:
        fail(str(e))
