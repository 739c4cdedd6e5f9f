"""ONNX export of a fused Gemma 3 text model, in the folder layout transformers.js loads.

The decoder graph is written op by op with ``onnx.helper`` from the fused safetensors (no PyTorch, no
optimum: optimum-onnx pins a transformers that cannot live next to mlx-lm). It computes what
transformers' ``Gemma3ForCausalLM`` computes, with the KV-cache interface of optimum/transformers.js:

=====================================  ==========  ======================================
name                                   dtype       shape
=====================================  ==========  ======================================
``input_ids``                          int64       [batch_size, sequence_length]
``attention_mask``                     int64       [batch_size, total_sequence_length]
``position_ids``                       int64       [batch_size, sequence_length]
``past_key_values.{i}.key|value``      float32     [batch_size, kv_heads, past_sequence_length, head_dim]
``logits`` (output)                    float32     [batch_size, sequence_length, vocab]
``present.{i}.key|value`` (output)     float32     [batch_size, kv_heads, total_sequence_length, head_dim]
=====================================  ==========  ======================================

``kv_heads`` and ``head_dim`` are numbers in the graph: transformers.js builds the empty first-step
cache from the graph's input metadata, treating every symbolic dimension but ``batch_size`` as 0.

Masks are built from slot indices, as transformers does (``cache_position``): query ``i`` of this
step is slot ``past + i``; key ``j`` is visible iff ``attention_mask[b, j]`` and ``j <= past + i``,
and on sliding layers also ``j > past + i - sliding_window``. RoPE uses ``position_ids`` (cos/sin are
computed in the graph from ``inv_freq * position``, so 0- and 1-based positions both work:
transformers.js feeds 1-based ones for ``gemma3_text``). The cache is never truncated; the window is
a mask.

In the q4 variant every projection and the LM head are ``MatMulNBits``, quantized by onnxruntime's
``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric), and the embedding gathers and de-quantizes its
rows from the LM head's 4-bit table (see :func:`mlx_persona.export.q4.gather_q4` for why not
``GatherBlockQuantized``). Norm weights stay fp32; activations and the KV cache are fp32.

What the export records in ``mlx_persona.json`` besides its inputs: q4's next-token agreement with fp32
(:func:`measure_q4_agreement`, when both are exported), the precision a page or ``pipeline()`` should load
by default (:func:`default_dtype`, also written as ``transformers.js_config.dtype``), and the persona's
name when a persona card sits next to the training data of the fused run (:func:`find_persona`).

Where the parts live: this module reads the fused folder, writes the export folder and holds the
command's flow (:func:`export_onnx`); :mod:`~mlx_persona.export.onnx_decoder` builds the graph
(:func:`build_decoder`); :mod:`~mlx_persona.export.q4` is the 4-bit code; :mod:`~mlx_persona.export.onnx_graph`
is the small graph-writing helper they share.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mlx_persona.export.errors import ExportError
from mlx_persona.export.onnx_decoder import build_decoder
from mlx_persona.export.onnx_graph import OPSET
from mlx_persona.export.q4 import Q4_BLOCK, quantize_matmul_q4
from mlx_persona.outputs import atomic_output_dir, check_output_dir, output_lock

__all__ = ["DTYPE_FILES", "OPSET", "Q4_MIN_AGREEMENT", "build_decoder", "default_dtype", "export_onnx", "find_persona",
           "measure_q4_agreement", "quantize_matmul_q4"]

# transformers.js file name per dtype (``onnx/model{suffix}.onnx``).
DTYPE_FILES = {"fp32": "model.onnx", "q4": "model_q4.onnx"}
# Past this many weight bytes an fp32 model keeps its weights in `<file>_data` (protobuf's limit is 2 GiB;
# writing them as the graph is built also keeps memory low).
EXTERNAL_DATA_THRESHOLD = 512 << 20
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# q4 is the default precision only when its greedy (argmax) next token equals fp32's at this share of the
# positions of AGREEMENT_TEXT. The random tiny model measures ~0.4 (its q4 replies are "and and and ...").
Q4_MIN_AGREEMENT = 0.9
# A chat exchange in Gemma's turn format (this export is for gemma3_text only); every position is scored.
AGREEMENT_TEXT = ("<start_of_turn>user\nHi! What did you do today, and what is your favourite game?<end_of_turn>\n"
                  "<start_of_turn>model\nHi! This morning I played in the backyard with my little sister. We built "
                  "a cubby house out of cushions and pretended it was a castle on a mountain. My favourite game is "
                  "the one where the floor is lava, because you have to jump from the couch to the chair without "
                  "touching the ground. What do you like to play?<end_of_turn>\n")


# --------------------------------------------------------------------------------------------------
# Reading the fused folder


def _load_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a folder written by `mlx-persona fuse`)")
    config = json.loads(path.read_text())
    if config.get("model_type") != "gemma3_text":
        raise ExportError(f"{hf_dir}: model_type {config.get('model_type')!r} is not supported; "
                          "the ONNX export is written for gemma3_text (Gemma 3 270M / 1B)")
    if config.get("quantization") or config.get("quantization_config"):
        raise ExportError(f"{hf_dir}: quantized weights; export the output of `mlx-persona fuse` instead")
    return config


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file as float32 arrays; F32 tensors are memory-mapped (no copy until used)."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw, shape, kind = data[start:end], info["shape"], info["dtype"]
        if kind == "F32":
            out[name] = raw.view("<f4").reshape(shape)
        elif kind == "F16":
            out[name] = raw.view("<f2").reshape(shape).astype(np.float32)
        elif kind == "BF16":  # the top half of a float32
            out[name] = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            raise ExportError(f"{path}: tensor {name} is {kind}; export the output of `mlx-persona fuse`")
    return out


def _load_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder as float32 numpy arrays."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors")
    weights = {}
    for f in files:
        weights.update(_read_safetensors(f))
    return weights



# --------------------------------------------------------------------------------------------------
# Writing


def onnx_save(model, path: Path) -> None:
    """Saves a model whose big weights already live in external data next to `path`."""
    import onnx

    onnx.save_model(model, str(path))
    _check_external_locations(path)


def save_model(model, path: Path, external: bool) -> list[str]:
    """Writes `path` (and ``<name>_data`` with all weights when `external`). Returns the file names."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if not external:
        onnx.save_model(model, str(path))
        return [path.name]
    data_name = path.name + "_data"  # the name transformers.js asks for, recorded in the .onnx
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024, convert_attribute=False)
    # onnx creates the data file private to its owner; it is served to browsers like the .onnx.
    (path.parent / data_name).chmod(path.stat().st_mode & 0o777)
    _check_external_locations(path)
    return [path.name, data_name]


