"""4-bit weights for the ONNX export: :func:`quantize_matmul_q4` (onnxruntime's ``MatMulNBitsQuantizer``,
4 bits, block 32, symmetric) and :func:`gather_q4` (embedding rows de-quantized from the LM head's
4-bit table with standard ops, because onnxruntime-web has no ``GatherBlockQuantized``)."""

from __future__ import annotations

import numpy as np

from mlx_persona.export.errors import ExportError
from mlx_persona.export.onnx_graph import IR_VERSION, OPSET, Graph, transposed

Q4_BLOCK = 32


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
    b = numpy_helper.from_array(transposed(weight), "w")
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


def gather_q4(g: Graph, packed: str, scales: str, k: int, block: int) -> str:
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
