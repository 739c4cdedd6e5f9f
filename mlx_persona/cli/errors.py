"""How commands end on the user's mistakes: a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import click


def fail(message: str, code: int = 1):
    """User mistakes end with a clear message and a non-zero exit, never a traceback."""
    click.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def user_errors():
    """Exception types that are the user's to fix (bad data, config, model spec)."""
    from mlx_persona.data import DataError
    from mlx_persona.eval.persona import PersonaError
    from mlx_persona.models import ModelError
    from mlx_persona.outputs import OutputError
    from mlx_persona.runs import RunFolderError
    from mlx_persona.safe_io import InputError, WriteError
    from mlx_persona.tuner.config import ConfigError

    # InputError: a file read within bounds failed (bad UTF-8, YAML aliases); WriteError: a full disk.
    return (ConfigError, DataError, ModelError, OutputError, PersonaError, RunFolderError, InputError, WriteError,
            FileNotFoundError)


def log_to_stderr(message):
    """Progress lines go to stderr so stdout stays the command's result."""
    click.echo(message, err=True)