def _check_external_locations(path: Path) -> None:
    """Every external-data location must be a plain file name inside the .onnx file's folder."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    for t in model.graph.initializer:
        if uses_external_data(t):
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            target = (folder / loc).resolve()
            if os.path.isabs(loc) or target.parent != folder or not target.is_file():
                raise ExportError(f"{path}: external data location {loc!r} is not a file next to it")


def _files_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())



# --------------------------------------------------------------------------------------------------
# What the export measures and finds (recorded in mlx_persona.json)


def measure_q4_agreement(folder: Path, config: dict) -> dict:
    """How often the q4 graph's greedy next token equals the fp32 graph's, over :data:`AGREEMENT_TEXT`.

    Both graphs of `folder` (``onnx/model.onnx``, ``onnx/model_q4.onnx``) run in onnxruntime over the
    whole text at once (1-based positions, an empty cache: what transformers.js feeds), and their argmax
    is compared at every position.

    Returns:
        ``{"next_token": share, "agreed": count, "positions": count, "seconds": time taken}``.
    """
    import onnxruntime as ort
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(AGREEMENT_TEXT, add_special_tokens=False).ids
    if config.get("bos_token_id") is not None:
        ids = [int(config["bos_token_id"])] + ids
    n = len(ids)
    empty = np.zeros((1, config["num_key_value_heads"], 0, config["head_dim"]), np.float32)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(1, n + 1, dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(config["num_hidden_layers"])
                for kv in ("key", "value")}}
    greedy = {}
    for dtype in ("fp32", "q4"):
        session = ort.InferenceSession(str(folder / "onnx" / DTYPE_FILES[dtype]), providers=["CPUExecutionProvider"])
        greedy[dtype] = session.run(["logits"], feeds)[0][0].argmax(-1)
        del session  # one model in memory at a time
    agreed = int((greedy["fp32"] == greedy["q4"]).sum())
    return {"next_token": round(agreed / n, 4), "agreed": agreed, "positions": n,
            "seconds": round(time.perf_counter() - t0, 2)}


def default_dtype(dtypes, q4_next_token: float | None) -> str:
    """The precision to load when none is asked for: fp32 when the folder has it, unless q4's next-token
    agreement with fp32 (:func:`measure_q4_agreement`) reached :data:`Q4_MIN_AGREEMENT`; else what there is."""
    dtypes = list(dtypes)
    if "fp32" not in dtypes:
        return dtypes[0]
    if "q4" in dtypes and q4_next_token is not None and q4_next_token >= Q4_MIN_AGREEMENT:
        return "q4"
    return "fp32"


def find_persona(provenance: dict, log=None) -> dict | None:
    """``{"name": ...}`` of the persona card (``persona.yaml``) next to the training data of the fused run.

    The fused folder's provenance names the adapter folder; its ``config.yaml`` (written by
    ``mlx-persona train``) names the data: a folder, or a ``.jsonl`` file whose folder is looked in. A
    relative data path is taken from the current folder, as ``train`` took it. None when any link is missing;
    a card that does not validate is reported to `log` and left out.
    """
    from mlx_persona.eval.persona import PersonaError, load_persona
    from mlx_persona.safe_io import InputError, load_yaml

    adapter = (provenance.get("fused") or {}).get("adapter")
    run_config = Path(adapter) / "config.yaml" if adapter else None
    if run_config is None or not run_config.is_file():
        return None
    try:
        data = load_yaml(run_config)
    except InputError:
        return None
    data = Path(str(data.get("data") or "")) if isinstance(data, dict) else None
    if data is None or data == Path():
        return None
    card = (data if data.is_dir() else data.parent) / "persona.yaml"
    if not card.is_file():
        return None
    try:
        return {"name": load_persona(card).name}
    except PersonaError as e:
        (log or (lambda m: None))(f"persona card left out: {str(e).splitlines()[0]}")
        return None


# --------------------------------------------------------------------------------------------------
# The export


def _check_source(hf_dir: Path, dtypes: tuple[str, ...]) -> dict:
    """The fused folder's config.json, after checking the dtypes and the files transformers.js needs."""
    bad = [d for d in dtypes if d not in DTYPE_FILES]
    if bad or not dtypes:
        raise ExportError(f"unknown dtype(s) {', '.join(bad) or '(none)'}; choose from {', '.join(DTYPE_FILES)}")
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such folder")
    config = _load_config(hf_dir)
    for name in _COPY_FILES[:2]:
        if not (hf_dir / name).exists():
            raise FileNotFoundError(f"{hf_dir}: no {name} (transformers.js needs it)")
    if "chat_template" not in json.loads((hf_dir / "tokenizer_config.json").read_text()):
        raise ExportError(f"{hf_dir}/tokenizer_config.json: no chat_template (transformers.js reads it only "
                          "from there); write the folder with `mlx-persona fuse`")
    return config


