"""Runs every benchmark in this folder, one after another; each appends its tables to RESULTS.md.

    python benchmarks/run_all.py              # real gemma-3-270m shape, sized for ~20 min on 2 idle CPU cores
    python benchmarks/run_all.py --full       # gemma-3-270m and gemma-3-1b, more steps (hours on a CPU)
    python benchmarks/run_all.py --only mlx_vs_torch recipe
    make bench                                # the same as the first line

Each benchmark runs as its own process, exactly as its command line (printed, and recorded in
RESULTS.md) would run it by hand. The load average before and after each one is printed too: on a
shared machine, timings are only as good as the CPU time the benchmark got.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (script, default arguments, --full runs: a list of argument lists)
BENCHMARKS = {
    "mlx_vs_torch": ("bench_mlx_vs_torch.py", ["--preset", "gemma-3-270m", "--examples", "12", "--new-tokens", "64"],
                     [["--preset", "gemma-3-270m", "--examples", "24", "--epochs", "3", "--new-tokens", "256"],
                      ["--preset", "gemma-3-1b", "--examples", "12", "--new-tokens", "128"]]),
    "recipe": ("bench_recipe.py", ["--preset", "gemma-3-270m"],
               [["--preset", "gemma-3-270m", "--original-steps", "5"],
                ["--preset", "gemma-3-1b", "--skip-tiny"]]),
    "train": ("bench_train.py", ["--preset", "gemma-3-270m", "--examples", "16"],
              [["--preset", "gemma-3-270m"], ["--preset", "gemma-3-1b"]]),
    "generate": ("bench_generate.py", ["--preset", "gemma-3-270m", "--new-tokens", "64", "--trials", "2"],
                 [["--preset", "gemma-3-270m"], ["--preset", "gemma-3-1b"]]),
    "export": ("bench_export.py", ["--preset", "gemma-3-270m"], [["--full"]]),
    "quantized": ("bench_quantized.py", ["--preset", "gemma-3-270m", "--trials", "2"],
                  [["--preset", "gemma-3-270m"], ["--preset", "gemma-3-1b"]]),
    "bf16_gemm": ("bench_bf16_gemm.py", ["--trials", "5"], [["--trials", "9"]]),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the real Gemma shapes (270m and 1b) with more steps")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[], help="leave these out")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)

    names = [n for n in (a.only or BENCHMARKS) if n not in a.skip]
    runs = []
    for name in names:
        script, default, full = BENCHMARKS[name]
        if not (REPO / "benchmarks" / script).exists():
            print(f"skip {name}: benchmarks/{script} does not exist", file=sys.stderr)
            continue
        for args in (full if a.full else [default]):
            runs.append((name, [sys.executable, f"benchmarks/{script}", *args]))

    summary = []
    start = time.perf_counter()
    for name, cmd in runs:
        shown = " ".join(["python", *cmd[1:]])
        print(f"\n=== {name}: {shown}  (load average {os.getloadavg()[0]:.2f})", flush=True)
        if a.dry_run:
            continue
        t = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO).returncode
        summary.append({"benchmark": name, "command": shown, "returncode": rc,
                        "wall_sec": round(time.perf_counter() - t, 1), "load_avg_after": os.getloadavg()[0]})
        print(f"=== {name}: exit {rc} after {summary[-1]['wall_sec']:.0f} s", flush=True)
    if a.dry_run:
        return 0
    total = time.perf_counter() - start
    print("\n" + json.dumps({"total_sec": round(total, 1), "runs": summary}, indent=2))
    print(f"\nAll tables were appended to {REPO / 'benchmarks' / 'RESULTS.md'}; charts are in benchmarks/charts/.")
    return 1 if any(s["returncode"] for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
