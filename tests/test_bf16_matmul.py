"""MLX_PERSONA_MATMUL=bf16: MLX's float32 matmuls with bfloat16 inputs through oneMKL (x86-64 Linux).

Each check runs in a child process, because the BLAS is chosen when mlx_persona is first imported.
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

from mlx_persona import bf16_matmul

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64" or bf16_matmul.find_mkl() is None,
    reason="bf16 matmuls need x86-64 Linux and oneMKL (pip install mkl; the test extra installs it)")


def _child(code: str, mode: str | None = "bf16") -> dict:
    env = {k: v for k, v in os.environ.items() if k != bf16_matmul.ENV}
    if mode is not None:
        env[bf16_matmul.ENV] = mode
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHECK = """
import json
import mlx_persona
from mlx_persona import bf16_matmul
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
out = {"active": bf16_matmul.active(), "status": bf16_matmul.status()[1]}
for name, (a, b) in cases.items():
    before = bf16_matmul.counts()[1]
    got = a @ b
    mx.eval(got)
    out[name] = {"bf16_calls": bf16_matmul.counts()[1] - before,
                 "vs_bf16_oracle": err(got, bf16(a) @ bf16(b)),
                 "vs_exact": err(got, np.array(a, np.float64) @ np.array(b, np.float64))}
thin_a, thin_b = big, mx.array(rng.standard_normal((700, 8)).astype(np.float32))   # a LoRA-sized product
before = bf16_matmul.counts()
got = thin_a @ thin_b
mx.eval(got)
after = bf16_matmul.counts()
out["thin"] = {"exact_calls": after[0] - before[0], "bf16_calls": after[1] - before[1],
               "vs_exact": err(got, np.array(thin_a, np.float64) @ np.array(thin_b, np.float64))}
print(json.dumps(out))
"""


def test_large_products_round_inputs_to_bf16_and_accumulate_in_fp32():
    r = _child(CHECK)
    assert r["active"], r["status"]
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
import mlx_persona
from mlx_persona import bf16_matmul
import mlx.core as mx, mlx.nn as nn, numpy as np
mx.random.seed(0)
layer = nn.Linear(512, 1024)
x = mx.random.normal((256, 512))
def loss(model, x):
    return (model(x) ** 2).mean()
value, grads = nn.value_and_grad(layer, loss)(layer, x)
mx.eval(value, grads)
print(json.dumps({"active": bf16_matmul.active(), "loss": value.item(),
                  "grad": np.array(grads["weight"]).ravel()[:4096].tolist()}))
"""


def test_training_gradients_stay_close_to_fp32():
    fast, exact = _child(GRAD), _child(GRAD, mode=None)
    assert fast["active"] and not exact["active"]
    import numpy as np

    assert abs(fast["loss"] - exact["loss"]) / exact["loss"] < 1e-2
    assert fast["loss"] != exact["loss"]  # it did take the bf16 path
    g, ge = np.array(fast["grad"]), np.array(exact["grad"])
    assert np.abs(g - ge).max() / np.abs(ge).max() < 2e-2


def test_off_by_default_and_a_bad_value_is_reported():
    code = ("import json, mlx_persona; from mlx_persona import bf16_matmul, platform as p; "
            "print(json.dumps([bf16_matmul.active(), bf16_matmul.status()[1], p.blas_status()[1]]))")
    active, reason, blas = _child(code, mode=None)
    assert not active and "MLX_PERSONA_MATMUL=bf16" in reason and blas == "loaded"
    active, reason, blas = _child(code, mode="fp16")
    assert not active and "'fp16'" in reason and "fp32" in reason and blas == "loaded"  # exact path kept
    env = {**os.environ, bf16_matmul.ENV: "fp16"}
    proc = subprocess.run([sys.executable, "-m", "mlx_persona", "doctor", "--size", "256"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "warning: MLX_PERSONA_MATMUL is set" in proc.stderr, proc.stderr


def test_training_run_says_it_used_bf16_matmuls(tiny_path, small_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, bf16_matmul.ENV: "bf16"}
    proc = subprocess.run([sys.executable, "-m", "mlx_persona.train", "--model", str(tiny_path), "--data",
                           str(small_data), "-o", str(out), "--steps", "4", "--batch-size", "4", "--no-progress",
                           "--set", "eval_every=0", "--set", "save_every=0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matmuls: bf16 inputs, fp32 accumulate" in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["matmul_inputs"] == "bfloat16" and summary["steps"] == 4
