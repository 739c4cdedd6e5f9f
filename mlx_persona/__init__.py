"""mlx_persona: teach small chat models a personality on Apple's MLX."""

__version__ = "0.1.0"
