"""``run(cfg)``: load the model and data, attach adapters, run the trainer, write the results."""

from mlx_persona.tuner.trainer import train as run  # noqa: F401  (being split out of the trainer)
