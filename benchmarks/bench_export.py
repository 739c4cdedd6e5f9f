"""Export cost at real Gemma 3 shapes: fuse time, ONNX export time per dtype, folder sizes, a short
onnxruntime decode of each file, and the GGUF export's time and file size per dtype.

The model is the random-weight folder ``init_model`` builds for the preset (the same cached folder
as bench_train.py). Each trial runs in its own process (fresh memory; peak RSS is its own):
fuse (no adapter) -> export fp32 + q4 -> load each .onnx in onnxruntime (CPU), prefill 32 tokens and
decode 16 with the KV cache; then the fused folder -> one GGUF file per dtype (f32, f16, q8_0, q4_0,
and q4_K_M when llama-cpp-python is installed). Times are medians over trials.

    python benchmarks/bench_export.py                 # gemma-3-270m
    python benchmarks/bench_export.py --full          # also gemma-3-1b
    python benchmarks/bench_export.py --preset tiny --trials 3
    python benchmarks/bench_export.py --no-onnx --gguf f16,q8_0   # GGUF only, two dtypes

Writes JSON and a markdown table under benchmarks/out/ and appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import cpu_model, load_line, machine_info, write_results  # noqa: E402

Q4_LIMIT_MB = 300  # the 270M q4 folder must fit (DESIGN: the browser download)


def bench_model(preset: str) -> Path:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.models import init_model
    from mlx_persona.paths import cache_dir

    path = cache_dir() / "bench" / f"{preset}-fp32"
    # A folder cached before the built-in tokenizer became SentencePiece has no tokenizer.model, which
    # the GGUF vocabulary is read from: rebuild it.
    if not (path / "config.json").exists() or not (path / "tokenizer.model").exists():
        init_model(path, preset, dtype="float32", overwrite=True)
    return path


def ort_decode(path: Path, config: dict, prompt: int = 32, steps: int = 16) -> dict:
    """Prefill `prompt` tokens, then `steps` cached greedy steps, fed like transformers.js (1-based positions)."""
    import numpy as np
    import onnxruntime as ort

    t = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    load = time.perf_counter() - t
    names = [o.name for o in sess.get_outputs()]
    n_layers, kv, hd = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    cache = {f"past_key_values.{i}.{k}": np.zeros((1, kv, 0, hd), np.float32)
             for i in range(n_layers) for k in ("key", "value")}
    ids = np.arange(10, 10 + prompt, dtype=np.int64)[None]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids - 9}
    t = time.perf_counter()
    out = dict(zip(names, sess.run(None, {**feeds, **cache})))
    prefill = time.perf_counter() - t
    n = prompt
    step_times = []
    for _ in range(steps):
        tok = int(out["logits"][0, -1].argmax())
        n += 1
        cache = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(n_layers) for k in ("key", "value")}
        t = time.perf_counter()
        feeds = {"input_ids": np.array([[tok]]), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.array([[n]]), **cache}
        out = dict(zip(names, sess.run(None, feeds)))
        step_times.append(time.perf_counter() - t)
    return {"load_sec": load, "prefill_sec": prefill, "decode_tokens_per_sec": 1.0 / statistics.median(step_times),
            "finite": bool(np.isfinite(out["logits"]).all())}


def worker(a) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.export.hf import fuse
    from mlx_persona.export.onnx import DTYPE_FILES, export_onnx

    tmp = Path(a.tmp)
    t = time.perf_counter()
    hf = fuse(a.model, None, tmp / "hf", generation={"temperature": 0.0})
    fuse_sec = time.perf_counter() - t
    result = {"fuse_sec": fuse_sec, "hf_bytes": sum(p.stat().st_size for p in hf.iterdir() if p.is_file())}
    if not a.no_onnx:
        t = time.perf_counter()
        web = export_onnx(hf, tmp / "web", ("fp32", "q4"))
        result["export_sec"] = time.perf_counter() - t
        meta = json.loads((web / "mlx_persona.json").read_text())["onnx"]
        config = json.loads((web / "config.json").read_text())
        result.update({"dtype_sec": meta["seconds"], "onnx_bytes": meta["bytes"],
                       "folder_bytes": {d: sum(p.stat().st_size for p in web.iterdir() if p.is_file())
                                        + meta["bytes"][d] for d in meta["bytes"]}})
        if not a.no_run:
            result["ort"] = {d: ort_decode(web / "onnx" / DTYPE_FILES[d], config) for d in ("fp32", "q4")}
        shutil.rmtree(web)
    result["gguf"] = gguf_exports(hf, tmp, a.gguf)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


def gguf_exports(hf: Path, tmp: Path, dtypes: str) -> dict:
    """Export time and file size of one GGUF file per dtype (each removed after it is measured)."""
    from mlx_persona.export.gguf import export_gguf

    wanted = [d for d in dtypes.split(",") if d]
    try:
        import llama_cpp  # noqa: F401  (q4_K_M is quantized by llama.cpp itself)
    except ImportError:
        wanted = [d for d in wanted if d != "q4_K_M"]
    out = {}
    for dtype in wanted:
        t = time.perf_counter()
        path = export_gguf(hf, tmp / f"model-{dtype}.gguf", dtype)
        out[dtype] = {"sec": time.perf_counter() - t, "bytes": path.stat().st_size}
        path.unlink()
    return out


def run_trial(a, preset: str, model: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_export."))
    try:
        cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--tmp", str(tmp), "--gguf", a.gguf] + \
            (["--no-run"] if a.no_run else []) + (["--no-onnx"] if a.no_onnx else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{preset} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(trials: list[dict]) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    first = trials[0]
    s = {"trials": len(trials), "fuse_sec": med([t["fuse_sec"] for t in trials]),
         "hf_mb": first["hf_bytes"] / 1e6, "peak_rss_gb": max(t["peak_rss_gb"] for t in trials),
         "gguf": {d: {"sec": med([t["gguf"][d]["sec"] for t in trials]), "mb": v["bytes"] / 1e6}
                  for d, v in first["gguf"].items()}}
    if "export_sec" in first:
        s.update({"export_sec": med([t["export_sec"] for t in trials]),
                  "dtype_sec": {d: med([t["dtype_sec"][d] for t in trials]) for d in first["dtype_sec"]},
                  "folder_mb": {d: v / 1e6 for d, v in first["folder_bytes"].items()},
                  "onnx_mb": {d: v / 1e6 for d, v in first["onnx_bytes"].items()}})
    if "ort" in first:
        s["ort"] = {d: {k: (all if k == "finite" else med)([t["ort"][d][k] for t in trials]) for k in first["ort"][d]}
                    for d in first["ort"]}
    return s


def onnx_table(result: dict, trials: int) -> list[str]:
    table = [f"### Export: fuse + ONNX fp32/q4 (random weights of the real shapes; median of {trials} trial(s))",
             "", "| model | fuse s | fp32 export s | q4 export s | fp32 folder MB | q4 folder MB | q4 <= 300 MB | "
             "ORT decode tok/s fp32 / q4 | peak RSS GB |",
             "|---|---:|---:|---:|---:|---:|:-:|---:|---:|"]
    for preset, s in result["presets"].items():
        ort_col = (f"{s['ort']['fp32']['decode_tokens_per_sec']:.1f} / {s['ort']['q4']['decode_tokens_per_sec']:.1f}"
                   if "ort" in s else "-")
        ok = ("yes" if s["folder_mb"]["q4"] <= Q4_LIMIT_MB else "**no**") if preset == "gemma-3-270m" else "-"
        table.append(f"| {preset} | {s['fuse_sec']:.1f} | {s['dtype_sec']['fp32']:.1f} | {s['dtype_sec']['q4']:.1f} | "
                     f"{s['folder_mb']['fp32']:.1f} | {s['folder_mb']['q4']:.1f} | {ok} | "
                     f"{ort_col} | {s['peak_rss_gb']:.1f} |")
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--full", action="store_true", help="also gemma-3-1b")
    p.add_argument("--trials", type=int, default=1, help="export runs per preset (median)")
    p.add_argument("--no-run", action="store_true", help="skip the onnxruntime load/decode timing")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export (GGUF only)")
    p.add_argument("--gguf", default="f32,f16,q8_0,q4_0,q4_K_M",
                   help="comma-separated GGUF dtypes to export ('' for none; q4_K_M needs llama-cpp-python)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    presets = [a.preset] + (["gemma-3-1b"] if a.full and a.preset != "gemma-3-1b" else [])
    command = ("python benchmarks/bench_export.py " + " ".join(sys.argv[1:])).strip()
    result = {"benchmark": "export: fuse + ONNX (fp32, q4) + GGUF", "command": command, "machine": machine_info(),
              "presets": {}, "load_before": os.getloadavg()}
    for preset in presets:
        model = bench_model(preset)
        result["presets"][preset] = summarise([run_trial(a, preset, model) for _ in range(a.trials)])

    table = []
    if not a.no_onnx:
        table += onnx_table(result, a.trials) + [""]
    dtypes = sorted({d for s in result["presets"].values() for d in s["gguf"]}, key=a.gguf.split(",").index)
    if dtypes:
        table += [f"### Export: GGUF (fused folder -> one file per dtype; median of {a.trials} trial(s))", "",
                  "| model | fuse s | " + " | ".join(f"{d} s / MB" for d in dtypes) + " |",
                  "|---|---:|" + "---:|" * len(dtypes)]
        for preset, s in result["presets"].items():
            cells = [f"{s['gguf'][d]['sec']:.1f} / {s['gguf'][d]['mb']:.1f}" if d in s["gguf"] else "-" for d in dtypes]
            table.append(f"| {preset} | {s['fuse_sec']:.1f} | " + " | ".join(cells) + " |")
    result["load_after"] = os.getloadavg()
    result["cpu_model"] = cpu_model()
    table += ["", load_line(result["load_before"], result["load_after"])]
    md = "\n".join(table)
    write_results(Path(a.out), "bench_export_" + "_".join(presets), result, md, append=not a.no_results)


if __name__ == "__main__":
    main()
