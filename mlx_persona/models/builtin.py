"""The built-in models: real Gemma 3 text shapes with random weights, created in code and cached.

``builtin:tiny`` | ``builtin:gemma-3-270m`` | ``builtin:gemma-3-1b`` (also ``-it``/``-pt`` names) are
built on first use under ``cache_dir()/models`` (these machines cannot download weights); the tokenizer
is trained on the shipped data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx_persona.version import __version__
from mlx_persona.models.errors import ModelError
from mlx_persona.outputs import check_output_dir, output_lock
from mlx_persona.paths import DEFAULT_DATA, cache_dir

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
# Part of a built model's cache key: a model cached with an older tokenizer layout is built again.
TOKENIZER_FORMAT = "spm-gemma3"


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
    # One writer per folder: the lock (beside `out`) outlives the rename below.
    with output_lock(out):
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
                if any(out.iterdir()) and not overwrite:  # built meanwhile by a process without the lock
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
    key = f"{base}-{_data_fingerprint(DEFAULT_DATA)}-v{__version__}-{TOKENIZER_FORMAT}"
    path = cache_dir() / "models" / key
    if not (path / "config.json").exists():
        with output_lock(path, wait=True):  # another process (e.g. a second rank) may be building it
            if not (path / "config.json").exists():
                init_model(path, base)
    return path
