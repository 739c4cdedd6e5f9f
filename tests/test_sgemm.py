"""MLX's cblas_sgemm layer (mlx_persona/backend/sgemm.py): matrix-vector products to sgemv, and
MLX_PERSONA_MATMUL=bf16 (bfloat16 inputs through oneMKL or our AVX512-BF16 kernel, x86-64 Linux).

Each check runs in a child process, because the BLAS is chosen by mlx_persona.backend.setup(), once,
before mlx.core is imported.
The oracle for the rounding is PyTorch's float32 -> bfloat16 conversion (round to nearest even); the
products are then taken in float64.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mlx_persona.backend import sgemm
from mlx_persona.backend.cpu import cpu_flags

linux = pytest.mark.skipif(sys.platform != "linux", reason="the sgemm layer is for Linux")
needs_mkl = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64" or sgemm.find_mkl() is None,
    reason="bf16 matmuls need x86-64 Linux and oneMKL (pip install mkl; the test extra installs it)")
needs_layer = pytest.mark.skipif(sgemm._layer_off(), reason="MLX_PERSONA_SGEMM=0: bf16 inputs need the sgemm layer")


def _child(code: str, mode: str | None = "bf16", engine: str | None = None) -> dict:
    """Runs `code` in a child with MLX_PERSONA_MATMUL=`mode` and MLX_PERSONA_BF16_GEMM=`engine` (unset: None)."""
    env = {k: v for k, v in os.environ.items() if k not in (sgemm.ENV, sgemm.ENGINE_ENV)}
    if mode is not None:
        env[sgemm.ENV] = mode
    if engine is not None:
        env[sgemm.ENGINE_ENV] = engine
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHECK = """
import json
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import sgemm
import mlx.core as mx, numpy as np, torch

def bf16(a):  # the oracle's rounding: PyTorch's float32 -> bfloat16
    return torch.from_numpy(np.array(a)).to(torch.bfloat16).to(torch.float64).numpy()

def err(got, ref):
    return float(np.abs(np.array(got, np.float64) - ref).max() / np.abs(ref).max())

rng = np.random.default_rng(0)
big = mx.array(rng.standard_normal((300, 700)).astype(np.float32))
w = mx.array(rng.standard_normal((520, 700)).astype(np.float32))
x = mx.array(rng.standard_normal((96, 300)).astype(np.float32))
cases = {
    "nt": (big, w.T),                       # x @ W.T, as nn.Linear does
    "nn": (x, big),
    "tn": (big.T, x.T),
    "strided": (big[:, 100:600], w[:64, 50:550].T),   # leading dimension larger than the row
    "batched": (mx.array(rng.standard_normal((3, 64, 256)).astype(np.float32)),
                mx.array(rng.standard_normal((3, 256, 128)).astype(np.float32))),
}
out = {"active": sgemm.bf16_active(), "status": sgemm.bf16_status()}
for name, (a, b) in cases.items():
    before = sgemm.counts()["bf16"]
    got = a @ b
    mx.eval(got)
    out[name] = {"bf16_calls": sgemm.counts()["bf16"] - before,
                 "vs_bf16_oracle": err(got, bf16(a) @ bf16(b)),
                 "vs_exact": err(got, np.array(a, np.float64) @ np.array(b, np.float64))}
thin_a, thin_b = big, mx.array(rng.standard_normal((700, 8)).astype(np.float32))   # a LoRA-sized product
before = sgemm.counts()
got = thin_a @ thin_b
mx.eval(got)
after = sgemm.counts()
out["thin"] = {"exact_calls": after["sgemm"] - before["sgemm"], "bf16_calls": after["bf16"] - before["bf16"],
               "vs_exact": err(got, np.array(thin_a, np.float64) @ np.array(thin_b, np.float64))}
print(json.dumps(out))
"""


needs_avx512_bf16 = pytest.mark.skipif(
    sys.platform != "linux" or "avx512_bf16" not in cpu_flags(), reason="our bf16 kernel needs AVX512-BF16")
ENGINES = [pytest.param("mkl", marks=needs_mkl), pytest.param("own", marks=needs_avx512_bf16)]


@needs_layer
@pytest.mark.parametrize("engine", ENGINES)
def test_large_products_round_inputs_to_bf16_and_accumulate_in_fp32(engine):
    r = _child(CHECK, engine=engine)
    assert r["active"], r["status"]
    assert ("our AVX512-BF16 kernel" in r["status"]) == (engine == "own"), r["status"]
    for name in ("nt", "nn", "tn", "strided", "batched"):
        case = r[name]
        assert case["bf16_calls"] >= 1, (name, case)
        # Equal to the product of the bf16-rounded inputs up to float32 accumulation ...
        assert case["vs_bf16_oracle"] < 2e-6, (name, case)
        # ... and measurably not the exact float32 product (so the test can tell the two apart).
        assert case["vs_exact"] > 1e-4, (name, case)
    thin = r["thin"]
    assert thin["bf16_calls"] == 0 and thin["exact_calls"] >= 1, thin
    assert thin["vs_exact"] < 1e-6, thin


GRAD = """
import json
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import sgemm
import mlx.core as mx, mlx.nn as nn, numpy as np
mx.random.seed(0)
layer = nn.Linear(512, 1024)
x = mx.random.normal((256, 512))
def loss(model, x):
    return (model(x) ** 2).mean()
