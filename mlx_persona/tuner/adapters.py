"""What gets trained: :func:`attach_adapters` freezes the model and swaps ``Linear`` layers for mlx-lm's
``LoRALinear`` / ``DoRALinear`` (or unfreezes everything, embeddings included, for ``full``), and
returns the ``adapter_config.json`` that plain mlx-lm reads back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_persona import safe_io
from mlx_persona.models.errors import ModelError


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


class AdapterError(ModelError):
    """An adapter folder that cannot be applied to the model; one line naming the file."""


_FINE_TUNE_TYPES = ("lora", "dora", "full")
MAX_RANK = 4096


def _read_adapter_config(path: Path) -> dict:
    """``adapter_config.json``, checked before it sizes any layer (a rank of 10**9 would allocate it)."""
    try:
        config = json.loads(safe_io.read_text(path, 1 << 16))
    except safe_io.InputError as e:
        raise AdapterError(str(e)) from None
    except ValueError as e:
        raise AdapterError(f"{path}: not valid JSON ({safe_io.clip(e, 120)})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    kind = config.setdefault("fine_tune_type", "lora")
    if kind not in _FINE_TUNE_TYPES:
        raise AdapterError(f"{path}: fine_tune_type is {safe_io.shorten(kind)}, expected lora, dora or full")
    if kind == "full":
        return config
    p = config.get("lora_parameters")
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    checks = [
        (isinstance(config.get("num_layers"), int) and config["num_layers"] >= 1, "num_layers", "an integer >= 1"),
        (isinstance(p, dict), "lora_parameters", "a mapping"),
        (isinstance(p, dict) and isinstance(p.get("rank"), int) and 1 <= p["rank"] <= MAX_RANK,
         "lora_parameters.rank", f"an integer in [1, {MAX_RANK}]"),
        (isinstance(p, dict) and num(p.get("scale")), "lora_parameters.scale", "a finite number"),
        (isinstance(p, dict) and num(p.get("dropout", 0.0)) and 0 <= p.get("dropout", 0.0) < 1,
         "lora_parameters.dropout", "a number in [0, 1)"),
        (isinstance(p, dict) and (p.get("keys") is None or (isinstance(p["keys"], list) and
                                                            all(isinstance(k, str) for k in p["keys"]))),
         "lora_parameters.keys", "a list of layer names"),
    ]
    for ok, key, expected in checks:
        if not ok:
            got = config.get(key) if "." not in key else (p or {}).get(key.split(".")[1])
            raise AdapterError(f"{path}: {key} is {safe_io.shorten(got)}, expected {expected}")
    return config


def _read_tensors(path: Path) -> dict:
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file, truncated or damaged? "
                           f"({safe_io.clip(' '.join(str(e).split()), 160)})") from None
    if not isinstance(weights, dict):
        raise AdapterError(f"{path}: not a safetensors file")
    return weights


def _dtype(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]  # mlx.core.float16 -> float16


def check_tensors(path: Path, weights: dict, expected: dict, require_all: bool = True) -> dict:
    """`weights` checked against the model's `expected` parameters (same names, shapes, floating-point,
    finite) and cast to the model's dtypes (a float16 adapter on a float32 model runs in float32).
    `require_all`: every expected tensor must be there (not so for mlx-lm's ``full`` adapters, which
    may hold only the layers trained).

    Raises:
        AdapterError: the first problem, naming `path` and the tensor.
    """
    unknown, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
    if unknown:
        raise AdapterError(f"{path}: {len(unknown)} tensors that this model has no place for, "
                           f"e.g. {safe_io.clip(unknown[0], 120)} (an adapter for another model?)")
    if missing and require_all:
        raise AdapterError(f"{path}: {len(missing)} tensors missing, e.g. {missing[0]} (an adapter for another "
                           "model or configuration?)")
    out = {}
    for name, w in weights.items():
        want = expected[name]
        if tuple(w.shape) != tuple(want.shape):
            raise AdapterError(f"{path}: {name} has shape {tuple(w.shape)}, the model expects {tuple(want.shape)}")
        if not mx.issubdtype(w.dtype, mx.floating):
            raise AdapterError(f"{path}: {name} is {_dtype(w.dtype)}, expected floating-point values "
                               f"(the model is {_dtype(want.dtype)})")
        out[name] = w if w.dtype == want.dtype else w.astype(want.dtype)
    bad = safe_io.first_nonfinite(weights)
    if bad:
        raise AdapterError(f"{path}: {bad} holds NaN or inf values")
    return out


def load_adapters(model, adapter_path: str | Path):
    """Applies a saved adapter folder (LoRA/DoRA adapters, or full weights) to `model`.

    Every tensor is checked first (:func:`check_tensors`): a truncated file, a missing, unknown or
    misshapen tensor, integer values or NaN/inf are an :class:`AdapterError` naming the file; float16 or
    bfloat16 adapters are cast to the model's dtype.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapter_config.json").exists():
        # A full fine-tune writes a whole model folder; loading it replaces the weights.
        file = adapter_path / "model.safetensors"
        if file.exists():
            expected = dict(tree_flatten(model.parameters()))
            model.load_weights(list(check_tensors(file, _read_tensors(file), expected).items()), strict=False)
            return model
        raise FileNotFoundError(f"{adapter_path}: no adapter_config.json (not an adapter folder)")
    config = _read_adapter_config(adapter_path / "adapter_config.json")
    kind = config["fine_tune_type"]
    if kind != "full":
        try:
            linear_to_lora_layers(model, min(config["num_layers"], len(model.layers)), config["lora_parameters"],
                                  use_dora=kind == "dora")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AdapterError(f"{adapter_path / 'adapter_config.json'}: does not fit this model "
                               f"({safe_io.clip(e, 120)})") from None
    file = adapter_path / "adapters.safetensors"
    params = dict(tree_flatten(model.parameters()))
    expected = params if kind == "full" else {k: v for k, v in params.items()
                                              if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")}
    weights = check_tensors(file, _read_tensors(file), expected, require_all=kind != "full")
    model.load_weights(list(weights.items()), strict=False)
    return model
