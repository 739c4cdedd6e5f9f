"""Fuse adapters into the base weights and write a plain Hugging Face model folder.

The folder loads with ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` (no adapters, no
MLX), with mlx-lm, and is the input of :func:`mlx_persona.export.onnx.export_onnx`:

- ``model.safetensors``: HF parameter names (mlx-lm's Gemma 3 names are HF's), tied embeddings (no
  ``lm_head.weight``), metadata ``format=pt``, fp32 by default;
- ``config.json``: the base model's, without quantization keys, dtype set to what was written;
- ``tokenizer.json`` + ``tokenizer_config.json`` holding ``chat_template`` (transformers.js reads the
  template only from there);
- ``generation_config.json``: ``eos_token_id`` = [``<eos>``, ``<end_of_turn>``] and the generation
  defaults (the ``persona`` preset unless told otherwise), so ``model.generate(...)`` and
  transformers.js behave like ``mlx-persona generate``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlx_persona import __version__
from mlx_persona.export.errors import ExportError
from mlx_persona.outputs import atomic_output_dir, check_output_dir, output_lock
from mlx_persona.runs import adapter_config, resolve_run

__all__ = ["fuse", "fuse_model", "write_tokenizer", "write_generation_config"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
_DTYPES = ("float32", "bfloat16", "float16")
# Eos markers of Gemma chat models: the end of a model turn must stop generation everywhere.
EOS_TOKENS = ("<eos>", "<end_of_turn>")


def fuse_model(model) -> int:
    """Replaces every LoRA/DoRA layer of `model` by a plain (de-quantized) Linear, in place.

    Each adapter layer's own ``fuse(dequantize=True)`` computes ``W0 + scale * (B^T A^T)`` (LoRA; DoRA
    also rescales by its magnitude), as ``mlx_lm fuse`` does. Quantized layers that had no adapter
    are de-quantized too, so the result is a dense model.

    Returns:
        The number of layers fused.
    """
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model

    fused = [(name, module.fuse(dequantize=True)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    return len(fused)


def _base_keys(base: Path) -> set[str]:
    """Parameter names stored in the base folder's safetensors (quantization tensors left out)."""
    from safetensors import safe_open

    keys = set()
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            keys.update(k for k in st.keys() if not k.endswith((".scales", ".biases")))
    return keys