value, grads = nn.value_and_grad(layer, loss)(layer, x)
mx.eval(value, grads)
print(json.dumps({"active": sgemm.bf16_active(), "loss": value.item(),
                  "grad": np.array(grads["weight"]).ravel()[:4096].tolist()}))
"""


@needs_mkl
@needs_layer
def test_training_gradients_stay_close_to_fp32():
    fast, exact = _child(GRAD), _child(GRAD, mode=None)
    assert fast["active"] and not exact["active"]
    import numpy as np

    assert abs(fast["loss"] - exact["loss"]) / exact["loss"] < 1e-2
    assert fast["loss"] != exact["loss"]  # it did take the bf16 path
    g, ge = np.array(fast["grad"]), np.array(exact["grad"])
    assert np.abs(g - ge).max() / np.abs(ge).max() < 2e-2


@needs_mkl
def test_off_by_default_and_a_bad_value_is_reported():
    code = ("import json, mlx_persona.backend as p; p.setup(); from mlx_persona.backend import sgemm; "
            "print(json.dumps([sgemm.bf16_active(), sgemm.bf16_status(), p.blas_status()[1]]))")
    active, reason, blas = _child(code, mode=None)
    assert not active and "MLX_PERSONA_MATMUL=bf16" in reason and blas == "loaded"
    active, reason, blas = _child(code, mode="fp16")
    assert not active and "'fp16'" in reason and "fp32" in reason and blas == "loaded"  # exact path kept
    env = {**os.environ, sgemm.ENV: "fp16"}
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", "doctor", "--size", "256"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "warning: MLX_PERSONA_MATMUL is set" in proc.stderr, proc.stderr


@needs_mkl
@needs_layer
def test_training_run_says_it_used_bf16_matmuls(tiny_path, small_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, sgemm.ENV: "bf16"}
    proc = subprocess.run([sys.executable, "-m", "mlx_persona.train", "--model", str(tiny_path), "--data",
                           str(small_data), "-o", str(out), "--steps", "4", "--batch-size", "4", "--no-progress",
                           "--set", "eval_every=0", "--set", "save_every=0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matmuls: bf16 inputs, fp32 accumulate" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matmul_inputs"] == "bfloat16" and summary["steps"] == 4


GEMV = """
import json
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import sgemm
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32))
w, x, big = arr(300, 64), arr(1, 64), arr(64, 300)
cases = {   # every way MLX can hand sgemm a product with one row or one column
    "row @ W.T": (x, w.T), "row @ W": (x, big), "W @ col": (w, x.T), "W.T @ col": (big.T, x.T),
    "col.T @ W": (x.T.T, big), "strided row": (w[3:4, :], big), "strided col": (w, big[:, 5:6]),
    "row of a strided W": (x, big[:, ::2]), "dot": (x, x.T), "batched rows": (arr(3, 1, 64), arr(3, 64, 40)),
    "decode head": (arr(1, 1, 64), arr(5000, 64).T),
}
out = {"active": sgemm.active(), "status": sgemm.status()}
for name, (a, b) in cases.items():
    before = sgemm.counts()["sgemv"]
    got = a @ b
    mx.eval(got)
    ref = np.array(a, np.float64) @ np.array(b, np.float64)
    out[name] = {"sgemv": sgemm.counts()["sgemv"] - before,
                 "err": float(np.abs(np.array(got, np.float64) - ref).max() / np.abs(ref).max())}
print(json.dumps(out))
"""


@linux
@pytest.mark.parametrize("mode", [None, "bf16"])
def test_matrix_vector_products_go_to_sgemv_and_stay_exact(mode):
    if mode == "bf16" and (platform.machine() != "x86_64" or sgemm.find_mkl() is None):
        pytest.skip("needs oneMKL")
    r = _child(GEMV, mode=mode)
    if not r["active"]:
        pytest.skip(f"the sgemm layer is not loaded here: {r['status']}")
    for name, case in r.items():
        if isinstance(case, dict):
            assert case["sgemv"] >= 1, (name, case)
            assert case["err"] < 2e-6, (name, case)


@linux
def test_the_layer_can_be_turned_off():
    code = ("import json, mlx_persona.backend as p; p.setup(); import mlx.core as mx; "
            "from mlx_persona.backend import sgemm; "
            "a = mx.ones((1, 8)) @ mx.ones((8, 4)); "
            "print(json.dumps([sgemm.active(), sgemm.status(), sgemm.counts()['sgemv'], a.tolist()]))")
    env_off = {**os.environ, "MLX_PERSONA_SGEMM": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_off, timeout=300)
    active, reason, calls, value = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not active and "MLX_PERSONA_SGEMM=0" in reason and calls == 0 and value == [[8.0] * 4]


FEW_ROWS = """
import json
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import sgemm
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
def arr(*shape):
    return mx.array(rng.normal(size=shape).astype(np.float32))
