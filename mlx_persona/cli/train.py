"""`train`: fine-tune a model on chat data (LoRA, DoRA or full) from a config plus command-line overrides.

mlx_lm.lora's flags work as second names where they mean the same (``--iters``, ``--adapter-path``,
``--fine-tune-type``, ``--max-seq-length``, ...); its ``--train`` is accepted and changes nothing, and
``--resume-adapter-file`` resumes the run whose folder holds the file.
"""

from __future__ import annotations

from pathlib import Path

import click

from mlx_persona.cli.errors import fail, log_to_stderr, user_errors
from mlx_persona.cli.options import model_option, name_flags, output_option, typed_flag

# Config key -> the option that sets it; a ConfigError about a key given as an option names the flag typed.
SETTINGS = {
    "model": "model", "data": "data", "output": "output", "method": "method", "steps": "steps",
    "epochs": "epochs", "batch_size": "batch_size", "optim.learning_rate": "learning_rate", "lora.rank": "rank",
    "lora.num_layers": "num_layers", "seed": "seed", "max_seq_len": "max_seq_len",
    "grad_accumulation": "grad_accumulation", "grad_checkpoint": "grad_checkpoint", "eval_every": "eval_every",
    "eval_batches": "eval_batches", "save_every": "save_every", "log_every": "log_every",
    "preference.start_from": "start_from",
}


def _resume_folder(file: str, output: str | None) -> str:
    """The run folder that ``--resume-adapter-file FILE`` resumes: the nearest folder above FILE (or FILE,
    a folder) holding a run's ``config.yaml``."""
    path = Path(file).expanduser()
    if not path.exists():
        from mlx_persona.runs import where

        fail(f"{typed_flag('resume_adapter_file')} {where(file)}: no such file or folder")
    folders = [path, *path.parents][:4] if path.is_dir() else [*path.parents][:3]
    run = next((f for f in folders if (f / "config.yaml").is_file()), None)
    if run is None:
        fail(f"{typed_flag('resume_adapter_file')} {file}: not in an output folder of `mlx-persona train` (no "
             "config.yaml beside it). A run resumes from its own folder's checkpoints (--resume -o RUN); "
             "starting a new run from other adapter weights is not supported.")
    if output is not None and Path(output).expanduser().absolute() != run.absolute():
        fail(f"{typed_flag('resume_adapter_file')} {file} resumes the run in {run}, but "
             f"{typed_flag('output')} names {output}; give one of them")
    return str(run)


@click.command(epilog="mlx_lm.lora's names are accepted where they mean the same; its --train changes nothing.")
@click.option("-c", "--config", "config_path", type=click.Path(), help="YAML config (see configs/).")
@model_option()
@click.option("--data", help="Folder with train.jsonl [+ valid.jsonl], or a .jsonl file.")
@output_option("--adapter-path", help="Output folder (the run folder).")
@click.option("--method", "--fine-tune-type", "method", type=click.Choice(["lora", "dora", "full", "dpo", "orpo"]),
              help="SFT: lora, dora, full; preference pairs: dpo, orpo (see preference.* in the config).")
@click.option("--from", "start_from", metavar="RUN_DIR",
              help="dpo/orpo: start from this run folder (its base + adapter, also DPO's reference) or a model.")
@click.option("--steps", "--iters", "steps", type=int, help="Optimizer steps (overrides epochs).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--learning-rate", type=float)
@click.option("--rank", type=int, help="LoRA rank.")
@click.option("--num-layers", type=int, help="Adapt the last N transformer blocks (-1 = all).")
@click.option("--seed", type=int)
@click.option("--max-seq-len", "--max-seq-length", "max_seq_len", type=int)
@click.option("--grad-accumulation", "--grad-accumulation-steps", "grad_accumulation", type=int)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option("--eval-every", "--steps-per-eval", "eval_every", type=int, help="Validation loss every N steps.")
@click.option("--eval-batches", "--val-batches", "eval_batches", type=int, help="-1 = the whole validation set.")
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--log-every", "--steps-per-report", "log_every", type=int, help="A metrics row every N steps.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any config key, e.g. --set lora.alpha=32.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output folder.")
@click.option("--resume", is_flag=True, help="Continue from the newest intact checkpoint in the output folder.")
@click.option("--resume-adapter-file", type=click.Path(), metavar="FILE",
              help="mlx_lm.lora's: resume the run whose folder holds FILE (= --resume -o RUN).")
@click.option("--force", is_flag=True, help="With --resume: continue even if the config changed.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--train", "train_flag", is_flag=True, hidden=True)  # mlx_lm.lora's "do train": what this does
def train(**params):
    """Fine-tune a model on chat data (LoRA, DoRA or full), or on preference pairs (DPO, ORPO)."""
    from mlx_persona.tuner import run as tuner_run
    from mlx_persona.tuner.config import ConfigError
    from mlx_persona.tuner.trainer import TrainingError

    try:
        cfg, resume = configure(params)
        tuner_run.run(cfg, resume=resume, force=params["force"], log=log_to_stderr)
    except TrainingError as e:
        fail(str(e), e.exit_code)
    except ConfigError as e:
        fail(name_flags(str(e), SETTINGS))
    except user_errors() as e:
        fail(str(e))


def configure(params: dict):
    """The validated TrainConfig and whether to resume, from the command's parameters (``--config``, the
    options, ``--set``); raises ConfigError naming the key."""
    from mlx_persona.tuner.config import load_config

    settings, resume = dict(params), params["resume"]
    if params["resume_adapter_file"] is not None:
        settings["output"], resume = _resume_folder(params["resume_adapter_file"], params["output"]), True
    overrides = {key: settings[name] for key, name in SETTINGS.items()}
    overrides.update({"overwrite": params["overwrite"], "progress": False if params["no_progress"] else None})
    return load_config(params["config_path"], overrides, params["sets"]), resume
