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
rows from the LM head's 4-bit table (see :func:`_gather_q4` for why not ``GatherBlockQuantized``).
Norm weights stay fp32; activations and the KV cache are fp32.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mlx_persona.export import ExportError
from mlx_persona.outputs import atomic_output_dir, check_output_dir

__all__ = ["export_onnx", "build_decoder", "quantize_matmul_q4", "DTYPE_FILES", "OPSET"]

# transformers.js file name per dtype (``onnx/model{suffix}.onnx``).
DTYPE_FILES = {"fp32": "model.onnx", "q4": "model_q4.onnx"}
OPSET = 21  # onnxruntime >= 1.18 and onnxruntime-web run it (ReduceMean/Split take axes as inputs)
IR_VERSION = 10
Q4_BLOCK = 32
# Past this many weight bytes an fp32 model keeps its weights in `<file>_data` (protobuf's limit is 2 GiB;
# writing them as the graph is built also keeps memory low).
EXTERNAL_DATA_THRESHOLD = 512 << 20
_COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_NEG = float(np.finfo(np.float32).min)


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


def _transposed(a: np.ndarray, rows: int = 1024) -> np.ndarray:
    """``a.T`` as a contiguous array, copied in row blocks (7x faster than numpy's copy of a big ``.T``)."""
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    for i in range(0, a.shape[0], rows):
        out[:, i:i + rows] = a[i:i + rows].T
    return out


def _layer_types(config: dict) -> list[str]:
    n = config["num_hidden_layers"]
    types = config.get("layer_types")
    if not types:
        pattern = config.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
        raise ExportError(f"config.json: unexpected layer_types {types}")
    return list(types)


def _rope(config: dict, layer_type: str) -> tuple[float, float]:
    """(base, linear scaling factor) of one layer type, from transformers 5 or older config keys."""
    params = config.get("rope_parameters") or {}
    if layer_type in params:  # transformers >= 5: one entry per layer type
        p = params[layer_type] or {}
    elif layer_type == "full_attention":
        p = {"rope_theta": config.get("rope_theta", 1_000_000.0), **(config.get("rope_scaling") or {})}
    else:
        p = {"rope_theta": config.get("rope_local_base_freq", 10_000.0)}
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ExportError(f"config.json: RoPE type {kind!r} ({layer_type}) is not supported")
    factor = float(p.get("factor", 1.0)) if kind == "linear" else 1.0
    base = p.get("rope_theta") or (config.get("rope_theta", 1e6) if layer_type == "full_attention"
                                   else config.get("rope_local_base_freq", 1e4))
    return float(base), factor


# --------------------------------------------------------------------------------------------------
# Graph construction


class _Graph:
    """A tiny helper over onnx.helper: unique names, initializers, one call per op.

    With `data_file`, every initializer of 1 KiB or more is written there as it is created (offsets
    aligned to 4 KiB, so onnxruntime can memory-map them) and referenced from the graph, so a model
    larger than protobuf's 2 GiB limit is never held in memory twice.
    """

    def __init__(self, data_file: Path | None = None):
        self.nodes, self.inits, self._names = [], [], set()
        self._arrays = []  # (name, array) written into the model at the end, copied once
        self.data_file = data_file
        self._data = open(data_file, "wb") if data_file else None

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, helper, numpy_helper

        name = self._unique(name)
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(array, name))
            return name
        if self._data is None:
            self._arrays.append((name, array))
            return name
        offset = (self._data.tell() + 4095) // 4096 * 4096
        self._data.seek(offset)
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_file.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(tensor)
        return name

    def close(self):
        if self._data is not None:
            self._data.close()

    def add_weights(self, model) -> None:
        """Moves the in-memory weights into `model` (protobuf's make_graph/make_model would copy them twice)."""
        from onnx import helper

        while self._arrays:
            name, array = self._arrays.pop(0)
            t = model.graph.initializer.add()
            t.name, t.data_type = name, helper.np_dtype_to_tensor_dtype(array.dtype)
            t.dims.extend(array.shape)
            t.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            del array

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.init(name, np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs):
        from onnx import helper

        name = self._unique(name)
        outs = [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]


