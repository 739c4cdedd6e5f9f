"""Shared helpers for benchmarks: machine description, JSON out, RESULTS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import socket
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_info() -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_persona.backend import describe

    info = describe()
    info["processor"] = platform.processor() or platform.machine()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_line(before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """One sentence naming the CPU and the load average (1/5/15 min) before and after a run."""
    from mlx_persona.backend.cpu import describe_flags

    fmt = lambda xs: " ".join(f"{x:.1f}" for x in xs)
    return (f"{cpu_model()} ({describe_flags()}), {os.cpu_count()} CPUs; load average (1/5/15 min) {fmt(before)} before, "
            f"{fmt(after)} after (the machine was shared with other jobs).")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def append_results(markdown: str, result: dict) -> None:
    """Appends a table with its machine, versions, device, dtype and command to benchmarks/RESULTS.md."""
    m = result.get("machine", {})
    header = (f"\n## {datetime.date.today().isoformat()} · {m.get('platform')} · {m.get('cpu_count')} CPUs · "
              f"device {m.get('device')} · mlx {m.get('mlx')} · mlx-lm {m.get('mlx_lm')}"
              + (f" · torch {m['torch']}" if "torch" in m else "") + f" · BLAS {m.get('blas')}"
              + (f" ({m['blas_core']} kernels)" if m.get("blas_core") else "") + "\n\n"
              f"`{result.get('command')}`\n\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n")
    with open(RESULTS, "a") as f:
        f.write(header + markdown + "\n")


def write_results(out: Path, name: str, result: dict, markdown: str, *, append: bool = True) -> None:
    """The end of every benchmark: ``<out>/<name>.json`` (the result) and ``<out>/<name>.md`` (the
    table), the table appended to RESULTS.md unless not `append` (``--no-results``), and printed."""
    write_json(out / f"{name}.json", result)
    (out / f"{name}.md").write_text(markdown + "\n")
    if append:
        append_results(markdown, result)
    print(markdown)


def free_ports(n: int) -> int:
    """A port p with p..p+n-1 free on 127.0.0.1 (mlx's ring backend listens on consecutive ports).

    Used by bench_distributed and tests/test_distributed. A private RNG, so a seeded global one
    cannot make two runs pick the same ports.
    """
    rng = random.Random()
    for _ in range(100):
        start = rng.randrange(20000, 60000)
        socks = []
        try:
            for p in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")
