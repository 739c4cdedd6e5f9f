"""A Gemma 3 text model's hyper-parameters and weights, written the way llama.cpp's ``gemma3`` reads them.

Hyper-parameters (``gemma3.*``): context, embedding and feed-forward lengths, layers, query and key/value
heads, key/value length (``head_dim``), the RMSNorm epsilon, the RoPE base of the global layers and of
the sliding ones (``rope.freq_base_swa``), the sliding window and which layers slide
(``attention.sliding_window_pattern``: the period when the layers follow Gemma's every-Nth-is-global
rule, else one flag per layer), linear RoPE scaling and the final logit soft-cap when the config has
them. llama.cpp computes the rest itself: the embedding scale ``sqrt(hidden_size)`` (applied in f32),
the attention scale ``1/sqrt(head_dim)`` (so ``query_pre_attn_scalar`` must equal ``head_dim``) and the
tanh-approximated GELU.

Weights: the names come from gguf's own map for the architecture (``gguf.get_tensor_name_map``);
Gemma's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``, so every norm weight is stored plus one;
tied embeddings are written once (llama.cpp reuses ``token_embd`` as the output). Types per ``--dtype``:

=========  ===================================================================================
``f32``    every tensor f32
``f16``    matrices f16, norms f32
``q8_0``   matrices q8_0, norms f32
``q4_0``   matrices q4_0, the embedding (also the output layer) q8_0, norms f32
=========  ===================================================================================

A matrix whose rows do not split into the 32-value blocks of q8_0/q4_0 is written f16. Tensors are
converted and written one at a time, so memory stays at about one tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mlx_persona.export.errors import ExportError

__all__ = ["DTYPES", "add_hparams", "read_config", "tensor_plan", "write_tensors"]

DTYPES = ("f32", "f16", "q8_0", "q4_0")
_MODEL_TYPES = ("gemma3_text",)


def read_config(folder: Path) -> dict:
    """The folder's ``config.json``, checked to be a Gemma 3 text model llama.cpp can run exactly.

    Raises:
        ExportError: another architecture, or a setting llama.cpp's ``gemma3`` cannot express.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder}: no config.json; expected a Hugging Face model folder or a run folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") not in _MODEL_TYPES:
        raise ExportError(f"{path}: model_type {config.get('model_type')!r}; the GGUF export writes Gemma 3 text "
                          f"models ({', '.join(_MODEL_TYPES)})")
    head_dim = config.get("head_dim", 256)
    checks = [
        (config.get("query_pre_attn_scalar", head_dim) == head_dim,
         (f"query_pre_attn_scalar {config.get('query_pre_attn_scalar')} differs from head_dim {head_dim} "
          "(llama.cpp scales attention by 1/sqrt(head_dim))")),
        (config.get("attn_logit_softcapping") is None, "attention logit soft-capping is set (Gemma 3 has none)"),
        (config.get("hidden_activation", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
         f"hidden_activation {config.get('hidden_activation')!r} (llama.cpp's gemma3 uses tanh GELU)"),
        (not config.get("attention_bias"), "attention biases are set (llama.cpp's gemma3 has none)"),
        (not (config.get("quantization") or config.get("quantization_config")),
         "the weights are quantized; export a fused (de-quantized) folder"),
    ]
    for ok, why in checks:
        if not ok:
            raise ExportError(f"{path}: {why}")
    return config


def _layer_types(config: dict) -> list[str]:
    n = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types:
        return list(types)
    pattern = config.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def _rope(config: dict, kind: str, legacy_key: str, default: float) -> dict:
    params = config.get("rope_parameters") or {}
    params = params.get(kind, params) if isinstance(params, dict) else {}
    theta = params.get("rope_theta", config.get(legacy_key, default))
    scaling = params if params.get("rope_type") not in (None, "default") else (config.get("rope_scaling") or {})
    return {"theta": float(theta), "scaling": scaling}


def add_hparams(writer, config: dict) -> dict:
    """Writes the ``gemma3.*`` hyper-parameters; returns them (for tests and the log)."""
    import gguf

    n = config["num_hidden_layers"]
    head_dim = config.get("head_dim", 256)
    is_swa = [t == "sliding_attention" for t in _layer_types(config)]
    if len(is_swa) != n:
        raise ExportError(f"config.json: {len(is_swa)} layer_types for {n} layers")
    full, local = _rope(config, "full_attention", "rope_theta", 1_000_000.0), \
        _rope(config, "sliding_attention", "rope_local_base_freq", 10_000.0)
    hp = {"context_length": config.get("max_position_embeddings", 131072), "embedding_length": config["hidden_size"],
          "block_count": n, "feed_forward_length": config["intermediate_size"],
          "head_count": config["num_attention_heads"], "head_count_kv": config.get("num_key_value_heads", 1),
          "key_length": head_dim, "value_length": head_dim,
          "layer_norm_rms_eps": config.get("rms_norm_eps", 1e-6),
          "rope_freq_base": full["theta"], "rope_freq_base_swa": local["theta"]}
    for key, value in hp.items():
        getattr(writer, f"add_{key}")(value)
    if any(is_swa):
        hp["sliding_window"] = config["sliding_window"]
        writer.add_sliding_window(hp["sliding_window"])
        hp["sliding_window_pattern"] = _swa_pattern(is_swa)
        writer.add_sliding_window_pattern(hp["sliding_window_pattern"])
    scaling = full["scaling"]
    if scaling.get("rope_type", scaling.get("type")) == "linear" and scaling.get("factor"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        hp["rope_scaling_factor"] = float(scaling["factor"])
    elif scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ExportError(f"config.json: RoPE scaling {scaling.get('rope_type')!r} is not supported by this export")
    if config.get("final_logit_softcapping"):
        hp["final_logit_softcapping"] = float(config["final_logit_softcapping"])
        writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
    return hp


def _swa_pattern(is_swa: list[bool]) -> int | list[bool]:
    """Gemma's rule as llama.cpp's period (layer ``i`` slides unless ``i % N == N - 1``), else the flags."""
    for period in range(1, len(is_swa) + 1):
        if all(flag == (i % period < period - 1) for i, flag in enumerate(is_swa)):
            return period
    return list(is_swa)


def _load_weights(folder: Path) -> dict:
    """Every tensor of the folder's safetensors, as lazy MLX arrays (bf16 included, which numpy lacks)."""
    import mlx.core as mx

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    return weights


def tensor_plan(folder: Path, config: dict, dtype: str) -> list[tuple[str, str, object, tuple]]:
    """``(gguf name, HF name, GGML type, shape)`` for every tensor, in the order they are written."""
    import gguf

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    weights = _load_weights(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    if config.get("tie_word_embeddings", True):
        weights.pop("lm_head.weight", None)
    plan = []
    for key in sorted(weights, key=_order):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{folder}: tensor {key!r} has no llama.cpp gemma3 name")
        shape = tuple(weights[key].shape)
        plan.append((name, key, _ggml_type(name, shape, dtype), shape))
    return plan


def _order(key: str) -> tuple:
    """Embedding first, then the layers in number order, the final norm and output last."""
    parts = key.split(".")
    if "layers" in parts:
        return (1, int(parts[parts.index("layers") + 1]), key)
    return (0 if "embed" in key else 2, 0, key)


def _ggml_type(name: str, shape: tuple, dtype: str):
    import gguf

    t = gguf.GGMLQuantizationType
    if dtype == "f32" or len(shape) < 2:
        return t.F32
    want = {"f16": t.F16, "q8_0": t.Q8_0, "q4_0": t.Q4_0}[dtype]
    if want == t.Q4_0 and name in ("token_embd.weight", "output.weight"):
        want = t.Q8_0  # the output layer keeps more precision, as llama.cpp's quantizer does for it
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else t.F16


def _converted(array, name: str, qtype) -> np.ndarray:
    """The tensor as the bytes the file stores: norms plus one (Gemma's ``1 + w``), then the GGML type."""
    import gguf
    import mlx.core as mx

    data = np.asarray(array.astype(mx.float32))
    if name.endswith("norm.weight"):
        data = data + np.float32(1.0)
    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == t.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def write_tensors(writer, folder: Path, plan: list, log=None) -> None:
    """Declares every tensor of `plan`, writes the header and metadata, then streams the tensors.

    Args:
        writer: a `gguf.GGUFWriter` holding every key/value already; the file is written and closed here.
        folder: the model folder the plan was made from.
        plan: from :func:`tensor_plan`.
        log: optional ``log(str)`` for progress.
    """
    import gguf

    weights = _load_weights(folder)
    for name, _key, qtype, shape in plan:
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else \
            np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.uint8
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if dtype is np.uint8 else shape
        writer.add_tensor_info(name, byte_shape, np.dtype(dtype), _nbytes(shape, qtype),
                               raw_dtype=qtype if dtype is np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (name, key, qtype, _shape) in enumerate(plan):
        writer.write_tensor_data(_converted(weights.pop(key), name, qtype))
        if log and (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(plan)} tensors")
    writer.close()
