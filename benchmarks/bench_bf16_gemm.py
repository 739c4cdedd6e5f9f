"""bf16 matrix products on this CPU: which engine is fast here, against PyTorch in the same run.

The products of the gemma-3-270m shape: a LoRA step's (4 x 96 rows times the layers' weights, an LM-head
chunk), a 434-token prompt's, a 24-token prompt's, and decoding's (1 and 16 rows times the 262,144 x 640
head). Each in GFLOP/s, the median of `--trials` timings after a warm-up:

- MLX fp32: exact float32 through the sgemm layer (OpenBLAS, sgemv, the few-rows kernel);
- MLX bf16 own / mkl: ``MLX_PERSONA_MATMUL=bf16`` with ``MLX_PERSONA_BF16_GEMM=own`` (native/bf16.c; needs
  AVX512-BF16) or ``mkl`` (oneMKL's cblas_gemm_bf16bf16f32), the weight unpinned (rounded in every call)
  and pinned (its bf16 copy made once, as ``load_model`` does);
- torch fp32 and torch bf16 (``torch.matmul`` of bf16 tensors: oneDNN), PyTorch's own threads.

Every MLX variant runs in its own process (the engine is chosen once, before MLX loads).

    python benchmarks/bench_bf16_gemm.py
    python benchmarks/bench_bf16_gemm.py --trials 5 --no-results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_model, load_line, machine_info, write_results  # noqa: E402

SHAPES = {  # name: (rows m, output n, depth k) of x (m x k) @ W.T (W: n x k)
    "train: 384 x q/k/v/o, up (640 -> 2048)": (384, 2048, 640),
    "train: 384 x down (2048 -> 640)": (384, 640, 2048),
    "train: 384 x LM-head chunk (8192 of the vocab)": (384, 8192, 640),
    "prompt 434: x up (640 -> 2048)": (434, 2048, 640),
    "prompt 24: x up (640 -> 2048)": (24, 2048, 640),
    "decode 1 row: LM head (262144 x 640)": (1, 262144, 640),
    "decode 16 rows: LM head (262144 x 640)": (16, 262144, 640),
}


def _time(run, trials: int) -> float:
    for _ in range(3):  # warm-up: the pool's threads, the output buffers, the first packing
        run()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_mlx(trials: int) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()
    import mlx.core as mx

    from mlx_persona.backend import pinned, sgemm

    out = {"status": sgemm.bf16_status() if sgemm.bf16_active() else sgemm.status()}
    for name, (m, n, k) in SHAPES.items():
        x, w = mx.random.normal((m, k)), mx.random.normal((n, k)) * 0.05
        mx.eval(x, w)
        flop = 2.0 * m * n * k
        out[name] = {"unpinned": flop / _time(lambda x=x, w=w: mx.eval(x @ w.T), trials) / 1e9}
        if sgemm.bf16_active():
            pinned.pin([w])
            out[name]["pinned"] = flop / _time(lambda x=x, w=w: mx.eval(x @ w.T), trials) / 1e9
            pinned.unpin([w])
    return out


def worker_torch(trials: int) -> dict:
    import torch

    out = {"threads": torch.get_num_threads()}
    for name, (m, n, k) in SHAPES.items():
        flop = 2.0 * m * n * k
        out[name] = {}
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(m, k).to(dt), (torch.randn(n, k) * 0.05).to(dt)
            with torch.inference_mode():
                out[name][str(dt).split(".")[-1]] = flop / _time(lambda x=x, w=w: x @ w.T, trials) / 1e9
    return out


def _child(kind: str, env: dict, trials: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--trials", str(trials)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {env} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def variants() -> dict:
    from mlx_persona.backend import sgemm
    from mlx_persona.backend.cpu import cpu_flags

    out = {"MLX fp32": ("mlx", {sgemm.ENV: None, sgemm.ENGINE_ENV: None})}
    if "avx512_bf16" in cpu_flags():
        out["MLX bf16 own"] = ("mlx", {sgemm.ENV: "bf16", sgemm.ENGINE_ENV: "own"})
    if sgemm.find_mkl() is not None:
        out["MLX bf16 mkl"] = ("mlx", {sgemm.ENV: "bf16", sgemm.ENGINE_ENV: "mkl"})
    out["torch"] = ("torch", {})
    return out


def markdown(result: dict) -> str:
    runs = result["runs"]
    cols = []  # (label, variant, key)
    for v in runs:
        keys = ["float32", "bfloat16"] if v == "torch" else (["unpinned", "pinned"] if "bf16" in v else ["unpinned"])
        cols += [(f"{v} {key}" if v != "MLX fp32" else v, v, key) for key in keys]
    lines = [f"### bf16 matrix products, GFLOP/s (median of {result['trials']}; {result['cpu']}; load {result['load']})",
             "", "| product (x @ W.T) | " + " | ".join(c[0] for c in cols) + " | best MLX / best torch |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for name in SHAPES:
        vals = [runs[v][name][key] for _, v, key in cols]
        best_mlx = max(runs[v][name][key] for _, v, key in cols if v != "torch")
        best_torch = max(runs["torch"][name].values())
        lines.append(f"| {name} | " + " | ".join(f"{x:.0f}" for x in vals) + f" | {best_mlx / best_torch:.2f}x |")
    lines += ["", "Engines: " + "; ".join(f"{v}: {runs[v]['status']}" for v in runs if v != "torch")
              + f"; torch threads {runs['torch']['threads']}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker_mlx(a.trials) if a.worker == "mlx" else worker_torch(a.trials)))
        return
    before = os.getloadavg()
    runs = {name: _child(kind, env, a.trials) for name, (kind, env) in variants().items()}
    result = {"machine": machine_info(), "cpu": cpu_model(), "trials": a.trials, "runs": runs,
              "load": load_line(before, os.getloadavg())}
    write_results(Path(a.out), "bf16_gemm", result, markdown(result), append=not a.no_results)


if __name__ == "__main__":
    main()
