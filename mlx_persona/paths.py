"""Where things live: the shipped Bluey data, and the cache for what mlx_persona builds."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "bluey"


def cache_dir() -> Path:
    """Where mlx_persona keeps what it builds: models, kernels, libraries ($MLX_PERSONA_CACHE)."""
    return Path(os.environ.get("MLX_PERSONA_CACHE", Path.home() / ".cache" / "mlx_persona"))
