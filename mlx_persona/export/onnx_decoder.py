"""The Gemma 3 decoder (``Gemma3ForCausalLM``, with KV cache) as an ONNX graph: :func:`build_decoder`.

The graph is built part by part, in this order, by the methods of :class:`_Decoder`: lengths and
masks, RoPE tables, embedding, then per layer the attention block and the MLP block, then the final
norm and the LM head, then the graph's inputs and outputs. The interface (names, dtypes, shapes) and
the mask and RoPE rules are described in :mod:`mlx_persona.export.onnx`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mlx_persona.export.errors import ExportError
from mlx_persona.export.onnx_graph import IR_VERSION, OPSET, Graph, transposed
from mlx_persona.export.q4 import gather_q4, quantize_matmul_q4

_NEG = float(np.finfo(np.float32).min)


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
    d = _Decoder(config, weights, q4=q4, data_file=data_file)
    masks, rope = d.masks(), d.rope_tables()
    h = d.embedding()
    d.layer_constants()
    presents = []
    for i, kind in enumerate(d.types):
        h, kv = d.attention_block(i, h, masks[kind], rope[kind])
        presents += kv
        h = d.mlp_block(i, h)
    return d.model(d.head(h), presents)


class _Decoder:
    """The decoder graph under construction: the dimensions, the weights, and one method per part.

    Node and initializer names follow transformers' module paths (``/model/layers.{i}/self_attn/...``);
    the parts are created in the order :func:`build_decoder` calls them, so names stay stable.
    """

    def __init__(self, config: dict, weights: dict[str, np.ndarray], *, q4: bool, data_file: Path | None):
        self.config, self.weights, self.q4 = config, weights, q4
        self.hidden = config["hidden_size"]
        self.n_heads, self.n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config["head_dim"]
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.types = _layer_types(config)
        self.embed = weights["model.embed_tokens.weight"]
        self.vocab = self.embed.shape[0]
        self.tied = weights.get("lm_head.weight") is None or config.get("tie_word_embeddings", True)
        self.g = g = Graph(data_file)
        # Shared constants.
        self.axes_last = g.const("axes_last", [-1])
        self.eps_c = g.init("rms_eps", np.array(self.eps, np.float32))
        self.neg = g.init("mask_min", np.array(_NEG, np.float32))
        self.zero_i = g.const("zero", 0)
        self.one_i = g.const("one", 1)

    # ---------------------------------------------------------------------------------------- ops
    def w(self, name):
        try:
            return self.weights[name]
        except KeyError:
            raise ExportError(f"model.safetensors: missing tensor {name}") from None

    def rms_norm(self, x, weight_name, prefix):
        # x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32, as Gemma3RMSNorm.
        g = self.g
        sq = g.op("Mul", [x, x], f"{prefix}/Mul")
        ms = g.op("ReduceMean", [sq, self.axes_last], f"{prefix}/ReduceMean", keepdims=1)
        r = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, self.eps_c], f"{prefix}/Add")], f"{prefix}/Sqrt")],
                 f"{prefix}/Reciprocal")
        scale = g.init(f"{weight_name}_plus_one", (1.0 + self.w(weight_name)).astype(np.float32))
        return g.op("Mul", [g.op("Mul", [x, r], f"{prefix}/Normalize"), scale], f"{prefix}/Scale")

    def linear(self, x, weight_name, prefix):
        g = self.g
        weight = self.w(weight_name)  # HF layout: [out, in]
        base = weight_name.removesuffix(".weight")
        if self.q4:
            packed, scales, attrs = quantize_matmul_q4(weight)
            tables = [g.init(f"{base}.weight_Q4", packed), g.init(f"{base}.weight_scales", scales)]
            return g.op("MatMulNBits", [x, *tables], f"{prefix}/MatMulNBits", domain="com.microsoft", **attrs)
        return g.op("MatMul", [x, g.init(f"{base}.weight_T", transposed(weight))], f"{prefix}/MatMul")

    def rotate(self, x, cos, sin, prefix):
        g = self.g
        x1, x2 = g.op("Split", [x], f"{prefix}/Split", n_out=2, axis=-1, num_outputs=2)
        rot = g.op("Concat", [g.op("Neg", [x2], f"{prefix}/Neg"), x1], f"{prefix}/Concat", axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos], f"{prefix}/MulCos"), g.op("Mul", [rot, sin], f"{prefix}/MulSin")],
                    f"{prefix}/Add")

    # -------------------------------------------------------------------------------------- parts
    def masks(self) -> dict[str, str]:
        """Boolean masks [batch, 1, 1, seq, total] per layer type (the extra axis is the GQA group axis)."""
        from onnx import TensorProto

        g, zero_i, one_i = self.g, self.zero_i, self.one_i
        # Lengths: past (from the cache), this step (from input_ids), total (from attention_mask).
        past_len = g.op("Shape", ["past_key_values.0.key"], "/model/past_len", start=2, end=3)
        seq_len = g.op("Shape", ["input_ids"], "/model/seq_len", start=1, end=2)
        total_len = g.op("Shape", ["attention_mask"], "/model/total_len", start=1, end=2)
        past_s = g.op("Squeeze", [past_len, g.const("axis0", [0])], "/model/past_scalar")
        end_s = g.op("Add", [past_s, g.op("Squeeze", [seq_len, g.const("axis0", [0])], "/model/seq_scalar")],
                     "/model/end_scalar")
        total_s = g.op("Squeeze", [total_len, g.const("axis0", [0])], "/model/total_scalar")

        q_slot = g.op("Unsqueeze", [g.op("Range", [past_s, end_s, one_i], "/model/mask/q_range"),
                                    g.const("axis1", [1])], "/model/mask/q_slot")  # [S, 1]
        k_slot = g.op("Unsqueeze", [g.op("Range", [zero_i, total_s, one_i], "/model/mask/k_range"),
                                    g.const("axis0", [0])], "/model/mask/k_slot")  # [1, T]
        causal = g.op("LessOrEqual", [k_slot, q_slot], "/model/mask/causal")
        window = g.const("window", int(self.config["sliding_window"]))
        in_window = g.op("Greater", [k_slot, g.op("Sub", [q_slot, window], "/model/mask/q_minus_w")],
                         "/model/mask/in_window")
        sliding = g.op("And", [causal, in_window], "/model/mask/sliding")
        pad = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "/model/mask/pad_bool", to=TensorProto.BOOL),
                                 g.const("axes_pad", [1, 2, 3])], "/model/mask/pad")  # [B, 1, 1, 1, T]
        masks = {}
        for kind, m in (("full_attention", causal), ("sliding_attention", sliding)):
            masks[kind] = g.op("And", [pad, m], f"/model/mask/{kind}")
        return masks

    def rope_tables(self) -> dict[str, tuple[str, str]]:
        """RoPE (cos, sin) [batch, 1, seq, head_dim] per layer type, from the positions fed."""
        from onnx import TensorProto

        g, head_dim = self.g, self.head_dim
        pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], "/model/rope/pos_float", to=TensorProto.FLOAT),
                                 g.const("axis2", [2])], "/model/rope/pos")  # [B, S, 1]
        rope = {}
        for kind in sorted(set(self.types)):
            base, factor = _rope(self.config, kind)
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
        return rope

    def embedding(self) -> str:
        """Embedding x sqrt(hidden): transformers' fp32 value (mlx-lm rounds it through bf16)."""
        g = self.g
        if self.q4:
            if not self.tied:
                raise ExportError("q4 shares one 4-bit table between the embedding and the LM head, which needs "
                                  "tied embeddings (every Gemma 3 checkpoint has them)")
            # Quantized first, so that the embedding can read its table; the MatMul node comes at the end.
            packed, scales, self.head_attrs = quantize_matmul_q4(self.embed)
            self.head_q4 = [g.init("lm_head.weight_Q4", packed), g.init("lm_head.weight_scales", scales)]
            del packed, scales
            h = gather_q4(g, self.head_q4[0], self.head_q4[1], self.head_attrs["K"], self.head_attrs["block_size"])
        else:
            self.emb_w = g.init("model.embed_tokens.weight", self.embed)
            h = g.op("Gather", [self.emb_w, "input_ids"], "/model/embed_tokens/Gather", axis=0)
        scale = g.init("embed_scale", np.array(math.sqrt(self.hidden), np.float32))
        return g.op("Mul", [h, scale], "/model/embed_tokens/Scale")

    def layer_constants(self) -> None:
        """The shapes and scalars every layer shares (created once, before the first layer)."""
        g, n_heads, n_kv, head_dim = self.g, self.n_heads, self.n_kv, self.head_dim
        self.shape_q = g.const("shape_q", [0, 0, n_heads, head_dim])
        self.shape_kv = g.const("shape_kv", [0, 0, n_kv, head_dim])
        self.shape_q5 = g.const("shape_q5", [0, n_kv, n_heads // n_kv, -1, head_dim])
        self.shape_o4 = g.const("shape_o4", [0, n_heads, -1, head_dim])
        self.shape_o3 = g.const("shape_o3", [0, 0, n_heads * head_dim])
        scaling = float(self.config.get("query_pre_attn_scalar", head_dim)) ** -0.5
        self.c_scale = g.init("attn_scaling", np.array(scaling, np.float32))
        self.c_half, self.c_one = g.init("half", np.array(0.5, np.float32)), g.init("one_f", np.array(1.0, np.float32))
        self.c_gelu_a = g.init("gelu_a", np.array(math.sqrt(2.0 / math.pi), np.float32))
        self.c_gelu_b = g.init("gelu_b", np.array(0.044715, np.float32))

    def _qkv(self, i: int, x: str, cos: str, sin: str) -> tuple[str, str, str]:
        """Queries, keys and values of layer ``i`` [B, heads, S, D]: projected, normed, rotated."""
        g, p, pre = self.g, f"model.layers.{i}", f"/model/layers.{i}/self_attn"
        q = g.op("Reshape", [self.linear(x, f"{p}.self_attn.q_proj.weight", f"{pre}/q_proj"), self.shape_q],
                 f"{pre}/q_reshape")
        k = g.op("Reshape", [self.linear(x, f"{p}.self_attn.k_proj.weight", f"{pre}/k_proj"), self.shape_kv],
                 f"{pre}/k_reshape")
        v = g.op("Reshape", [self.linear(x, f"{p}.self_attn.v_proj.weight", f"{pre}/v_proj"), self.shape_kv],
                 f"{pre}/v_reshape")
        q = self.rms_norm(q, f"{p}.self_attn.q_norm.weight", f"{pre}/q_norm")
        k = self.rms_norm(k, f"{p}.self_attn.k_norm.weight", f"{pre}/k_norm")
        q = g.op("Transpose", [q], f"{pre}/q_transpose", perm=[0, 2, 1, 3])  # [B, H, S, D]
        k = g.op("Transpose", [k], f"{pre}/k_transpose", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [v], f"{pre}/v_transpose", perm=[0, 2, 1, 3])
        return self.rotate(q, cos, sin, f"{pre}/q_rope"), self.rotate(k, cos, sin, f"{pre}/k_rope"), v

    def attention_block(self, i: int, h: str, mask: str, rope: tuple[str, str]) -> tuple[str, list[str]]:
        """Layer ``i``'s attention with its norms and residual; returns (h, [present key, present value])."""
        g, p, pre = self.g, f"model.layers.{i}", f"/model/layers.{i}"
        x = self.rms_norm(h, f"{p}.input_layernorm.weight", f"{pre}/input_layernorm")
        q, k, v = self._qkv(i, x, *rope)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], f"{pre}/self_attn/k_cache", axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], f"{pre}/self_attn/v_cache", axis=2)
        # GQA without copying the cache: queries grouped per kv head, keys broadcast over the group.
        q5 = g.op("Reshape", [q, self.shape_q5], f"{pre}/self_attn/q_groups")                    # [B, KV, G, S, D]
        k5 = g.op("Unsqueeze", [k_all, g.const("axis2", [2])], f"{pre}/self_attn/k_groups")   # [B, KV, 1, T, D]
        v5 = g.op("Unsqueeze", [v_all, g.const("axis2", [2])], f"{pre}/self_attn/v_groups")
        kt = g.op("Transpose", [k5], f"{pre}/self_attn/k_t", perm=[0, 1, 2, 4, 3])
        scores = g.op("Mul", [g.op("MatMul", [q5, kt], f"{pre}/self_attn/qk"), self.c_scale], f"{pre}/self_attn/scale")
        attn_cap = self.config.get("attn_logit_softcapping")
        if attn_cap:
            cap = g.init(f"{p}.attn_cap", np.array(attn_cap, np.float32))
            scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap], f"{pre}/self_attn/cap_div")],
                                       f"{pre}/self_attn/cap_tanh"), cap], f"{pre}/self_attn/cap_mul")
        scores = g.op("Where", [mask, scores, self.neg], f"{pre}/self_attn/mask")
        probs = g.op("Softmax", [scores], f"{pre}/self_attn/Softmax", axis=-1)
        o = g.op("MatMul", [probs, v5], f"{pre}/self_attn/pv")                                  # [B, KV, G, S, D]
        o = g.op("Reshape", [o, self.shape_o4], f"{pre}/self_attn/o_heads")
        o = g.op("Transpose", [o], f"{pre}/self_attn/o_transpose", perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, self.shape_o3], f"{pre}/self_attn/o_reshape")
        o = self.linear(o, f"{p}.self_attn.o_proj.weight", f"{pre}/self_attn/o_proj")
        h = g.op("Add", [h, self.rms_norm(o, f"{p}.post_attention_layernorm.weight",
                                          f"{pre}/post_attention_layernorm")], f"{pre}/attn_residual")
        return h, [k_all, v_all]

    def mlp_block(self, i: int, h: str) -> str:
        """Layer ``i``'s gated GELU MLP with its norms and residual."""
        g, p, pre = self.g, f"model.layers.{i}", f"/model/layers.{i}"
        x = self.rms_norm(h, f"{p}.pre_feedforward_layernorm.weight", f"{pre}/pre_feedforward_layernorm")
        gate = self.linear(x, f"{p}.mlp.gate_proj.weight", f"{pre}/mlp/gate_proj")
        up = self.linear(x, f"{p}.mlp.up_proj.weight", f"{pre}/mlp/up_proj")
        # gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", [g.op("Mul", [gate, gate], f"{pre}/mlp/gelu/sq"), gate], f"{pre}/mlp/gelu/cube")
        inner = g.op("Mul", [g.op("Add", [gate, g.op("Mul", [cube, self.c_gelu_b], f"{pre}/mlp/gelu/b")],
                                  f"{pre}/mlp/gelu/add"), self.c_gelu_a], f"{pre}/mlp/gelu/a")
        act = g.op("Mul", [g.op("Mul", [gate, self.c_half], f"{pre}/mlp/gelu/half"),
                           g.op("Add", [g.op("Tanh", [inner], f"{pre}/mlp/gelu/Tanh"), self.c_one],
                                f"{pre}/mlp/gelu/one")],
                   f"{pre}/mlp/gelu/out")
        y = self.linear(g.op("Mul", [act, up], f"{pre}/mlp/gate_up"), f"{p}.mlp.down_proj.weight",
                        f"{pre}/mlp/down_proj")
        return g.op("Add", [h, self.rms_norm(y, f"{p}.post_feedforward_layernorm.weight",
                                             f"{pre}/post_feedforward_layernorm")], f"{pre}/mlp_residual")

    def head(self, h: str) -> str:
        """Final norm, LM head (4-bit, untied, or the embedding table reused) and final soft-capping."""
        g = self.g
        h = self.rms_norm(h, "model.norm.weight", "/model/norm")
        if self.q4:
            logits = g.op("MatMulNBits", [h, *self.head_q4], "/lm_head/MatMulNBits", domain="com.microsoft",
                          **self.head_attrs)
        elif not self.tied:
            logits = self.linear(h, "lm_head.weight", "/lm_head")
        else:
            # [V, H] @ [B, H, S] -> [B, V, S]: reuses the embedding table as it is stored.
            ht = g.op("Transpose", [h], "/lm_head/h_t", perm=[0, 2, 1])
            logits = g.op("Transpose", [g.op("MatMul", [self.emb_w, ht], "/lm_head/MatMul")], "/lm_head/logits_t",
                          perm=[0, 2, 1])
        final_cap = self.config.get("final_logit_softcapping")
        if final_cap:
            cap = g.init("final_logit_cap", np.array(final_cap, np.float32))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], "/lm_head/cap_div")], "/lm_head/cap_tanh"),
                                  cap], "/lm_head/cap_mul")
        return logits

    def model(self, logits: str, presents: list[str]):
        """The graph's named outputs and inputs, and the finished ``ModelProto`` with its weights."""
        from onnx import TensorProto, helper

        g, n_kv, head_dim = self.g, self.n_kv, self.head_dim
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
        for i, name in enumerate(presents):
            kv = "key" if i % 2 == 0 else "value"
            g.nodes.append(helper.make_node("Identity", [name], [f"present.{i // 2}.{kv}"],
                                            name=f"/present.{i // 2}.{kv}"))
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", self.vocab])]
        for i in range(len(self.types)):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                            ["batch_size", n_kv, "past_sequence_length", head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                             ["batch_size", n_kv, "total_sequence_length", head_dim]))
        g.close()
        graph = helper.make_graph(g.nodes, "gemma3_text_decoder", inputs, outputs, g.inits)
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if self.q4 else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="mlx_persona", ir_version=IR_VERSION)
        g.add_weights(model)
        return model
