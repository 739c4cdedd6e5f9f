"""Where things live: the shipped Bluey data, and the cache for what mlx_persona builds.

The Bluey data (conversations, evaluation prompts, persona card) is package data, in
``mlx_persona/datasets/bluey`` (a checkout's ``data/bluey`` is a link to it, one copy of the files), so
an installed wheel has it wherever it runs. Its documented name is ``data/bluey``: a path that starts
with it (``data/bluey``, ``data/bluey/persona.yaml``) names the shipped file unless the current folder has
a ``data/bluey`` (a checkout's link, or a user's own copy), which wins as any other relative path would.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path, PurePath

SHIPPED_NAME = PurePath("data", "bluey")
# A wheel installs as plain files, so the package's resources are a folder on disk (not a zip).
DEFAULT_DATA = Path(str(resources.files("mlx_persona") / "datasets" / "bluey"))


def data_path(path: str | os.PathLike) -> Path:
    """`path`, or the shipped file it names: ``data/bluey[/...]`` where the current folder has no ``data/bluey``.

    Args:
        path: a path as a user wrote it (command line, config file, defaults).

    Returns:
        The shipped file when `path` is a relative ``data/bluey[/...]``, this folder has no ``data/bluey``
        and the shipped file exists; else ``Path(path)`` (so a message about a missing file names what was
        given).
    """
    given = Path(path)
    parts = PurePath(os.path.normpath(given)).parts
    if given.is_absolute() or parts[:len(SHIPPED_NAME.parts)] != SHIPPED_NAME.parts or os.path.lexists(SHIPPED_NAME):
        return given
    shipped = DEFAULT_DATA.joinpath(*parts[len(SHIPPED_NAME.parts):])
    return shipped if shipped.exists() else given


def cache_dir() -> Path:
    """Where mlx_persona keeps what it builds: models, kernels, libraries ($MLX_PERSONA_CACHE)."""
    return Path(os.environ.get("MLX_PERSONA_CACHE", Path.home() / ".cache" / "mlx_persona"))
