"""Models: resolve a model spec, load it with mlx-lm, and build the built-in models in code.

A spec is one of
- a local Hugging Face folder (``config.json`` + safetensors + tokenizer files);
- a hub id such as ``google/gemma-3-270m-it``, fetched with ``huggingface_hub`` (``HF_HUB_OFFLINE=1``
  is honoured: only the local cache is used); ``trust_remote_code`` is never enabled;
- ``builtin:tiny`` | ``builtin:gemma-3-270m`` | ``builtin:gemma-3-1b`` (also ``builtin:gemma-3-270m-it`` …):
  created in code and cached on disk, because these machines cannot download weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mlx_persona import __version__
from mlx_persona.outputs import check_output_dir
from mlx_persona.paths import DEFAULT_DATA, cache_dir

HUB_IDS = ("google/gemma-3-270m", "google/gemma-3-270m-it", "google/gemma-3-1b-pt", "google/gemma-3-1b-it")
# The 270M base model is published without a -pt suffix; accept the name users reach for.
HUB_ALIASES = {"google/gemma-3-270m-pt": "google/gemma-3-270m"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


class ModelError(Exception):
    """A model spec that cannot be resolved or loaded; the message says what to do."""


# Real Gemma 3 text shapes (from the published config.json files). The built-ins use them with random
# weights, so benchmarks exercise the true cost of the 262,144-token vocabulary.
_GEMMA_SHAPES = {
    "gemma-3-270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                         sliding_window_pattern=6, vocab_size=262144, max_position_embeddings=32768),
    "gemma-3-1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                       sliding_window_pattern=6, vocab_size=262144, max_position_embeddings=32768),
    # Small enough to train in seconds on two CPU cores. hidden_size is a power of four so sqrt(hidden)
    # is exact in bf16: mlx-lm rounds the embedding scale through bf16 and transformers does not.
    # A window of 16 with pattern 2 puts sliding and global layers, and the window edge, in every test.
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                 sliding_window_pattern=2, vocab_size=None, max_position_embeddings=2048),
}
TINY_TOKENIZER_VOCAB = 2048


def builtin_names() -> list[str]:
    return sorted(_GEMMA_SHAPES)


def gemma3_config(preset: str, vocab_size: int, special: dict[str, int]) -> dict:
    """config.json for a Gemma 3 text model, readable by both transformers and mlx-lm.

    transformers 5 reads ``layer_types`` and ``rope_parameters``; mlx-lm 0.32 reads
    ``sliding_window_pattern``, ``rope_theta`` and ``rope_local_base_freq``. We write both.
    """
    shape = dict(_GEMMA_SHAPES[preset])
    shape["vocab_size"] = shape["vocab_size"] or vocab_size
    pattern = shape["sliding_window_pattern"]
    n = shape["num_hidden_layers"]
    layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **shape,
        "layer_types": layer_types,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "pad_token_id": special["<pad>"],
        "bos_token_id": special["<bos>"],
        "eos_token_id": [special["<eos>"], special["<end_of_turn>"]],
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _data_fingerprint(data_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("train.jsonl",):
        p = data_dir / name
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _training_texts(data_dir: Path) -> list[str]:
    """Every message of the shipped training data, the corpus the tiny tokenizer is trained on."""
    texts = []
    path = data_dir / "train.jsonl"
    if not path.exists():
        raise ModelError(f"{path}: no such file; the built-in tokenizer is trained on the shipped data")
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            for m in row.get("messages", []):
                texts.append(m["content"])
    return texts


def init_model(out: str | Path, preset: str, *, seed: int = 0, overwrite: bool = False,
               data_dir: str | Path | None = None, dtype: str | None = None) -> Path:
    """Writes a random-weight Gemma 3 text model as a normal Hugging Face folder.

    Args:
        out: the folder to write (created; must not exist unless `overwrite`).
        preset: ``tiny``, ``gemma-3-270m`` or ``gemma-3-1b``.
        seed: weight initialisation seed.
        overwrite: replace an existing folder.
        data_dir: data whose ``train.jsonl`` trains the tokenizer (default: the shipped Bluey data).
        dtype: weight dtype on disk; default float32 for tiny, bfloat16 (as published) for Gemma shapes.

    Returns:
        The folder, loadable by mlx-lm and transformers.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.models import gemma3_text

    from mlx_persona.data.tokenizer import SPECIAL_TOKENS, train_tokenizer

    if preset not in _GEMMA_SHAPES:
        raise ModelError(f"unknown preset {preset!r}; choose one of {', '.join(builtin_names())}")
    out = check_output_dir(out, overwrite)
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA

    tokenizer = train_tokenizer(_training_texts(data_dir), vocab_size=TINY_TOKENIZER_VOCAB)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = gemma3_config(preset, len(tokenizer), special)
    dtype = dtype or ("float32" if preset == "tiny" else "bfloat16")
    config["torch_dtype"] = dtype

    args = gemma3_text.ModelArgs.from_dict(config)
    model = gemma3_text.Model(args)
    # Tied embeddings, as in the published checkpoints.
    model.tie_word_embeddings = True
    model.pop("lm_head")
    mx.random.seed(seed)
    std = config["initializer_range"]

    def init(path, p):
        # Gemma's RMSNorm scales by (1 + w): zeros are the identity.
        return mx.zeros_like(p) if "norm" in path else std * mx.random.normal(p.shape)

    model.update(tree_map_with_path(init, model.parameters()))
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        generation = {
            "bos_token_id": special["<bos>"],
            "pad_token_id": special["<pad>"],
            "eos_token_id": [special["<eos>"], special["<end_of_turn>"]],
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (tmp / "mlx_persona.json").write_text(json.dumps(
            {"preset": preset, "seed": seed, "random_weights": True, "mlx_persona": __version__,
             "tokenizer_data": _data_fingerprint(data_dir)}, indent=2) + "\n")
        if out.exists():
            if not overwrite:  # another process (e.g. a second rank) built it meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def builtin_path(name: str) -> Path:
    """The cached folder of a built-in model, built on first use."""
    base = name.removesuffix("-it").removesuffix("-pt")
    if base not in _GEMMA_SHAPES:
        raise ModelError(f"unknown built-in model {name!r}; choose one of "
                         + ", ".join(f"builtin:{n}" for n in builtin_names()))
    key = f"{base}-{_data_fingerprint(DEFAULT_DATA)}-v{__version__}"
    path = cache_dir() / "models" / key
    if not (path / "config.json").exists():
        init_model(path, base)
    return path


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
        ``(model, tokenizer)``: an mlx-lm model in eval mode and mlx-lm's ``TokenizerWrapper``.
    """
    import mlx.core as mx
    from mlx_lm.utils import load as mlx_load

    from mlx_persona.backend import dtype_from_name

    path = resolve_model(spec)
    try:
        model, tokenizer = mlx_load(str(path), tokenizer_config={"trust_remote_code": False},
                                    trust_remote_code=False)
    except (ValueError, FileNotFoundError) as e:
        raise ModelError(f"{path}: cannot be loaded by mlx-lm: {e}") from None
    cast_model(model, dtype_from_name(dtype))
    use_fast_gelu(model)
    use_cpu_attention()
    if adapter_path is not None:
        from mlx_persona.tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def _gelu_approx(x):
    # The same function as nn.gelu_approx, 0.5*x*(1 + tanh(u)) == x*sigmoid(2u) with u = sqrt(2/pi)*(x +
    # 0.044715*x^3), written with products instead of x**3: MLX's CPU backend computes ** with pow() and
    # tanh with libm one element at a time (~28 Melem/s here), while this fuses into one vectorised
    # kernel (~1000 Melem/s), forward and backward. Within 5e-7 of nn.gelu_approx; the same on a GPU.
    import mlx.core as mx

    return x * mx.sigmoid(1.5957691216057308 * x * (1.0 + 0.044715 * x * x))


_FAST_MLP: dict[type, type] = {}  # mlx-lm's MLP class -> our subclass


def use_fast_gelu(model) -> int:
    """Gives Gemma 3's MLP blocks the fused GELU above (same weights and keys; mlx-lm's class otherwise).

    Returns:
        The number of MLP blocks that have it.
    """
    import mlx.core as mx

    n = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        cls = type(getattr(layer, "mlp", None))
        if cls not in _FAST_MLP.values():
            if (cls.__module__, cls.__name__) != ("mlx_lm.models.gemma3_text", "MLP"):
                continue
            if cls not in _FAST_MLP:
                gelu = mx.compile(_gelu_approx, shapeless=True)
                _FAST_MLP[cls] = type("MLP", (cls,), {
                    "__call__": lambda self, x: self.down_proj(gelu(self.gate_proj(x)) * self.up_proj(x)),
                    "__doc__": "Gemma 3's MLP with a fused GELU (mlx_persona.models.use_fast_gelu)."})
            layer.mlp.__class__ = _FAST_MLP[cls]
        n += 1
    return n


def _composite_attention(queries, keys, values, scale, mask):
    """Softmax attention from MLX ops, for float32 on the CPU (the same math as mx.fast's).

    On the CPU, ``mx.fast.scaled_dot_product_attention`` runs its softmax in a kernel built for the
    baseline x86-64 with a scalar exp (~50 Melem/s here); written out, the exp fuses into a kernel built
    for this CPU (platform.setup_jit) and the grouped queries share one matmul per key head:
    gemma-3-270m shape, 4 x 96 tokens, 4.9 -> 2.0 ms per layer forward, 8.7 -> 6.0 with the backward.
    """
    import mlx.core as mx

    b, h, n, d = queries.shape
    kv, s_len = keys.shape[1], keys.shape[2]
    groups = h // kv
    q = (queries * scale).reshape(b, kv, groups * n, d)  # query heads of one key head, one after another
    scores = (q @ keys.swapaxes(-1, -2)).reshape(b, kv, groups, n, s_len)
    if isinstance(mask, str):  # "causal"; the queries are the last n of the s_len positions
        allowed = mx.arange(s_len)[None] <= mx.arange(n)[:, None] + (s_len - n)
        scores = mx.where(allowed, scores, -1e30)
    elif mask is not None:
        if mask.ndim == 4:  # [B or 1, heads or 1, n, s]: heads become (key head, group)
            mask = mask.reshape(mask.shape[0], -1 if mask.shape[1] == 1 else kv,
                                1 if mask.shape[1] == 1 else groups, n, s_len)
        scores = mx.where(mask, scores, -1e30) if mask.dtype == mx.bool_ else scores + mask
    p = _softmax()(scores).reshape(b, kv, groups * n, s_len)
    return (p @ values).reshape(b, h, n, d)


def _softmax_rows(scores):
    import mlx.core as mx

    scores = scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True))
    e = mx.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


@functools.lru_cache(maxsize=1)
def _softmax():
    """The softmax compiled once for any shape: fused even when the model runs eagerly (prompt processing
    in generation: 17 -> 3 ms per layer at 403 tokens); inside a compiled training step it is inlined."""
    import mlx.core as mx

    return mx.compile(_softmax_rows, shapeless=True)


_ORIGINAL_SDPA: dict = {}


def use_cpu_attention() -> None:
    """Routes Gemma 3's float32 attention over more than one query on the CPU to the one above.

    mlx-lm's Gemma 3 calls ``scaled_dot_product_attention`` from its module; the replacement hands
    everything else (GPU, bf16, decoding one token, quantized caches, sinks) to mlx-lm's own function.
    """
    import mlx.core as mx
    import mlx_lm.models.gemma3_text as gemma3

    if "gemma3" in _ORIGINAL_SDPA:
        return
    original = _ORIGINAL_SDPA["gemma3"] = gemma3.scaled_dot_product_attention

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if (sinks is None and not hasattr(cache, "bits") and queries.dtype == mx.float32 and queries.shape[2] > 1
                and mx.default_device() == mx.cpu):
            return _composite_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache, scale, mask, sinks)

    gemma3.scaled_dot_product_attention = scaled_dot_product_attention


def cast_model(model, dtype) -> None:
    """Casts floating-point, non-quantized parameters to `dtype` in place."""
    import mlx.core as mx

    model.set_dtype(dtype, predicate=lambda t: mx.issubdtype(t, mx.floating))
