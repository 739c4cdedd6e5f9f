"""Serving speed: `mlx-persona serve` against `mlx_lm.server` on the same model, with 1, 4 and 16 clients.

One random-weight fp32 model folder (`init_model` into a private temporary folder, the embedding rows of
ids that show no text zeroed: see `zero_rows_without_text`) is served by
each server in turn, alone on the machine (never both at once). Every client is a thread of the official
`openai` client streaming greedy chat completions of `--max-tokens` tokens (`stream_options.include_usage`
gives the count; on our server `min_new_tokens` makes every reply that long, and a random model seldom
ends sooner on mlx-lm's). Per level: one warm-up request, then `--trials` rounds in which each of the N
clients sends `--requests` requests back to back, each with a prompt of its own (so that mlx_lm.server's
prompt cache cannot skip a prefill that ours does; a failed request is counted, not retried). Measured: aggregate tokens/s (completion tokens of the
round / its wall time; median over rounds) and time to first token (the first chunk with text; median
over all requests). Both servers get the Linux speed layer (`mlx_persona.backend.setup()`: OpenBLAS, kernel JIT
flags) unless `--mlx-lm-plain`; ours also its CPU rewrites of Gemma's GELU and attention, as always.
Our server decodes one request at a time; mlx_lm.server batches concurrent ones (`--decode-concurrency`).

    python benchmarks/bench_serve.py                                   # gemma-3-270m shape
    python benchmarks/bench_serve.py --preset tiny --clients 1,4 --requests 1 --max-tokens 8 --trials 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (
    cpu_model,
    free_ports,
    load_line,
    machine_info,
    write_results,
)

# Each request of a run has its own number, first: no server's prompt cache (mlx_lm.server keeps one) can
# answer a request from an earlier one beyond the chat template's first tokens.
PROMPT = "Friend {i} here. Hi Bluey! What game should we play in the backyard today, and why?"
NUMBERS = itertools.count()  # next() on it is atomic under the GIL
MLX_LM = ("import sys, mlx_persona.backend as b\n"
          "if sys.argv[1] == 'setup': b.setup()\n"
          "from mlx_lm.server import main\n"
          "sys.argv = ['mlx_lm.server', *sys.argv[2:]]\n"
          "main()\n")


class Server:
    """A server process; `base` once it answers `probe`."""

    def __init__(self, cmd: list[str], log: Path, probe: str, port: int | None = None, timeout: float = 600):
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while port is None:
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
            port = int(m.group(1)) if m else None
            self._alive(deadline)
        self.base = f"http://127.0.0.1:{port}/v1"
        while not self._answers(f"http://127.0.0.1:{port}{probe}"):
            self._alive(deadline)

    def _alive(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{self.log.read_text()[-3000:]}")
        time.sleep(0.2)

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def zero_rows_without_text(model: Path) -> None:
    """Zeroes the embedding rows of ids that show no text by themselves: those past the tokenizer's pieces
    (262,144 rows, 2,048 pieces at the Gemma shapes) and the 256 byte pieces (``<0x00>``...).

    Their logits are then 0 (tied embeddings), below the largest of the ~1,800 random others, so greedy
    decoding never picks one. mlx_lm.server's SentencePiece detokenizer raises IndexError on an id past
    the pieces, and byte pieces of random text seldom complete a UTF-8 character, so both servers would
    hold the text back and the time to the first text would measure that, not the server. A trained
    model's first token shows text. The shapes, and so the cost of every step, are unchanged.
    """
    import mlx.core as mx
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    path = model / "model.safetensors"
    weights, meta = mx.load(str(path), return_metadata=True)
    table = weights["model.embed_tokens.weight"]
    keep = mx.array([i < len(pieces) and not pieces[i].startswith("<0x") for i in range(table.shape[0])])
    weights["model.embed_tokens.weight"] = mx.where(keep[:, None], table, mx.zeros_like(table))
    mx.save_safetensors(str(path), weights, metadata=meta)


def one_request(client, model: str, i: int, max_tokens: int, extra: dict) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed greedy reply."""
    tic = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT.format(i=i)}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - tic
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - tic), tokens


