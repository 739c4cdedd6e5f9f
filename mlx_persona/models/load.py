"""Resolve a model spec to a local folder and load it with mlx-lm.

A spec is one of
- a local Hugging Face folder (``config.json`` + safetensors + tokenizer files);
- a hub id such as ``google/gemma-3-270m-it``, fetched with ``huggingface_hub`` (``HF_HUB_OFFLINE=1``
  is honoured: only the local cache is used); ``trust_remote_code`` is never enabled;
- ``builtin:NAME``: see :mod:`mlx_persona.models.builtin`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlx_persona.models.builtin import builtin_names, builtin_path
from mlx_persona.models.errors import ModelError

# The 270M base model is published without a -pt suffix; accept the name users reach for.
HUB_ALIASES = {"google/gemma-3-270m-pt": "google/gemma-3-270m"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model(spec: str | Path) -> Path:
    """Turns a model spec into a local folder (building or fetching it if needed).

    Args:
        spec: a local folder, a hub id, or ``builtin:NAME``.

    Returns:
        A local folder holding ``config.json``.
    """
    spec = str(spec)
    if spec.startswith("builtin:"):
        return builtin_path(spec.split(":", 1)[1])
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: not a model folder (no config.json)")
        return local
    if not _HUB_ID.match(spec):
        raise ModelError(f"{spec}: no such folder, and not a hub id (org/name) or builtin:NAME "
                         f"(built-ins: {', '.join(builtin_names())})")
    spec = HUB_ALIASES.get(spec, spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "it is not in the local cache and the hub cannot be reached"
        raise ModelError(f"{spec}: {why}. Download it once with network access "
                         f"(`hf download {spec}`), or use a local folder or builtin:tiny.") from None
    except GatedRepoError:
        raise ModelError(f"{spec}: gated on the hub; accept its licence and run `hf auth login`.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{spec}: no such repository on the hub (or it is private).") from None
    except OSError as e:
        raise ModelError(f"{spec}: could not be fetched ({type(e).__name__}).") from None


def load_model(spec: str | Path, adapter_path: str | Path | None = None, dtype: str = "auto"):
    """Loads a model and its tokenizer with mlx-lm.

    Args:
        spec: see :func:`resolve_model`.
        adapter_path: an output folder of `mlx-persona train` (adapters are applied, not fused).
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPU), ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        ``(model, tokenizer)``: an mlx-lm model in eval mode and mlx-lm's ``TokenizerWrapper``. On the
        Linux CPU backend its MLP and attention are :mod:`mlx_persona.backend.cpu_ops`'s, its RoPE
        :mod:`mlx_persona.backend.cpu_rope`'s and its quantized layers' products
        :mod:`mlx_persona.backend.quantized`'s (the same math).
    """
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlx_persona.backend import cpu_rewrites_enabled, dtype_from_name
    from mlx_persona.backend.cpu_ops import use_cpu_attention, use_fast_gelu
    from mlx_persona.backend.cpu_rope import use_table_rope
    from mlx_persona.backend.quantized import use_fast_quantized

    path = resolve_model(spec)
    try:
        model, tokenizer = mlx_load(str(path), tokenizer_config={"trust_remote_code": False},
                                    trust_remote_code=False)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"{path}: cannot be loaded by mlx-lm: {e}") from None
    _check_loaded(path, model, tokenizer)
    cast_model(model, dtype_from_name(dtype))
    if cpu_rewrites_enabled():  # Linux, CPU backend: Gemma's GELU, attention and RoPE written for it
        use_fast_gelu(model)
        use_cpu_attention()
        use_table_rope(model)
        use_fast_quantized(model)  # a quantized model's matmuls on our kernel (built on first use)
    if adapter_path is not None:
        from mlx_persona.tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
    model.eval()
    mx.eval(model.parameters())
    if cpu_rewrites_enabled():  # with MLX_PERSONA_MATMUL=bf16: every weight's bf16 copy, made once
        from mlx_persona.backend.pinned import pin_model

        pin_model(model)
    # The buffers freed while loading (the file's arrays, casts, checks) stay in MLX's cache; with them there,
    # every later op's allocation was slower (a 434 x 434 x 4 mx.where 0.45 -> 1.5 ms on the Linux CPU).
    mx.clear_cache()
    return model, tokenizer


def _check_loaded(path: Path, model, tokenizer) -> None:
    """A chat template that does not compile, or a weight holding NaN or inf, is a ModelError naming `path`.

    Chat templates are rendered with size limits from here on (:mod:`mlx_persona.data.template_limits`).
    The NaN/inf check is one pass over the weights, which are read here anyway.
    """
    from mlx.utils import tree_flatten

    from mlx_persona.data.template_limits import check_compiles
    from mlx_persona.data.tokenizer import unwrap_tokenizer
    from mlx_persona.safe_io import first_nonfinite

    problem = check_compiles(unwrap_tokenizer(tokenizer))
    if problem:
        raise ModelError(f"{path}: chat template failed: {problem}")
    bad = first_nonfinite(dict(tree_flatten(model.parameters())))
    if bad:
        raise ModelError(f"{path}: weight {bad} holds NaN or inf values")


def cast_model(model, dtype) -> None:
    """Casts floating-point, non-quantized parameters to `dtype` in place."""
    import mlx.core as mx

    model.set_dtype(dtype, predicate=lambda t: mx.issubdtype(t, mx.floating))
