"""Quantized decoding on the CPU: fp32 against 8- and 4-bit MLX models, MLX's quantized matmul against
mlx_persona's kernel (backend/native/qmatmul.cpp), and ONNX Runtime's q4 export of the same model.

One model (random weights of the gemma-3-270m shape, fp32), quantized with mlx-lm's own ``convert``
(affine, group size 64) to 8 and 4 bits; each variant loads through ``load_model`` (the Linux CPU
rewrites included) and generates `--new-tokens` greedy tokens from the same chat prompt with
mlx_persona's decode loop (``generation.token_steps``: the prompt in one pass, the LM head at its last
position). "MLX's" variants are the same loaded model with the quantized layers moved back to MLX's
classes (``backend.quantized.use_mlx_quantized``). ONNX Runtime runs the q4 export (``export_onnx``,
the file transformers.js loads) on the same prompt length, fed as ``bench_export`` feeds it. Medians over
`--trials`; the ratios are against fp32 in the same run. Time to first token: the prompt's pass and the
first draw (ONNX: the prompt's pass).

    python benchmarks/bench_quantized.py                         # gemma-3-270m shape
    python benchmarks/bench_quantized.py --preset tiny --new-tokens 16 --trials 1 --no-results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_export import ort_decode
from benchmarks.bench_generate import PROMPT, _time_mlx
from benchmarks.bench_train import bench_model
from benchmarks.common import load_line, machine_info, write_results


def quantized_folder(fp32: Path, bits: int) -> Path:
    """mlx-lm's ``convert -q`` of `fp32` at `bits` (group size 64), cached beside it."""
    from mlx_lm import convert

    out = fp32.parent / f"{fp32.name.removesuffix('-fp32')}-q{bits}"
    if not (out / "config.json").exists():
        convert(str(fp32), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=64)
    return out


def onnx_q4(fp32: Path) -> tuple[Path, dict]:
    """The q4 ONNX export of `fp32` (fused first, as `mlx-persona export` does), cached beside it."""
    from mlx_persona.export.hf import fuse
    from mlx_persona.export.onnx import DTYPE_FILES, export_onnx

    web = fp32.parent / f"{fp32.name}-onnx"
    if not (web / "onnx" / DTYPE_FILES["q4"]).exists():
        hf = fuse(str(fp32), None, fp32.parent / f"{fp32.name}-fused", overwrite=True)
        export_onnx(hf, web, ("q4",), overwrite=True)
    return web / "onnx" / DTYPE_FILES["q4"], json.loads((web / "config.json").read_text())


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors") / 1e6


def bench_mlx(folder: Path, n_new: int, trials: int, kernel: str) -> dict:
    """Decode tokens/s and time to first token of `folder`'s model; `kernel` ``ours`` or ``mlx``."""
    import mlx.core as mx

    from mlx_persona.backend import quantized
    from mlx_persona.generation import build_prompt
    from mlx_persona.models import load_model

    model, tok = load_model(folder)
    layers = quantized.use_mlx_quantized(model) if kernel == "mlx" else quantized.use_fast_quantized(model)
    ids = build_prompt(tok, PROMPT)

    def greedy(logprobs):
        return mx.argmax(logprobs, axis=-1)

    _time_mlx(model, ids, 4, greedy, [])  # warm-up: the kernels this shape needs
    runs = [_time_mlx(model, ids, n_new, greedy, []) for _ in range(trials)]
    del model
    gc.collect()
    return {"decode_tps": statistics.median(r[1] for r in runs), "ttft_s": statistics.median(len(ids) / r[0] for r in runs),
            "prompt_tokens": len(ids), "quantized_layers": layers, "weights_mb": _megabytes(folder), "trials": trials}


def bench_ort(fp32: Path, prompt_tokens: int, n_new: int, trials: int) -> dict:
    path, config = onnx_q4(fp32)
    runs = [ort_decode(path, config, prompt=prompt_tokens, steps=n_new) for _ in range(trials + 1)][1:]  # one warm-up
    return {"decode_tps": statistics.median(r["decode_tokens_per_sec"] for r in runs),
            "ttft_s": statistics.median(r["prefill_sec"] for r in runs), "prompt_tokens": prompt_tokens,
            "weights_mb": sum(p.stat().st_size for p in path.parent.glob("model_q4.onnx*")) / 1e6, "trials": trials}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime's q4")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args()

    machine = machine_info()  # sets up the Linux speed layer before mlx loads
    from mlx_persona.backend import qmatmul

    qmatmul.load()  # built before any timing
    fp32 = bench_model(a.preset)
    result = {"benchmark": "quantized decode (CPU)", "command": "python benchmarks/bench_quantized.py " + " ".join(sys.argv[1:]),
              "machine": machine, "kernel": qmatmul.status(), "load_before": os.getloadavg(), "variants": {}}
    plan = [("fp32", fp32, "ours")] + [(f"{bits}-bit, {name}", quantized_folder(fp32, bits), kernel)
                                        for bits in (8, 4) for name, kernel in (("MLX's quantized_matmul", "mlx"),
                                                                                 ("mlx_persona's kernel", "ours"))]
    for name, folder, kernel in plan:
        result["variants"][name] = bench_mlx(folder, a.new_tokens, a.trials, kernel)
        print(name, result["variants"][name], flush=True)
    if not a.no_onnx:
        prompt = result["variants"]["fp32"]["prompt_tokens"]
        result["variants"]["ONNX Runtime q4 (export_onnx)"] = bench_ort(fp32, prompt, a.new_tokens, a.trials)
    result["load_after"] = os.getloadavg()

    base = result["variants"]["fp32"]
    title = (f"### Quantized decode, {a.preset} shape, CPU ({a.new_tokens} greedy tokens, median of {a.trials}; "
             f"prompt {base['prompt_tokens']} tokens)")
    lines = [title, "",
             "| variant | weights MB | decode tok/s | x fp32 | time to first token s |", "|---|---:|---:|---:|---:|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['weights_mb']:.1f} | {v['decode_tps']:.1f} | {v['decode_tps'] / base['decode_tps']:.2f} | "
                     f"{v['ttft_s']:.3f} |")
    lines += ["", f"Kernel: {result['kernel']}. " + load_line(result["load_before"], result["load_after"])]
    write_results(Path(a.out), f"bench_quantized_{a.preset}", result, "\n".join(lines), append=not a.no_results)


if __name__ == "__main__":
    main()