wide = arr(8, 700)
cases = {   # (rows, weight [n, k]) as batched decoding hands them: x @ W.T
    "2 rows": (arr(2, 640), arr(2048, 640)), "4 rows": (arr(4, 640), arr(1024, 640)),
    "8 rows": (arr(8, 2048), arr(640, 2048)), "odd k and n": (arr(5, 643), arr(1027, 643)),
    "k under 16 after the blocks": (arr(3, 31), arr(9, 31)), "rows of a wider array": (wide[:6, 30:670], arr(700, 640)),
    "small, one thread": (arr(3, 16), arr(5, 16)), "16 rows": (arr(16, 640), arr(2048, 640)),
    "32 rows": (arr(32, 1152), arr(1000, 1152)), "33 rows: OpenBLAS": (arr(33, 640), arr(512, 640)),
}
cases["a bias added (beta 1)"] = (arr(4, 640), arr(1024, 640), arr(1024))
out = {}
for name, (x, w, *bias) in cases.items():
    before = sgemm.counts()["few_rows"]
    got = mx.addmm(bias[0], x, w.T) if bias else x @ w.T
    mx.eval(got)
    ref = np.array(x, np.float64) @ np.array(w, np.float64).T + (np.array(bias[0], np.float64) if bias else 0)
    out[name] = {"few_rows": sgemm.counts()["few_rows"] - before,
                 "err": float(np.abs(np.array(got, np.float64) - ref).max() / np.abs(ref).max())}
out["active"] = [sgemm.active(), sgemm.status()]
print(json.dumps(out))
"""


@linux
@pytest.mark.parametrize("switch", [None, "0"])
def test_a_few_rows_times_a_weight_matrix_are_exact_in_our_kernel(switch, monkeypatch):
    """2-32 rows x W^T (batched decoding, short prompts; with a bias added too, beta 1) go to the few-rows
    kernel on AVX-512 CPUs, which reads each weight once for all the rows; float32 exact (only the order of
    the additions differs); 33 rows, MLX_PERSONA_FEW_ROWS=0 and CPUs without AVX-512 go to the BLAS."""
    if switch is None:
        monkeypatch.delenv("MLX_PERSONA_FEW_ROWS", raising=False)
    else:
        monkeypatch.setenv("MLX_PERSONA_FEW_ROWS", switch)
    r = _child(FEW_ROWS, mode=None)
    active, status = r.pop("active")
    if not active:
        pytest.skip(f"the sgemm layer is not loaded here: {status}")
    if "avx512f" not in cpu_flags():
        switch = "0"  # the kernel is built for AVX-512 only: every product goes to the BLAS
    for name, case in r.items():
        assert case["err"] < 2e-6, (name, case)
        assert case["few_rows"] == (1 if switch is None and not name.startswith("33") else 0), (name, case)


THREADS = """
import ctypes, json, threading
import mlx_persona.backend
mlx_persona.backend.setup()
from mlx_persona.backend import sgemm
import numpy as np

lib = sgemm._state["lib"]
out = {"active": [sgemm.active(), sgemm.status()], "errors": []}
if lib is not None:
    P = ctypes.POINTER(ctypes.c_float)
    lib.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P, ctypes.c_int,
                                                     ctypes.c_float, P, ctypes.c_int]

    def run(seed):  # ctypes lets go of the GIL: the threads call the layer at the same time
        rng = np.random.default_rng(seed)
        for i in range(40):
            m, n, k = [(16, 520, 200), (5, 96, 64), (1, 300, 128), (48, 300, 700)][(seed + i) % 4]
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((n, k), dtype=np.float32)
            c = np.full((m, n), np.nan, np.float32)
            lib.cblas_sgemm(101, 111, 112, m, n, k, 1.0, a.ctypes.data_as(P), k, w.ctypes.data_as(P), k, 0.0,
                            c.ctypes.data_as(P), n)
            ref = a.astype(np.float64) @ w.astype(np.float64).T
            err = float(np.abs(c - ref).max() / np.abs(ref).max())
            if not err < (1e-2 if sgemm.bf16_active() else 2e-6):
                out["errors"].append([seed, i, m, n, k, err])

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps(out))
"""


@linux
@pytest.mark.parametrize("mode", [None, "bf16"])
def test_products_from_several_threads_at_once_are_right(mode):
    """MLX calls the layer from several stream threads: four threads at once (few rows, one row, bf16
    products), so the pool's workers are busy for some callers (those compute alone) and spin or sleep
    between products for others; every product right."""
    r = _child(THREADS, mode=mode)
    active, status = r.pop("active")
    if not active:
        pytest.skip(f"the sgemm layer is not loaded here: {status}")
    assert r["errors"] == []