def _write_decoder(config: dict, weights: dict[str, np.ndarray], dtype: str, path: Path) -> bool:
    """Builds and saves one dtype's decoder at `path`; True when its weights are in external data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "q4":  # small: built in memory, weights saved beside it
        save_model(build_decoder(config, weights, q4=True), path, external=True)
        return True
    if sum(a.nbytes for a in weights.values()) > EXTERNAL_DATA_THRESHOLD:
        onnx_save(build_decoder(config, weights, data_file=path.parent / (path.name + "_data")), path)
        return True
    save_model(build_decoder(config, weights), path, external=False)
    return False


def _write_metadata(tmp: Path, hf_dir: Path, config: dict, dtypes: tuple[str, ...], external: dict[str, bool],
                    timings: dict[str, float], log) -> None:
    """The copied tokenizer files, config.json (with ``transformers.js_config``) and mlx_persona.json."""
    for name in _COPY_FILES:
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, tmp / name)
    agreement = measure_q4_agreement(tmp, config) if {"fp32", "q4"} <= set(dtypes) else None
    if agreement:
        log(f"q4 vs fp32: the same greedy next token at {agreement['agreed']}/{agreement['positions']} positions")
    dtype = default_dtype(dtypes, agreement and agreement["next_token"])
    out_config = dict(config)
    js = dict(out_config.get("transformers.js_config") or {})
    js["use_external_data_format"] = {name: True for name, ext in external.items() if ext}
    js["kv_cache_dtype"] = {d: "float32" for d in dtypes}
    js["dtype"] = dtype
    out_config["transformers.js_config"] = js
    (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    provenance = {}
    if (hf_dir / "mlx_persona.json").exists():  # where the fused model came from
        provenance = json.loads((hf_dir / "mlx_persona.json").read_text())
    persona = find_persona(provenance, log) or provenance.get("persona")
    (tmp / "mlx_persona.json").write_text(json.dumps({
        **provenance,
        **({"persona": persona} if persona else {}),
        "onnx": {"source": str(hf_dir.absolute()), "dtypes": list(dtypes), "opset": OPSET,
                 "q4_block_size": Q4_BLOCK, "seconds": {k: round(v, 2) for k, v in timings.items()},
                 "bytes": {d: sum((tmp / "onnx" / f).stat().st_size
                                  for f in (DTYPE_FILES[d], DTYPE_FILES[d] + "_data")
                                  if (tmp / "onnx" / f).exists()) for d in dtypes},
                 "q4_agreement": agreement, "q4_min_agreement": Q4_MIN_AGREEMENT,
                 "default_dtype": dtype}}, indent=2) + "\n")


def export_onnx(hf_dir, out_dir, dtypes=("fp32", "q4"), *, overwrite: bool = False, log=None) -> Path:
    """Exports a fused Gemma 3 folder to ONNX in the layout transformers.js loads.

    Args:
        hf_dir: a folder written by :func:`mlx_persona.export.hf.fuse` (config, safetensors, tokenizer).
        out_dir: the folder to write: ``config.json`` (with ``transformers.js_config``), tokenizer files,
            ``generation_config.json`` and ``onnx/model.onnx`` (fp32) / ``onnx/model_q4.onnx`` +
            ``onnx/model_q4.onnx_data`` (q4). Written next to itself, then renamed into place.
        dtypes: any of ``fp32``, ``q4``.
        overwrite: replace an existing non-empty `out_dir`.
        log: optional callable for progress lines.

    Returns:
        The written folder.
    """
    log = log or (lambda m: None)
    hf_dir = Path(hf_dir).expanduser()
    dtypes = tuple(dict.fromkeys(dtypes))
    config = _check_source(hf_dir, dtypes)
    # One writer per folder: the lock (beside out_dir) outlives atomic_output_dir's rename.
    with output_lock(out_dir):
        out = check_output_dir(out_dir, overwrite, inputs=(hf_dir,))

        t0 = time.perf_counter()
        weights = _load_weights(hf_dir)
        external, timings = {}, {}
        with atomic_output_dir(out) as tmp:
            for dtype in dtypes:
                t = time.perf_counter()
                path = tmp / "onnx" / DTYPE_FILES[dtype]
                external[path.name] = _write_decoder(config, weights, dtype, path)
                timings[dtype] = time.perf_counter() - t
                log(f"{dtype}: {path.relative_to(tmp)} in {timings[dtype]:.1f}s")
            _write_metadata(tmp, hf_dir, config, dtypes, external, timings, log)
        log(f"total {_files_size(out) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        return out
