"""Training: ``config`` (TrainConfig, YAML), ``adapters`` (LoRA/DoRA/full), ``losses`` (the fused LM-head
cross-entropy, validation loss), ``batching`` (length-grouped batches and the shift of the loss mask),
``checkpoint`` (atomic save, exact resume), ``trainer`` (the loop), ``results`` (metrics and the written
result), ``progress`` (the progress bar) and ``run`` (``run(cfg)``: all of it for ``mlx-persona train``).

Nothing is imported here, so ``mlx_persona.tuner.config`` loads without MLX.
"""