def build_decoder(config: dict, weights: dict[str, np.ndarray], *, q4: bool = False,
                  data_file: Path | None = None):
    """The Gemma 3 decoder with KV cache as an ``onnx.ModelProto``.

    Args:
        config: the folder's ``config.json``.
        weights: HF-named float32 arrays (``model.embed_tokens.weight``, ``model.layers.{i}...``).
        q4: 4-bit weights (see :func:`quantize_matmul_q4`): every projection and the LM head become
            ``MatMulNBits``, and the embedding gathers its rows from the LM head's 4-bit table. Otherwise
            fp32, with the tied embedding reused as the LM head without a copy: ``Transpose(MatMul(E, h^T))``.
        data_file: write the weights to this file (external data, named in the graph by its file name)
            instead of into the model; save the model next to it with ``onnx.save_model``.

    Returns:
        The model (opset 21, IR 10; plus ``com.microsoft`` 1 for q4).
    """
    from onnx import TensorProto, helper

    hidden = config["hidden_size"]
    n_heads, n_kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    n_layers, eps = config["num_hidden_layers"], float(config.get("rms_norm_eps", 1e-6))
    window = int(config["sliding_window"])
    groups = n_heads // n_kv
    types = _layer_types(config)
    scaling = float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5
    attn_cap = config.get("attn_logit_softcapping")
    final_cap = config.get("final_logit_softcapping")
    embed = weights["model.embed_tokens.weight"]
    vocab = embed.shape[0]
    head = weights.get("lm_head.weight")
    tied = head is None or config.get("tie_word_embeddings", True)
    g = _Graph(data_file)

    def w(name):
        try:
            return weights[name]
        except KeyError:
            raise ExportError(f"model.safetensors: missing tensor {name}") from None

    def rms_norm(x, weight_name, prefix):
        # x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, as Gemma3RMSNorm.
        sq = g.op("Mul", [x, x], f"{prefix}/Mul")
        ms = g.op("ReduceMean", [sq, axes_last], f"{prefix}/ReduceMean", keepdims=1)
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps_c], f"{prefix}/Add")], f"{prefix}/Sqrt")],
                 f"{prefix}/Reciprocal")
        scale = g.init(f"{weight_name}_plus_one", (1.0 + w(weight_name)).astype(np.float32))
        return g.op("Mul", [g.op("Mul", [x, r], f"{prefix}/Normalize"), scale], f"{prefix}/Scale")

    def linear(x, weight_name, prefix):
        weight = w(weight_name)  # HF layout: [out, in]
        base = weight_name.removesuffix(".weight")
        if q4:
            packed, scales, attrs = quantize_matmul_q4(weight)
            tables = [g.init(f"{base}.weight_Q4", packed), g.init(f"{base}.weight_scales", scales)]
            return g.op("MatMulNBits", [x, *tables], f"{prefix}/MatMulNBits", domain="com.microsoft", **attrs)
        return g.op("MatMul", [x, g.init(f"{base}.weight_T", _transposed(weight))], f"{prefix}/MatMul")

    def rotate(x, cos, sin, prefix):
        x1, x2 = g.op("Split", [x], f"{prefix}/Split", n_out=2, axis=-1, num_outputs=2)
        rot = g.op("Concat", [g.op("Neg", [x2], f"{prefix}/Neg"), x1], f"{prefix}/Concat", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], f"{prefix}/MulCos"), g.op("Mul", [rot, sin], f"{prefix}/MulSin")],
                    f"{prefix}/Add")

    # Shared constants.
    axes_last = g.const("axes_last", [-1])
    eps_c = g.init("rms_eps", np.array(eps, np.float32))
    neg = g.init("mask_min", np.array(_NEG, np.float32))
    zero_i = g.const("zero", 0)
    one_i = g.const("one", 1)

    # Lengths: past (from the cache), this step (from input_ids), total (from attention_mask).
    past_len = g.op("Shape", ["past_key_values.0.key"], "/model/past_len", start=2, end=3)
    seq_len = g.op("Shape", ["input_ids"], "/model/seq_len", start=1, end=2)
    total_len = g.op("Shape", ["attention_mask"], "/model/total_len", start=1, end=2)
    past_s = g.op("Squeeze", [past_len, g.const("axis0", [0])], "/model/past_scalar")
    end_s = g.op("Add", [past_s, g.op("Squeeze", [seq_len, g.const("axis0", [0])], "/model/seq_scalar")],
                 "/model/end_scalar")
    total_s = g.op("Squeeze", [total_len, g.const("axis0", [0])], "/model/total_scalar")

    # Masks [batch, 1, 1, seq, total] (the extra axis is the GQA group axis of the scores).
    q_slot = g.op("Unsqueeze", [g.op("Range", [past_s, end_s, one_i], "/model/mask/q_range"), g.const("axis1", [1])],
                  "/model/mask/q_slot")                                         # [S, 1]
    k_slot = g.op("Unsqueeze", [g.op("Range", [zero_i, total_s, one_i], "/model/mask/k_range"),
                                g.const("axis0", [0])], "/model/mask/k_slot")  # [1, T]
    causal = g.op("LessOrEqual", [k_slot, q_slot], "/model/mask/causal")
    in_window = g.op("Greater", [k_slot, g.op("Sub", [q_slot, g.const("window", window)], "/model/mask/q_minus_w")],
                     "/model/mask/in_window")
    sliding = g.op("And", [causal, in_window], "/model/mask/sliding")
    pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "/model/mask/pad_bool", to=TensorProto.BOOL),
                             g.const("axes_pad", [1, 2, 3])], "/model/mask/pad")  # [B, 1, 1, 1, T]
    masks = {}
    for kind, m in (("full_attention", causal), ("sliding_attention", sliding)):
        masks[kind] = g.op("And", [pad, m], f"/model/mask/{kind}")

    # RoPE cos/sin [batch, 1, seq, head_dim] per layer type, from the positions fed.
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "/model/rope/pos_float", to=TensorProto.FLOAT),
                             g.const("axis2", [2])], "/model/rope/pos")  # [B, S, 1]
    rope = {}
    for kind in sorted(set(types)):
        base, factor = _rope(config, kind)
        # As transformers: inv_freq = 1 / base^(arange(0, d, 2) / d) in fp32, divided by a linear factor.
        inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                                                / np.float32(head_dim)))
        inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
        freqs = g.op("Mul", [pos, g.init(f"rope_inv_freq_{kind}", inv_freq)], f"/model/rope/{kind}/freqs")
        emb = g.op("Concat", [freqs, freqs], f"/model/rope/{kind}/emb", axis=-1)
        cos = g.op("Unsqueeze", [g.op("Cos", [emb], f"/model/rope/{kind}/Cos"), g.const("axis1", [1])],
                   f"/model/rope/{kind}/cos")
        sin = g.op("Unsqueeze", [g.op("Sin", [emb], f"/model/rope/{kind}/Sin"), g.const("axis1", [1])],
                   f"/model/rope/{kind}/sin")
        rope[kind] = (cos, sin)

    # Embedding x sqrt(hidden): transformers' fp32 value (mlx-lm rounds it through bf16).
    if q4:
        if not tied:
            raise ExportError("q4 shares one 4-bit table between the embedding and the LM head, which needs "
                              "tied embeddings (every Gemma 3 checkpoint has them)")
        # Quantized first, so that the embedding can read its table; the MatMul node comes at the end.
        packed, scales, head_attrs = quantize_matmul_q4(embed)
        head_q4 = [g.init("lm_head.weight_Q4", packed), g.init("lm_head.weight_scales", scales)]
        del packed, scales
        h = _gather_q4(g, head_q4[0], head_q4[1], head_attrs["K"], head_attrs["block_size"])
    else:
        emb_w = g.init("model.embed_tokens.weight", embed)
        h = g.op("Gather", [emb_w, "input_ids"], "/model/embed_tokens/Gather", axis=0)
    h = g.op("Mul", [h, g.init("embed_scale", np.array(math.sqrt(hidden), np.float32))], "/model/embed_tokens/Scale")

    shape_q = g.const("shape_q", [0, 0, n_heads, head_dim])
    shape_kv = g.const("shape_kv", [0, 0, n_kv, head_dim])
    shape_q5 = g.const("shape_q5", [0, n_kv, groups, -1, head_dim])
    shape_o4 = g.const("shape_o4", [0, n_heads, -1, head_dim])
    shape_o3 = g.const("shape_o3", [0, 0, n_heads * head_dim])
    c_scale = g.init("attn_scaling", np.array(scaling, np.float32))
    c_half, c_one = g.init("half", np.array(0.5, np.float32)), g.init("one_f", np.array(1.0, np.float32))
    c_gelu_a = g.init("gelu_a", np.array(math.sqrt(2.0 / math.pi), np.float32))
    c_gelu_b = g.init("gelu_b", np.array(0.044715, np.float32))
    presents = []
    for i in range(n_layers):
        p, pre = f"model.layers.{i}", f"/model/layers.{i}"
        kind = types[i]
        cos, sin = rope[kind]
        x = rms_norm(h, f"{p}.input_layernorm.weight", f"{pre}/input_layernorm")
        q = g.op("Reshape", [linear(x, f"{p}.self_attn.q_proj.weight", f"{pre}/self_attn/q_proj"), shape_q],
                 f"{pre}/self_attn/q_reshape")
        k = g.op("Reshape", [linear(x, f"{p}.self_attn.k_proj.weight", f"{pre}/self_attn/k_proj"), shape_kv],
                 f"{pre}/self_attn/k_reshape")
        v = g.op("Reshape", [linear(x, f"{p}.self_attn.v_proj.weight", f"{pre}/self_attn/v_proj"), shape_kv],
                 f"{pre}/self_attn/v_reshape")
        q = rms_norm(q, f"{p}.self_attn.q_norm.weight", f"{pre}/self_attn/q_norm")
        k = rms_norm(k, f"{p}.self_attn.k_norm.weight", f"{pre}/self_attn/k_norm")
        q = g.op("Transpose", [q], f"{pre}/self_attn/q_transpose", perm=[0, 2, 1, 3])  # [B, H, S, D]
        k = g.op("Transpose", [k], f"{pre}/self_attn/k_transpose", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], f"{pre}/self_attn/v_transpose", perm=[0, 2, 1, 3])
        q = rotate(q, cos, sin, f"{pre}/self_attn/q_rope")
        k = rotate(k, cos, sin, f"{pre}/self_attn/k_rope")
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], f"{pre}/self_attn/k_cache", axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], f"{pre}/self_attn/v_cache", axis=2)
        presents += [k_all, v_all]
        # GQA without copying the cache: queries grouped per kv head, keys broadcast over the group.
        q5 = g.op("Reshape", [q, shape_q5], f"{pre}/self_attn/q_groups")                       # [B, KV, G, S, D]
        k5 = g.op("Unsqueeze", [k_all, g.const("axis2", [2])], f"{pre}/self_attn/k_groups")   # [B, KV, 1, T, D]
        v5 = g.op("Unsqueeze", [v_all, g.const("axis2", [2])], f"{pre}/self_attn/v_groups")
        kt = g.op("Transpose", [k5], f"{pre}/self_attn/k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Mul", [g.op("MatMul", [q5, kt], f"{pre}/self_attn/qk"), c_scale], f"{pre}/self_attn/scale")
        if attn_cap:
            cap = g.init(f"{p}.attn_cap", np.array(attn_cap, np.float32))
            scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap], f"{pre}/self_attn/cap_div")],
                                       f"{pre}/self_attn/cap_tanh"), cap], f"{pre}/self_attn/cap_mul")
        scores = g.op("Where", [masks[kind], scores, neg], f"{pre}/self_attn/mask")
        probs = g.op("Softmax", [scores], f"{pre}/self_attn/Softmax", axis=-1)
        o = g.op("MatMul", [probs, v5], f"{pre}/self_attn/pv")                                  # [B, KV, G, S, D]
        o = g.op("Reshape", [o, shape_o4], f"{pre}/self_attn/o_heads")
        o = g.op("Transpose", [o], f"{pre}/self_attn/o_transpose", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, shape_o3], f"{pre}/self_attn/o_reshape")
        o = linear(o, f"{p}.self_attn.o_proj.weight", f"{pre}/self_attn/o_proj")
        h = g.op("Add", [h, rms_norm(o, f"{p}.post_attention_layernorm.weight", f"{pre}/post_attention_layernorm")],
                 f"{pre}/attn_residual")
        x = rms_norm(h, f"{p}.pre_feedforward_layernorm.weight", f"{pre}/pre_feedforward_layernorm")
        gate = linear(x, f"{p}.mlp.gate_proj.weight", f"{pre}/mlp/gate_proj")
        up = linear(x, f"{p}.mlp.up_proj.weight", f"{pre}/mlp/up_proj")
        # gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", [g.op("Mul", [gate, gate], f"{pre}/mlp/gelu/sq"), gate], f"{pre}/mlp/gelu/cube")
        inner = g.op("Mul", [g.op("Add", [gate, g.op("Mul", [cube, c_gelu_b], f"{pre}/mlp/gelu/b")],
                                  f"{pre}/mlp/gelu/add"), c_gelu_a], f"{pre}/mlp/gelu/a")
        act = g.op("Mul", [g.op("Mul", [gate, c_half], f"{pre}/mlp/gelu/half"),
                           g.op("Add", [g.op("Tanh", [inner], f"{pre}/mlp/gelu/Tanh"), c_one], f"{pre}/mlp/gelu/one")],
                   f"{pre}/mlp/gelu/out")
        y = linear(g.op("Mul", [act, up], f"{pre}/mlp/gate_up"), f"{p}.mlp.down_proj.weight", f"{pre}/mlp/down_proj")
        h = g.op("Add", [h, rms_norm(y, f"{p}.post_feedforward_layernorm.weight", f"{pre}/post_feedforward_layernorm")],
                 f"{pre}/mlp_residual")

    h = rms_norm(h, "model.norm.weight", "/model/norm")
    if q4:
        logits = g.op("MatMulNBits", [h, *head_q4], "/lm_head/MatMulNBits", domain="com.microsoft", **head_attrs)
    elif not tied:
        logits = linear(h, "lm_head.weight", "/lm_head")
    else:
        # [V, H] @ [B, H, S] -> [B, V, S]: reuses the embedding table as it is stored.
        ht = g.op("Transpose", [h], "/lm_head/h_t", perm=[0, 2, 1])
        logits = g.op("Transpose", [g.op("MatMul", [emb_w, ht], "/lm_head/MatMul")], "/lm_head/logits_t",
                      perm=[0, 2, 1])
    if final_cap:
        cap = g.init("final_logit_cap", np.array(final_cap, np.float32))
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], "/lm_head/cap_div")], "/lm_head/cap_tanh"),
                              cap], "/lm_head/cap_mul")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    for i, name in enumerate(presents):
        kv = "key" if i % 2 == 0 else "value"
        g.nodes.append(helper.make_node("Identity", [name], [f"present.{i // 2}.{kv}"], name=f"/present.{i // 2}.{kv}"))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", vocab])]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                        ["batch_size", n_kv, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                         ["batch_size", n_kv, "total_sequence_length", head_dim]))
    g.close()
    graph = helper.make_graph(g.nodes, "gemma3_text_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if q4 else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="mlx_persona", ir_version=IR_VERSION)
    g.add_weights(model)
    return model


def quantize_matmul_q4(weight: np.ndarray, block_size: int = Q4_BLOCK) -> tuple[np.ndarray, np.ndarray, dict]:
    """One ``[out, in]`` weight as onnxruntime's ``MatMulNBitsQuantizer`` writes it (4 bits, symmetric).

    The quantizer runs on a one-node model ``MatMul(x, W^T)``, so only one weight is ever held twice
    (quantizing the whole fp32 graph at once needed ~4x the model's size in memory).

    Returns:
        ``(packed, scales, attributes)`` of the ``com.microsoft.MatMulNBits`` node it made: ``packed`` is
        uint8 ``[out, in / block, block / 2]`` (low nibble first, zero point 8), ``scales`` float32
        ``[out, in / block]``, attributes ``K``, ``N``, ``bits``, ``block_size``.
    """
    import logging

    from onnx import TensorProto, helper, numpy_helper

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise ExportError(f"4-bit export needs onnxruntime's quantizer ({e}); "
                          "pip install 'onnxruntime>=1.20' onnx-ir") from None
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    out_dim, in_dim = weight.shape
    b = numpy_helper.from_array(_transposed(weight), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "one_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_dim])])
    graph.initializer.append(b)  # appended, not passed to make_graph, which would copy it
    del b
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    result = quantizer.model.model.graph
    nodes = [n for n in result.node if n.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(result.node) != 1 or len(nodes[0].input) > 3:
        raise ExportError(f"onnxruntime's quantizer wrote {[n.op_type for n in result.node]}, expected one "
                          "symmetric MatMulNBits")
    tensors = {t.name: t for t in result.initializer}
    packed = numpy_helper.to_array(tensors[nodes[0].input[1]])
    scales = numpy_helper.to_array(tensors[nodes[0].input[2]]).reshape(out_dim, -1)
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    return packed, scales, attrs


def _gather_q4(g: _Graph, packed: str, scales: str, k: int, block: int) -> str:
    """Embedding rows of ``input_ids`` de-quantized from the LM head's ``MatMulNBits`` table.

    onnxruntime's own answer, ``GatherBlockQuantized``, runs in onnxruntime for Python but not in
    onnxruntime-web (1.31: "Could not find an implementation for GatherBlockQuantized"), so this
    gathers the packed rows and unpacks them with standard ops, which run on WASM and WebGPU alike.
    Gemma ties the embedding and the LM head: row ``v`` of the embedding is column ``v`` of the head,
    i.e. row ``v`` of the ``[vocab, k_blocks, block/2]`` table, so one 4-bit table serves both.
    Per block: ``(nibble - 8) * scale``; nibbles low first; ``hi = floor(byte / 16)``, ``lo = byte - 16 hi``
    (exact in fp32). Only the rows of the input tokens are touched.
    """
    from onnx import TensorProto

    p = "/model/embed_tokens/q4"
    k_blocks = (k + block - 1) // block
    rows = g.op("Cast", [g.op("Gather", [packed, "input_ids"], f"{p}/Gather", axis=0)], f"{p}/Cast",
                to=TensorProto.FLOAT)
    hi = g.op("Floor", [g.op("Mul", [rows, g.init(f"{p}/inv16", np.array(1 / 16, np.float32))], f"{p}/Div16")],
              f"{p}/Floor")
    lo = g.op("Sub", [rows, g.op("Mul", [hi, g.init(f"{p}/sixteen", np.array(16, np.float32))], f"{p}/Mul16")],
              f"{p}/Low")
    last = g.const(f"{p}/last", [-1])
    pairs = g.op("Concat", [g.op("Unsqueeze", [lo, last], f"{p}/UnsqLo"), g.op("Unsqueeze", [hi, last], f"{p}/UnsqHi")],
                 f"{p}/Interleave", axis=-1)                                       # [B, S, kb, block/2, 2]
    q = g.op("Reshape", [pairs, g.const(f"{p}/blocks", [0, 0, k_blocks, block])], f"{p}/Blocks")
    centered = g.op("Sub", [q, g.init(f"{p}/zero_point", np.array(8, np.float32))], f"{p}/ZeroPoint")
    row_scales = g.op("Reshape", [g.op("Gather", [scales, "input_ids"], f"{p}/GatherScales", axis=0),
                                  g.const(f"{p}/scale_shape", [0, 0, k_blocks, 1])], f"{p}/ScalesShape")
    deq = g.op("Mul", [centered, row_scales], f"{p}/deq")
    rows = g.op("Reshape", [deq, g.const(f"{p}/hidden_shape", [0, 0, k_blocks * block])], f"{p}/Rows")
    if k_blocks * block != k:  # the last block is zero-padded past `hidden`
        rows = g.op("Slice", [rows, g.const(f"{p}/start", [0]), g.const(f"{p}/end", [k]), last], f"{p}/Trim")
    return rows


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
    out = check_output_dir(out_dir, overwrite, inputs=(hf_dir,))

    t0 = time.perf_counter()
    weights = _load_weights(hf_dir)
    external, timings = {}, {}
    with atomic_output_dir(out) as tmp:
        for dtype in dtypes:
            t = time.perf_counter()
            path = tmp / "onnx" / DTYPE_FILES[dtype]
            path.parent.mkdir(parents=True, exist_ok=True)
            if dtype == "q4":  # small: built in memory, weights saved beside it
                save_model(build_decoder(config, weights, q4=True), path, external=True)
                external[path.name] = True
            elif sum(a.nbytes for a in weights.values()) > EXTERNAL_DATA_THRESHOLD:
                onnx_save(build_decoder(config, weights, data_file=path.parent / (path.name + "_data")), path)
                external[path.name] = True
            else:
                save_model(build_decoder(config, weights), path, external=False)
                external[path.name] = False
            timings[dtype] = time.perf_counter() - t
            log(f"{dtype}: {path.relative_to(tmp)} in {timings[dtype]:.1f}s")
        out_config = dict(config)
        js = dict(out_config.get("transformers.js_config") or {})
        js["use_external_data_format"] = {name: True for name, ext in external.items() if ext}
        js["kv_cache_dtype"] = {d: "float32" for d in dtypes}
        js["dtype"] = "q4" if "q4" in dtypes else dtypes[0]
        out_config["transformers.js_config"] = js
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name in _COPY_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        provenance = {}
        if (hf_dir / "mlx_persona.json").exists():  # where the fused model came from
            provenance = json.loads((hf_dir / "mlx_persona.json").read_text())
        (tmp / "mlx_persona.json").write_text(json.dumps({
            **provenance,
            "onnx": {"source": str(hf_dir.absolute()), "dtypes": list(dtypes), "opset": OPSET,
                     "q4_block_size": Q4_BLOCK, "seconds": {k: round(v, 2) for k, v in timings.items()},
                     "bytes": {d: sum((tmp / "onnx" / f).stat().st_size
                                      for f in (DTYPE_FILES[d], DTYPE_FILES[d] + "_data")
                                      if (tmp / "onnx" / f).exists()) for d in dtypes}}}, indent=2) + "\n")
    log(f"total {_files_size(out) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
    return out
