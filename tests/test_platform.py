"""The Linux CPU speed set-up: MLX's fused kernels built for this CPU, and Gemma's CPU rewrites.

conftest.py has called mlx_persona.backend.setup() before mlx.core was imported, as an entry point does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_persona import backend as plat
from mlx_persona.backend import cpu_ops, jit

linux_with_gxx = pytest.mark.skipif(sys.platform != "linux" or plat.jit_status()[0] is None,
                                    reason=f"MLX's kernel compiler is not changed here: {plat.jit_status()[1]}")


@linux_with_gxx
def test_fused_cpu_kernels_are_built_for_this_cpu_in_the_private_folder_and_stay_exact():
    kernels = Path(plat.jit_status()[0])  # cache_dir()/jit/<key> as setup() found it (the user's cache here)
    assert kernels.parent.name == "jit" and kernels.stat().st_uid == os.getuid(), kernels
    assert kernels.stat().st_mode & 0o022 == 0, oct(kernels.stat().st_mode)
    before = set(kernels.rglob("*.so"))
    x = mx.random.uniform(-30, 30, (1000, 37))  # an odd size: vector body plus a scalar tail
    c = mx.random.uniform(-1, 1, (1000, 1))
    k = float(np.float32(np.random.default_rng().uniform(0.5, 1.5)))  # a new constant: a new kernel
    fused = mx.compile(lambda x, c: mx.exp(x - c) * k + mx.sigmoid(x))
    out = np.array(fused(x, c))
    assert set(kernels.rglob("*.so")) - before, "MLX built no kernel in the private folder"
    assert "-march=native" in jit.last_command() and str(kernels) in jit.last_command()
    assert str(kernels) not in os.environ.get("TMPDIR", "") + os.environ.get("PATH", "")
    xn, cn = np.array(x, np.float64), np.array(c, np.float64)
    ref = np.exp(xn - cn) * k + 1 / (1 + np.exp(-xn))
    np.testing.assert_allclose(out, ref, rtol=5e-6, atol=1e-30)  # fp32 rounding of x - c, amplified by exp
    eager = np.array(mx.exp(x - c) * k + mx.sigmoid(x))
    np.testing.assert_allclose(out, eager, rtol=1e-6, atol=1e-30)
    # Special values survive the vectorised exp.
    special = mx.array([float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.0])
    got = np.array(mx.compile(lambda v: mx.exp(v * 1.0))(special))
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 0 and got[3] == np.inf and got[4] == 0
    assert got[5] == 1


@linux_with_gxx
def test_child_processes_see_the_original_environment_and_share_the_kernel_folder():
    code = ("import json, os, shutil, mlx_persona.backend as b; env = {k: os.environ.get(k) for k in "
            "('PATH', 'TMPDIR')}; gxx = shutil.which('g++'); b.setup(); "
            "print(json.dumps([env, gxx, b.jit_status()[0]]))")
    ours = Path(plat.jit_status()[0])
    same_cache = {**os.environ, "MLX_PERSONA_CACHE": str(ours.parents[1])}  # the cache setup() used here
    env, gxx, folder = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                 check=True, env=same_cache).stdout.splitlines()[-1])
    assert env == {k: os.environ.get(k) for k in ("PATH", "TMPDIR")}  # nothing inherited from our setup()
    assert gxx and "mlx_persona" not in gxx  # the real compiler, no wrapper on the PATH
    assert folder == str(ours)  # the same kernels, reused


def test_jit_can_be_turned_off(tmp_path):
    """With MLX_PERSONA_JIT=0 the PATH and TMPDIR a process was given stay as they were (as always), and MLX
    runs the plain g++ and caches its kernels in its usual $TMPDIR/mlx, not in our folder."""
    import json
    import shutil

    env = {**os.environ, "MLX_PERSONA_JIT": "0", "TMPDIR": str(tmp_path)}
    code = ("import json, os, shutil, mlx_persona.backend as b; b.setup(); import mlx.core as mx\n"
            "x = mx.random.uniform(shape=(64,)); mx.eval(mx.compile(lambda v: mx.exp(v) * 1.2345 + mx.sigmoid(v))(x))\n"
            "print(json.dumps([b.jit_status(), os.environ['PATH'], os.environ['TMPDIR'], shutil.which('g++')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    status, child_path, tmpdir, gxx = json.loads(out.splitlines()[-1])
    assert status[0] is None and ("MLX_PERSONA_JIT=0" in status[1] or sys.platform != "linux"), status
    assert (child_path, tmpdir) == (os.environ["PATH"], str(tmp_path))
    assert gxx == shutil.which("g++")
    if sys.platform == "linux" and gxx:  # MLX fused the kernel with the plain g++, into its own cache
        assert list((tmp_path / "mlx").rglob("*.so")), sorted(tmp_path.rglob("*"))


def test_fast_gelu_mlp_equals_mlx_lm_s(tiny_path):
    from mlx_lm.models import gemma3_text

    from mlx_persona.models import load_model

    model, _ = load_model(tiny_path)
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "MLP" and type(mlp) is not gemma3_text.MLP  # load_model swapped it
    assert isinstance(mlp, gemma3_text.MLP)
    mx.random.seed(0)  # the same inputs whatever ran before
    x = 3 * mx.random.normal((2, 5, model.model.layers[0].mlp.gate_proj.weight.shape[1]))
    ours = mlp(x)
    theirs = gemma3_text.MLP.__call__(mlp, x)  # mlx-lm's own: nn.gelu_approx
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-6)
    g = mx.random.normal((4096,)) * 4
    ref = nn.gelu_approx(g)
    assert cpu_ops.use_fast_gelu(model) == len(model.model.layers)  # idempotent: swaps again, same class
    _gelu_approx = cpu_ops._gelu_approx
    np.testing.assert_allclose(np.array(_gelu_approx(g)), np.array(ref), atol=1e-6)
    dg = mx.grad(lambda v: _gelu_approx(v).sum())(g)
    dref = mx.grad(lambda v: nn.gelu_approx(v).sum())(g)
    np.testing.assert_allclose(np.array(dg), np.array(dref), atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,n,s,mask", [
    (4, 1, 7, 7, "causal"), (4, 2, 5, 9, "causal"),  # queries after a cache: the last n of s positions
    (4, 4, 6, 6, None), (4, 1, 8, 8, "window"), (4, 2, 8, 8, "additive"), (4, 2, 8, 8, "per-head")])
@pytest.mark.parametrize("split_min", [cpu_ops.SPLIT_MIN, 4])  # 4: causal ones in halves (odd n too), as prompts
def test_cpu_attention_matches_mlx_fast_attention(heads, kv_heads, n, s, mask, split_min, monkeypatch):
    monkeypatch.setattr(cpu_ops, "SPLIT_MIN", split_min)
    _composite_attention = cpu_ops._composite_attention
    mx.random.seed(1)
    q, k, v = (mx.random.normal((2, heads, n, 32)), mx.random.normal((2, kv_heads, s, 32)),
               mx.random.normal((2, kv_heads, s, 32)))
    window = (mx.arange(s)[None] <= mx.arange(n)[:, None]) & (mx.arange(s)[None] > mx.arange(n)[:, None] - 3)
    mask = {"window": window, "additive": mx.where(window, 0.0, -1e9),
            "per-head": mx.broadcast_to(window[None, None], (2, heads, n, s))}.get(mask, mask)

    def grads(fn):
        return mx.grad(lambda q, k, v: (fn(q, k, v) * mx.cos(v.sum())).sum(), argnums=(0, 1, 2))(q, k, v)

    fast = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)  # noqa: E731
    ours = lambda q, k, v: _composite_attention(q, k, v, 0.2, mask, split=True)  # noqa: E731
    np.testing.assert_allclose(np.array(ours(q, k, v)), np.array(fast(q, k, v)), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(ours), grads(fast)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_gemma_uses_the_cpu_attention_only_where_it_applies():
    import mlx_lm.models.gemma3_text as gemma3

    cpu_ops.use_cpu_attention()
    sdpa = gemma3.scaled_dot_product_attention
    assert sdpa is not cpu_ops._ORIGINAL_SDPA["gemma3"]
    q, k = mx.random.normal((1, 4, 3, 16)), mx.random.normal((1, 1, 3, 16))
    calls = []
    saved = cpu_ops._composite_attention
    cpu_ops._composite_attention = lambda *a, split: calls.append(("ours", split)) or a[0]
    try:
        sdpa(q, k, k, None, 0.25, "causal")  # training: no cache, the attention not split
        sdpa(q, k, k, object(), 0.25, "causal")  # a prompt (a KV cache): long ones split
        sdpa(q[:, :, :1], k, k, None, 0.25, None)  # decoding one token: mlx-lm's
        sdpa(q.astype(mx.bfloat16), k.astype(mx.bfloat16), k.astype(mx.bfloat16), None, 0.25, "causal")
    finally:
        cpu_ops._composite_attention = saved
    assert calls == [("ours", False), ("ours", True)]
