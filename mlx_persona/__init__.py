"""mlx_persona: teach small chat models a personality on Apple's MLX."""

from mlx_persona import platform as _platform

# Must run before anything imports mlx.core (see platform.py).
_platform.setup()

__version__ = "0.1.0"