def one_round(client, model: str, clients: int, a, extra: dict) -> tuple[float, list[tuple[float, int]], int]:
    """(wall seconds, [(TTFT, tokens)], failed requests) of `clients` threads each sending `a.requests`
    requests back to back."""
    results: list[tuple[float, int]] = []  # list.append is atomic
    failed: list[str] = []

    def run(c):
        for _ in range(a.requests):
            try:
                results.append(one_request(client, model, next(NUMBERS), a.max_tokens, extra))
            except Exception as e:  # noqa: BLE001 - counted and reported, the round goes on
                failed.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for message in sorted(set(failed)):
        print(f"  failed: {message}", flush=True)
    return time.perf_counter() - tic, results, len(failed)


def measure(base: str, model: str, clients: int, a, extra: dict) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=3600)
    one_request(client, model, next(NUMBERS), a.max_tokens, extra)  # warm-up
    rates, ttft, tokens, failed = [], [], [], 0
    for _ in range(a.trials):
        wall, results, lost = one_round(client, model, clients, a, extra)
        rates.append(sum(n for _, n in results) / wall)
        ttft += [t for t, _ in results]
        tokens += [n for _, n in results]
        failed += lost
    return {"tokens_per_s": statistics.median(rates), "ttft_s": statistics.median(ttft),
            "tokens_per_request": statistics.median(tokens), "rounds_tokens_per_s": rates, "failed": failed}


def bench(name: str, server: Server, model: str, a, extra: dict) -> dict:
    try:
        out = {}
        for n in a.clients:
            out[n] = measure(server.base, model, n, a, extra)
            print(f"{name}, {n} clients: {out[n]['tokens_per_s']:.1f} tok/s, TTFT {out[n]['ttft_s'] * 1e3:.0f} ms",
                  flush=True)
        return out
    finally:
        server.stop()


def table(res: dict, a) -> str:
    lines = [(f"Serving: 1 model ({a.preset}, fp32 random weights), greedy, {a.max_tokens} tokens per reply, "
              f"{a.requests} requests per client per round, median of {a.trials} rounds"),
             "", ("| clients | ours tok/s | mlx_lm.server tok/s | ratio | ours TTFT ms | mlx_lm TTFT ms | ratio | "
                  "tokens/reply ours / mlx_lm | failed requests ours / mlx_lm |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in a.clients:
        o, m = res["ours"][n], res["mlx_lm"][n]
        lines.append(f"| {n} | {o['tokens_per_s']:.1f} | {m['tokens_per_s']:.1f} | "
                     f"{o['tokens_per_s'] / m['tokens_per_s']:.2f} | {o['ttft_s'] * 1e3:.0f} | "
                     f"{m['ttft_s'] * 1e3:.0f} | {o['ttft_s'] / m['ttft_s']:.2f} | "
                     f"{o['tokens_per_request']:.0f} / {m['tokens_per_request']:.0f} | {o['failed']} / {m['failed']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--clients", default="1,4,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--mlx-lm-plain", action="store_true", help="run mlx_lm.server without our Linux speed layer")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args()
    machine = machine_info()  # runs mlx_persona.backend.setup() before mlx loads
    from mlx_persona.models import init_model

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:  # created 0700
        tmp = Path(tmp)
        model = tmp / "model"
        init_model(model, a.preset, dtype="float32")  # fp32 on disk: mlx-lm would run bf16 weights as bf16
        zero_rows_without_text(model)
        port = free_ports(1)
        ours = Server([sys.executable, "-m", "mlx_persona", "serve", "--model", f"bench={model}", "--preset",
                       "greedy", "--port", "0", "--queue-size", "256"], tmp / "ours.log", "/health")
        res = {"ours": bench("mlx-persona serve", ours, "bench", a, {"min_new_tokens": a.max_tokens})}
        theirs = Server([sys.executable, "-c", MLX_LM, "plain" if a.mlx_lm_plain else "setup", "--model", str(model),
                         "--port", str(port), "--max-tokens", str(a.max_tokens)], tmp / "mlx_lm.log",
                        "/v1/models", port=port)
        res["mlx_lm"] = bench("mlx_lm.server", theirs, "default_model", a, {})
    result = {"machine": machine, "command": " ".join(["python", *sys.argv]), "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "results": res,
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "load_before": load_before,
        "load_after": os.getloadavg()}
    md = table(res, a) + "\n\n" + load_line(load_before, result["load_after"])
    write_results(a.out, "bench_serve", result, md, append=not a.no_results)


if __name__ == "__main__":
    main()
