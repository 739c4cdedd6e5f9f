"""Helpers shared by the resume, crash, signal, safety and distributed tests.

`reference_run` trains once per session per config (in this process) and returns its output folder, so
that several test modules compare against the same uninterrupted run. `Held` starts a `train` process
that stops at the test-only hold points of :mod:`mlx_persona.testing`, for a test to kill it there or to
act while it waits. The standard config (`RUN`) uses
LoRA dropout, so that resuming must also restore the PRNG key, and 12 examples in batches of 4, so that
6 steps cross an epoch boundary (the data order is re-shuffled per epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]

# Everything here but save_every / keep_checkpoints / log_every changes the weights.
RUN = {"steps": 6, "batch_size": 4, "optim.learning_rate": 1e-2, "optim.warmup_steps": 2, "lora.rank": 4,
       "lora.dropout": 0.1, "eval_every": 2, "log_every": 1, "save_every": 2, "keep_checkpoints": 3,
       "progress": False}

_CACHE: dict[str, Path] = {}


def config(tiny_path, data, out, **changes):
    """A validated TrainConfig: `RUN` plus `changes` (dotted keys)."""
    from mlx_persona.tuner.config import load_config

    values = {"model": str(tiny_path), "data": str(data), "output": str(out), **RUN, **changes}
    return load_config(None, values)


def reference_run(tiny_path, data, root: Path, **changes) -> Path:
    """The output folder of an uninterrupted run of `config(...)`, trained once per session."""
    from mlx_persona.tuner.run import run

    key = json.dumps([str(tiny_path), str(data), sorted(changes.items())])
    if key not in _CACHE:
        out = root / f"reference-{len(_CACHE)}"
        run(config(tiny_path, data, out, **changes), log=lambda *a: None)
        _CACHE[key] = out
    return _CACHE[key]


def weights(path: Path) -> dict:
    return mx.load(str(path))


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    return max(mx.abs(wa[k] - wb[k]).max().item() for k in wa)


def bitwise_equal(a: Path, b: Path) -> bool:
    """Same tensors, same bytes (safetensors files of equal tensors can differ only in metadata order)."""
    wa, wb = weights(a), weights(b)
    return sorted(wa) == sorted(wb) and all(wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k])
                                             for k in wa)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def cli_args(tiny_path, data, out, **changes) -> list[str]:
    """`mlx-persona train` arguments equivalent to `config(tiny_path, data, out, **changes)`."""
    values = {**RUN, **changes}
    args = ["--model", str(tiny_path), "--data", str(data), "-o", str(out), "--no-progress"]
    for key, value in values.items():
        if key != "progress":
            args += ["--set", f"{key}={value}"]
    return args


def train_process(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """`python -m mlx_persona.train ARGS` in a new process (stdout/stderr to pipes)."""
    full_env = {**os.environ, **(env or {})}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-m", "mlx_persona.train", *args], cwd=REPO, env=full_env,
                            stdin=subprocess.DEVNULL, text=True, **popen)


class Held:
    """`python -m mlx_persona.train ARGS` that waits at each of `points` (``MLX_PERSONA_TEST_HOLD``).

    `wait(point)` returns once the process waits there; `release()` lets it go on (to its next point);
    `kill()` SIGKILLs it where it waits. Its output goes to a file (`log`), so it never blocks on a pipe.
    Use it as a context manager: a process still running at the end is killed.
    """

    def __init__(self, args: list[str], points: list[str], folder: Path, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.file, self.log = folder / f"hold-{id(self)}", folder / f"log-{id(self)}"
        self.file.unlink(missing_ok=True)
        self._log = open(self.log, "w")
        self.proc = train_process(args, env={"MLX_PERSONA_TEST_HOLD": ",".join(points),
                                             "MLX_PERSONA_TEST_HOLD_FILE": str(self.file), **(env or {})},
                                  stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log.read_text()

    def held(self, point: str) -> bool:
        """Whether the process waits at `point` now."""
        try:
            return self.proc.poll() is None and self.file.read_text() == f"held {point} pid {self.pid}\n"
        except FileNotFoundError:
            return False

    def wait(self, point: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.held(point):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before reaching {point}:\n{self.output()}")
            assert time.monotonic() < deadline, f"timed out waiting for {point}:\n{self.output()}"
            time.sleep(0.02)

    def release(self) -> None:
        self.file.unlink()

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait(timeout=60)

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


class SignalAtStep:
    """A stand-in for `train.Progress` that sends `sig` to this process when step `step` completes.

    The signal is a real one, handled by the training loop's handler; the loop notices it at the next
    step's all-reduce point, so the run stops, saved, after step `step + 1`.
    """

    def __init__(self, sig: int, step: int, times: int = 1):
        self.sig, self.step, self.times = sig, step, times

    def __call__(self, total, enabled=True, **kwargs):
        outer = self

        class _Progress:
            def start(self, step=0):
                pass

            def update(self, step, loss, tps, extra=""):
                if step == outer.step:
                    for _ in range(outer.times):
                        os.kill(os.getpid(), outer.sig)

            def note(self, text):
                pass

            def close(self):
                pass

        return _Progress()


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


SIGTERM, SIGINT = signal.SIGTERM, signal.SIGINT


def two_process_script(script: Path, *args: str, timeout: int = 180) -> None:
    """Runs `python SCRIPT ARGS... TESTS_DIR` as two ring processes on localhost (one BLAS thread each), with
    the checkout and tests/ importable; fails on any rank's error. Skips where mlx.launch is missing."""
    import pytest

    from benchmarks.common import free_ports

    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        pytest.skip("mlx.launch not installed")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)),
                           "--", sys.executable, str(script), *args, str(REPO / "tests")],
                          check=False, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and "exited with code" not in proc.stderr, proc.stderr[-3000:]


def pairs_folder(src: Path, dst: Path, n: int | None = None) -> Path:
    """Preference pairs made from a data folder's conversations (``train.jsonl`` and ``valid.jsonl``): the
    first user turn as the prompt, its reply as ``chosen`` and the reply's first quarter as ``rejected`` (an
    early end, the failure preference training is for)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "valid.jsonl"):
        rows = [json.loads(line) for line in (src / name).read_text().splitlines() if line.strip()][:n]
        pairs = []
        for row in rows:
            user, reply = row["messages"][0]["content"], row["messages"][1]["content"]
            words = reply.split()
            pairs.append({"prompt": user, "chosen": reply, "rejected": " ".join(words[:max(3, len(words) // 4)])})
        (dst / name).write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return dst
