"""MLX_PERSONA_MATMUL=bf16 on CPUs with AVX512-BF16: our kernel (native/bf16.c), the engine chosen per CPU,
and pinned weights (backend/pinned.py: a bf16 copy of a frozen weight, made once, found by address).

The oracle: the product of the inputs rounded to bf16 by PyTorch (round to nearest even), taken in float64.
Each check runs in a child process (the layer is set up once, before mlx.core is imported).
"""

from __future__ import annotations

import pytest
from test_sgemm import _child, needs_avx512_bf16, needs_layer

from mlx_persona.backend import sgemm

def test_the_engine_is_chosen_per_cpu():  # pure: on every CPU
    assert sgemm.choose_engine("AMX", "auto") == "mkl"  # oneMKL's AMX tiles
    assert sgemm.choose_engine("AVX512-BF16", "auto") == "own"
    assert sgemm.choose_engine("", "auto") == "mkl"  # emulated: slow, but the user asked for bf16
    assert sgemm.choose_engine("AMX", "own") == "own" and sgemm.choose_engine("AVX512-BF16", "mkl") == "mkl"
    with pytest.raises(ValueError, match="no AVX512-BF16"):
        sgemm.choose_engine("", "own")
    with pytest.raises(ValueError, match="use auto, own or mkl"):
        sgemm.choose_engine("AMX", "fast")


PINNED = """
import json
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import pinned, sgemm
import mlx.core as mx, numpy as np, torch
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
def bf16(a):
    return torch.from_numpy(np.array(a)).to(torch.bfloat16).to(torch.float64).numpy()
def err(got, ref):
    return float(np.abs(np.array(got, np.float64) - ref).max() / np.abs(ref).max())
w, other = arr(1027, 643), arr(512, 643)
cases = {   # (x, weight as used): every way a frozen weight enters a product
    "prefill x @ W.T": lambda: (arr(200, 643), w.T), "1 row": lambda: (arr(1, 643), w.T),
    "2 rows": lambda: (arr(2, 643), w.T), "5 rows": lambda: (arr(5, 643), w.T), "16 rows": lambda: (arr(16, 643), w.T),
    "49 rows": lambda: (arr(49, 643), w.T), "backward dy @ W": lambda: (arr(64, 1027), w),
    "rows of W (a vocabulary chunk)": lambda: (arr(3, 643), w[100:612].T),
    "batched 2 x 7 rows": lambda: (arr(2, 7, 643), w.T),
}
out = {"status": sgemm.bf16_status(), "pinned": pinned.pin([w, arr(8, 643), arr(300, 16)])}
out["bytes"] = pinned.pinned_bytes()
def run(tag):
    for name, make in cases.items():
        x, b = make()
        before = sgemm.counts()
        got = x @ b
        mx.eval(got)
        after = sgemm.counts()
        out[f"{tag}: {name}"] = {"pinned": after["pinned"] - before["pinned"], "rows": after["bf16_rows"] - before["bf16_rows"],
                                 "vs_bf16": err(got, bf16(x) @ bf16(b)),
                                 "vs_exact": err(got, np.array(x, np.float64) @ np.array(b, np.float64))}
run("pinned")
x = arr(1, 643)
before = sgemm.counts()["pinned"]
mx.eval(x @ other.T, x @ (w + 0).T)   # not pinned: another array, and a new one computed from w
out["unpinned arrays"] = sgemm.counts()["pinned"] - before
pinned.unpin([w])
out["after unpin"] = pinned.pinned_bytes()
run("unpinned")
print(json.dumps(out))
"""


@needs_avx512_bf16
@needs_layer
def test_pinned_weights_are_read_from_their_bf16_copy_and_dropped_on_unpin():
    r = _child(PINNED, engine="own")
    assert "our AVX512-BF16 kernel" in r["status"], r["status"]
    assert r["pinned"] == 1 and r["bytes"] == 1027 * 643 * 2  # the small and the thin array are not worth a copy
    assert r["unpinned arrays"] == 0 and r["after unpin"] == 0
    for name, case in r.items():
        if not isinstance(case, dict):
            continue
        if name.startswith("pinned"):
            assert case["pinned"] >= 1, (name, case)
            rows = "row" in name and "49" not in name and "prefill" not in name
            assert (case["rows"] >= 1) == rows, (name, case)  # 1-48 rows x W^T: the rows kernel
            assert case["vs_bf16"] < 2e-6 and case["vs_exact"] > 1e-4, (name, case)
        else:  # no copy any more: large products are rounded on the fly, small ones are exact
            assert case["pinned"] == 0 and case["rows"] == 0, (name, case)
            rounded = any(s in name for s in ("prefill", "backward", "49"))  # under 32 rows (sgemm.MIN_DIM): exact
            assert (case["vs_bf16"] if rounded else case["vs_exact"]) < 2e-6, (name, case)


MODEL = """
import json, sys
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import pinned, sgemm
import mlx.core as mx, numpy as np
from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters
model, tok = load_model(sys.argv[1])
ids = mx.array([tok.encode("Hello there, little pup! What are we playing today?")])
before = sgemm.counts()["pinned"]
logits = model(ids)
mx.eval(logits)
out = {"loaded": pinned.pinned_bytes(), "used": sgemm.counts()["pinned"] - before, "logits": np.array(logits).tolist()}
import gc
second, _ = load_model(sys.argv[1])
out["two models"] = pinned.pinned_bytes()
del second
gc.collect()
out["one again"] = pinned.pinned_bytes()
attach_adapters(model, "lora", 4, 8.0, 0.0, ["q_proj", "v_proj"], -1)
out["lora"] = pinned.pin_frozen(model)
model.unfreeze()
out["full"] = pinned.pin_frozen(model)
print(json.dumps(out))
"""


@needs_avx512_bf16
@needs_layer
def test_a_loaded_model_reads_pinned_weights_and_training_pins_only_frozen_ones(tiny_path):
    import numpy as np

    fast = _child(MODEL.replace("sys.argv[1]", repr(str(tiny_path))), engine="own")
    exact = _child(MODEL.replace("sys.argv[1]", repr(str(tiny_path))), mode=None)
    assert fast["loaded"] > 0 and fast["used"] >= 1  # the tiny model's tied embedding / LM head
    assert exact["loaded"] == 0 and exact["used"] == 0
    a, b = np.array(fast["logits"]), np.array(exact["logits"])
    assert 0 < np.abs(a - b).max() / np.abs(b).max() < 2e-2
    assert fast["lora"] >= 1 and fast["full"] == 0  # a full fine-tune trains every weight: nothing pinned
    # A loaded model's copies live as long as the model: loading models one after another holds one set.
    assert fast["two models"] == 2 * fast["loaded"] and fast["one again"] == fast["loaded"]
