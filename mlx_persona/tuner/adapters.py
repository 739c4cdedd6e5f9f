"""What gets trained: :func:`attach_adapters` freezes the model and swaps ``Linear`` layers for mlx-lm's
``LoRALinear`` / ``DoRALinear`` (or unfreezes everything, embeddings included, for ``full``), and
returns the ``adapter_config.json`` that plain mlx-lm reads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def _module_keys(model, short_names: list[str]) -> set[str]:
    """Paths (relative to a transformer block) of the Linear layers named in `short_names`."""
    wanted = set(short_names)
    keys = set()
    for layer in model.layers:
        for path, module in layer.named_modules():
            if path.split(".")[-1] in wanted and isinstance(module, (nn.Linear, nn.QuantizedLinear)):
                keys.add(path)
    missing = wanted - {k.split(".")[-1] for k in keys}
    if missing:
        raise ValueError(f"lora.modules: no layer named {', '.join(sorted(missing))} in this model")
    return keys


def attach_adapters(model, method: str, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    modules: list[str] | None = None, num_layers: int = -1) -> dict:
    """Makes `model` trainable for `method` and returns its adapter config.

    Args:
        model: an mlx-lm model.
        method: ``lora``, ``dora`` or ``full`` (every weight, embeddings included).
        rank, alpha, dropout: LoRA settings; the scale is ``alpha / rank``.
        modules: short names of the Linear layers to adapt (``q_proj``, ``down_proj`` ...).
        num_layers: adapt the last N blocks; -1 = all.

    Returns:
        The dict written as ``adapter_config.json`` (mlx-lm's keys: ``fine_tune_type``, ``num_layers``,
        ``lora_parameters``).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    num_layers = n_layers if num_layers in (-1, None) else min(num_layers, n_layers)
    if method == "full":
        model.unfreeze()
        return {"fine_tune_type": "full", "num_layers": n_layers}
    if method not in ("lora", "dora"):
        raise ValueError(f"method must be lora, dora or full, not {method!r}")
    model.freeze()
    params = {"rank": rank, "scale": alpha / rank, "dropout": dropout,
              "keys": sorted(_module_keys(model, modules or []))}
    linear_to_lora_layers(model, num_layers, params, use_dora=(method == "dora"))
    return {"fine_tune_type": method, "num_layers": num_layers, "lora_parameters": params,
            "alpha": alpha}


def trainable_parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def save_adapters(model, out_dir: str | Path, adapter_config: dict) -> None:
    """Writes ``adapters.safetensors`` + ``adapter_config.json`` (mlx-lm's adapter layout)."""
    out_dir = Path(out_dir)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), weights)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def load_adapters(model, adapter_path: str | Path):
    """Applies a saved adapter folder (LoRA/DoRA adapters, or full weights) to `model`."""
    from mlx_lm.tuner.utils import load_adapters as _load

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").exists():
        # A full fine-tune writes a whole model folder; loading it replaces the weights.
        weights = adapter_path / "model.safetensors"
        if weights.exists():
            model.load_weights(str(weights), strict=False)
            return model
        raise FileNotFoundError(f"{adapter_path}: no adapter_config.json (not an adapter folder)")
    return _load(model, str(adapter_path))