def write_tokenizer(tokenizer, base: Path, out: Path) -> str:
    """Writes ``tokenizer.json`` and a ``tokenizer_config.json`` that holds the chat template.

    The base folder's files are copied as they are (the most faithful copy of a published tokenizer);
    only when it has no ``tokenizer.json`` (a SentencePiece-only folder) is one saved from the loaded
    tokenizer. The template is the loaded tokenizer's, else Gemma's.

    Returns:
        The chat template written.
    """
    from mlx_persona.data.tokenizer import (
        GEMMA_CHAT_TEMPLATE,
        make_config_portable,
        save_tokenizer,
        unwrap_tokenizer,
    )

    inner = unwrap_tokenizer(tokenizer)
    template = getattr(inner, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is the chat template
        template = template.get("default")
    template = template or GEMMA_CHAT_TEMPLATE
    if (base / "tokenizer.json").exists():
        for name in _TOKENIZER_FILES:
            if (base / name).exists():
                shutil.copy2(base / name, out / name)
    else:
        save_tokenizer(inner, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template, in the config
    make_config_portable(out, template)
    return template


def _token_id(tokenizer, token: str) -> int | None:
    from mlx_persona.data.tokenizer import unwrap_tokenizer

    inner = unwrap_tokenizer(tokenizer)
    tid = inner.convert_tokens_to_ids(token)
    unk = getattr(inner, "unk_token_id", None)
    return None if tid is None or (tid == unk and token != getattr(inner, "unk_token", None)) else int(tid)


def write_generation_config(path: Path, tokenizer, base: Path, generation=None) -> dict:
    """Writes ``generation_config.json``: the base one, eos = [<eos>, <end_of_turn>], and `generation`.

    Args:
        path: the file to write.
        tokenizer: gives the ids of the eos markers.
        base: the base model folder (its generation_config.json is the starting point).
        generation: a :class:`mlx_persona.sampling.GenerationConfig`, a dict of its fields, or None
            for the ``persona`` preset.

    Returns:
        The dict written.
    """
    from mlx_persona.data.tokenizer import unwrap_tokenizer
    from mlx_persona.sampling import GenerationConfig, preset

    if generation is None:
        generation = preset("persona")
    elif isinstance(generation, dict):
        generation = GenerationConfig.from_dict(generation)
    src = base / "generation_config.json"
    cfg = json.loads(src.read_text()) if src.exists() else {}
    old_eos = cfg.get("eos_token_id")
    old_eos = [old_eos] if isinstance(old_eos, int) else list(old_eos or [])
    eos = [i for i in (_token_id(tokenizer, t) for t in EOS_TOKENS) if i is not None]
    cfg["eos_token_id"] = eos + [i for i in old_eos if i not in eos]
    for key in ("bos_token_id", "pad_token_id"):
        if key not in cfg:
            tid = getattr(unwrap_tokenizer(tokenizer), key, None)
            if tid is not None:
                cfg[key] = int(tid)
    for key in ("temperature", "top_k", "top_p", "min_p"):
        cfg.pop(key, None)  # stale sampling keys would override a greedy preset
    cfg.update(generation.to_hf_generation_config())
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def fuse(model_spec, adapter_dir, out_dir, *, overwrite: bool = False, generation=None,
         dtype: str = "float32") -> Path:
    """Fuses an adapter into its base model and writes a Hugging Face folder.

    Args:
        model_spec: the base model (a folder, hub id or ``builtin:NAME``), or a LoRA/DoRA run folder (its
            recorded base + its adapters); None = the ``model`` recorded in the adapter's
            ``adapter_config.json`` (a full fine-tune's folder is the model itself).
        adapter_dir: an output folder of ``mlx-persona train`` (LoRA/DoRA adapters, or a full
            fine-tune's model folder); None exports the model alone.
        out_dir: the folder to write; replaced in one rename when the export succeeds.
        overwrite: replace an existing non-empty `out_dir`.
        generation: generation defaults for ``generation_config.json`` (see
            :func:`write_generation_config`); None = the ``persona`` preset.
        dtype: weight dtype on disk: ``float32`` (default; exact on CPU), ``bfloat16`` or ``float16``.

    Returns:
        The written folder.

    Raises:
        ExportError: the output exists, the model cannot be written with HF names, or bad arguments.
        RunFolderError: no model, no such adapter folder, or an adapter run that names no base model.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_persona.models import load_model, resolve_model

    if dtype not in _DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    # A run folder: a LoRA/DoRA run is its recorded base + its adapters, a full fine-tune is the model itself.
    model_spec, adapter_dir = resolve_run(None if model_spec is None else str(model_spec),
                                          None if adapter_dir is None else str(adapter_dir))
    adapter = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    adapter_cfg = adapter_config(adapter)
    # One writer per folder: the lock (beside out_dir) outlives atomic_output_dir's rename.
    with output_lock(out_dir):
        base = resolve_model(model_spec)
        out = check_output_dir(out_dir, overwrite, inputs=(base, adapter))

        model, tokenizer = load_model(str(base), adapter_path=adapter, dtype="float32")
        n_fused = fuse_model(model)
        weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
        expected = _base_keys(base)
        if expected and set(weights) != expected and set(weights) != expected - {"lm_head.weight"}:
            extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
            raise ExportError(f"{base}: the fused parameters do not match the base checkpoint's names "
                              f"(unexpected: {extra[:3]}, missing: {missing[:3]}); this model type cannot be "
                              "exported as a Hugging Face folder")

        config = json.loads((base / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        config["torch_dtype"] = dtype
        config["dtype"] = dtype
        if "lm_head.weight" not in weights:
            config["tie_word_embeddings"] = True

        with atomic_output_dir(out) as tmp:
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_tokenizer(tokenizer, base, tmp)
            write_generation_config(tmp / "generation_config.json", tokenizer, base, generation)
            provenance = {}
            if (base / "mlx_persona.json").exists():
                provenance = json.loads((base / "mlx_persona.json").read_text())
            provenance.update({"mlx_persona": __version__, "fused": {
                "base": str(base), "model_spec": str(model_spec), "adapter": str(adapter) if adapter else None,
                "fine_tune_type": adapter_cfg.get("fine_tune_type"), "layers_fused": n_fused, "dtype": dtype}})
            (tmp / "mlx_persona.json").write_text(json.dumps(provenance, indent=2) + "\n")
        return out
