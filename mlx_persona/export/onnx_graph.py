"""Writing ONNX graphs by hand: :class:`Graph` (unique names, initializers, one call per op, weights
streamed to external data), the opset and IR version every graph here uses, and the weight layout
helper :func:`transposed`. Shared by the decoder builder and the 4-bit code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 21  # onnxruntime >= 1.18 and onnxruntime-web run it (ReduceMean/Split take axes as inputs)
IR_VERSION = 10


def transposed(a: np.ndarray, rows: int = 1024) -> np.ndarray:
    """``a.T`` as a contiguous array, copied in row blocks (7x faster than numpy's copy of a big ``.T``)."""
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    for i in range(0, a.shape[0], rows):
        out[:, i:i + rows] = a[i:i + rows].T
    return out


class Graph:
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
