"""Generation speed: mlx_persona's HF-semantics chain vs mlx-lm's samplers vs transformers on PyTorch.

All on the same weights (random weights of a real Gemma 3 shape, fp32 on CPU), the same prompt, and
the same number of new tokens (end tokens are suppressed for the whole run so every variant decodes
exactly `--new-tokens`). The MLX variants share one decode loop (mlx-lm's `generate_step`), so the
difference between them is the sampler and logits processors alone:

- `mlx-lm plain`: mlx-lm's `make_sampler(temp=0.8)`, no processors (the baseline of the <=5% target);
- `mlx-lm comparable`: mlx-lm's sampler and processors at the persona settings
  (temp 0.8, top_k 50, top_p 0.95, repetition_penalty 1.1 over its last 20 tokens);
- `mlx_persona persona`: our chain with transformers' semantics (min_new_tokens, repetition penalty
  over prompt + generated, temperature -> top-k -> top-p);
- `mlx_persona persona, its own loop`: the same chain in `generate`'s decode loop
  (`mlx_persona.generation.token_steps`: the prompt in one pass, the LM head at its last position only,
  a fused log-softmax), what users get;
- `transformers (torch)`: `model.generate` with the same settings, on the best torch device.

`--batch-sizes 1,4,16` adds batched generation (:mod:`mlx_persona.batch_generation`): that many prompts
from the eval set, each with its own seed and the persona settings, decoded together; tokens/s counts every
row's tokens over the wall time, prefill included, against one prompt at a time through `generate` (the
issue's goal: >= 6x at batch 16 on the 270m shape). `--eval-e2e` times `evaluate` (prompts x seeds, persona
preset, no validation loss) at batch size 1 and at the default batch size (the goal: >= 5x faster at the
1b shape with 40 prompts x 3 seeds). Both want a quiet machine: the load average is recorded with them.

`--ttft-breakdown` times the way from a prompt to its first token part by part (chat template, set-up, the
layers and, op by op, their matmuls and attention, the LM head, processors, log-softmax, draw), end to end
for mlx_persona's loop, mlx-lm's generate_step and transformers' generate (bf16 and fp32 weights), for
short chat prompts and one ~400-token conversation (benchmarks/ttft_breakdown.py).

    python benchmarks/bench_generate.py                      # gemma-3-270m shape
    python benchmarks/bench_generate.py --preset tiny --new-tokens 32 --trials 2
    python benchmarks/bench_generate.py --batch-sizes 1,4,16 --no-torch
    python benchmarks/bench_generate.py --preset gemma-3-1b --eval-e2e --batch-sizes '' --no-torch
    python benchmarks/bench_generate.py --ttft-breakdown --trials 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_train import bench_model  # noqa: E402
from benchmarks.common import cpu_model, machine_info, write_results  # noqa: E402

PROMPT = ("Hi Bluey! My name is Sam and I am seven. Can you tell me all about the best game you ever played "
          "with Bingo in the backyard, and what Mum and Dad did when it started to rain?")


def _time_mlx(model, ids, n_new, sampler, processors, loop: str = "mlx_persona") -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) for one generation of exactly n_new tokens, through mlx_persona's
    decode loop (`generate`'s, the default) or mlx-lm's ``generate_step`` (`loop="mlx-lm"`)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_persona.generation import token_steps

    if loop == "mlx-lm":
        steps = (t for t, _ in generate_step(mx.array(ids), model, max_tokens=n_new, sampler=sampler,
                                             logits_processors=processors))
    else:
        steps = token_steps(model, ids, sampler, processors, max_tokens=n_new)
    tic = time.perf_counter()
    t_first = None
    count = 0
    for token in steps:
        if t_first is None:
            t_first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    return len(ids) / (t_first - tic), (count - 1) / (end - t_first)


def bench_mlx(model_path: Path, n_new: int, trials: int) -> dict:
    import mlx_persona.backend

    mlx_persona.backend.setup()  # the Linux speed layer, before mlx loads
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from mlx_persona.generation import build_prompt, end_token_ids
    from mlx_persona.models import load_model
    from mlx_persona.sampling import make_sampler_and_processors, preset

    model, tok = load_model(model_path)
    ids = build_prompt(tok, PROMPT)
    ends = end_token_ids(tok, model_path)
    cfg = preset("persona")
    cfg.max_new_tokens = cfg.min_new_tokens = n_new  # suppress end ids for the whole run
    cfg.seed = 0

    def ban_ends(tokens, logits):  # mlx-lm has no min_new_tokens: ban the end ids the same way
        return logits.at[..., ends].add(-float("inf"))

    def ours():
        return make_sampler_and_processors(cfg, prompt_tokens=ids, eos_token_ids=ends)

    variants = {  # (sampler and processors, decode loop)
        "mlx-lm plain": (lambda: (make_sampler(temp=0.8), [ban_ends]), "mlx-lm"),
        "mlx-lm comparable": (lambda: (make_sampler(temp=0.8, top_p=0.95, top_k=50),
                                       make_logits_processors(repetition_penalty=1.1) + [ban_ends]), "mlx-lm"),
        "mlx_persona persona": (ours, "mlx-lm"),
        "mlx_persona persona, its own loop (generate)": (ours, "mlx_persona"),
    }
    out = {}
    for name, (make, loop) in variants.items():
        _time_mlx(model, ids, 8, *make(), loop=loop)  # warm-up (compiles the kernels this shape needs)
    for name, (make, loop) in variants.items():
        runs = [_time_mlx(model, ids, n_new, *make(), loop=loop) for _ in range(trials)]
        out[name] = {"prompt_tps": statistics.median(r[0] for r in runs),
                     "decode_tps": statistics.median(r[1] for r in runs), "trials": trials}
    out["_prompt_tokens"] = len(ids)
    return out


def bench_torch(model_path: Path, n_new: int, trials: int, prompt_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(model_path))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=device)
    assert ids.shape[1] == prompt_len
    kwargs = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                  min_new_tokens=n_new, max_new_tokens=n_new, pad_token_id=0)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
        prefill, decode = [], []
        for _ in range(trials):
            sync()
            t = time.perf_counter()
            model(ids)
            sync()
            prefill.append(ids.shape[1] / (time.perf_counter() - t))
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            sync()
            total = time.perf_counter() - t
            # Decode time = whole generate minus its own prefill (timed above on the same input).
            decode.append((out.shape[1] - ids.shape[1] - 1) / max(total - ids.shape[1] / prefill[-1], 1e-9))
    return {"transformers (torch)": {"prompt_tps": statistics.median(prefill), "decode_tps": statistics.median(decode),
                                     "trials": trials, "device": device, "threads": torch.get_num_threads()}}


def _eval_prompts(n: int) -> list[str]:
    from mlx_persona.eval.options import DEFAULT_PROMPTS, load_prompts

    prompts = load_prompts(DEFAULT_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(n)]


def bench_batch(model_path: Path, n_new: int, trials: int, batch_sizes: list[int]) -> dict:
    """Tokens/s of `b` eval prompts decoded together (each with its own seed) for each b, and of one prompt
    at a time through `generate`; every row makes exactly `n_new` tokens (end ids held back)."""
    from mlx_persona.batch_generation import batch_generate
    from mlx_persona.generation import end_token_ids, generate
    from mlx_persona.models import load_model
    from mlx_persona.sampling import preset

    model, tok = load_model(model_path)
    ends = end_token_ids(tok, model_path)
    cfg = dataclasses.replace(preset("persona"), max_new_tokens=n_new, min_new_tokens=n_new)

    def single() -> float:
        prompt = _eval_prompts(1)[0]
        tic = time.perf_counter()
        r = generate(model, tok, prompt, dataclasses.replace(cfg, seed=0), end_ids=ends)
        return r.generated_tokens / (time.perf_counter() - tic)

    def batched(b: int) -> float:
        configs = [dataclasses.replace(cfg, seed=s) for s in range(b)]
        tic = time.perf_counter()
        results = batch_generate(model, tok, _eval_prompts(b), configs, batch_size=b, end_ids=ends)
        return sum(r.generated_tokens for r in results) / (time.perf_counter() - tic)

    from mlx_persona.backend import draw

    out = {}
    modes = ("", "MLX-op draw") if draw.available() else ("",)  # the CPU draw kernel where it runs, and without
    for mode in modes:
        if mode:
            os.environ[draw.ENV] = "0"
        try:
            batched(2)  # warm-up: the kernels of both paths
            single()
            suffix = f", {mode}" if mode else ""
            out[f"single (generate){suffix}"] = statistics.median(single() for _ in range(trials))
            for b in batch_sizes:
                out[f"batch {b}{suffix}"] = statistics.median(batched(b) for _ in range(trials))
        finally:
            os.environ.pop(draw.ENV, None)
    return out


def bench_eval(model_path: Path, n_prompts: int, n_seeds: int, max_new_tokens: int | None) -> dict:
    """Wall seconds of `evaluate` over n_prompts x n_seeds (persona preset, no validation loss), at batch
    size 1 and at the default batch size."""
    from mlx_persona.eval.entries import parse_model_arg
    from mlx_persona.eval.evaluate import evaluate
    from mlx_persona.eval.options import EvalOptions
    from mlx_persona.sampling import preset

    cfg = preset("persona")
    if max_new_tokens:
        cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens, min_new_tokens=min(cfg.min_new_tokens,
                                                                                         max_new_tokens))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:  # a private 0700 folder
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _eval_prompts(n_prompts)))
        for batch_size in (1, 0):
            options = EvalOptions(prompts=str(prompts), seeds=list(range(n_seeds)), valid=None, batch_size=batch_size)
            lines = []
            tic = time.perf_counter()
            evaluate([parse_model_arg(str(model_path))], cfg, options, Path(tmp) / f"eval-{batch_size}",
                     log=lines.append)
            chosen = next((line.split(", ")[1] for line in lines if " at a time" in line), "?")
            out["batch 1" if batch_size == 1 else f"default ({chosen})"] = time.perf_counter() - tic
    return out


def _batch_markdown(preset: str, n_new: int, trials: int, rates: dict, load: str) -> list[str]:
    title = (f"### Batched generation ({preset}, persona settings, {n_new} new tokens a row, median of {trials}; "
             f"load average {load})")
    lines = [title, "", "| rows | tok/s (all rows) | vs one at a time (the same draw) |", "|---|---:|---:|"]
    for name, rate in rates.items():
        mode = name.partition(", ")[2]
        base = rates["single (generate)" + (f", {mode}" if mode else "")]
        lines.append(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    lines += ["", "Draws: the CPU draw kernel (mlx_persona.backend.draw) unless the row says MLX-op draw "
              "(MLX_PERSONA_CPU_DRAW=0: the sampler as MLX ops, each on one core)."]
    return lines


def _eval_markdown(preset: str, n_prompts: int, n_seeds: int, seconds: dict, load: str) -> list[str]:
    base = seconds["batch 1"]
    title = f"### Eval end to end ({preset}, {n_prompts} prompts x {n_seeds} seeds, persona preset; load {load})"
    lines = [title, "", "| batch size | seconds | speed-up |", "|---|---:|---:|"]
    lines += [f"| {name} | {sec:.1f} | {base / sec:.2f}x |" for name, sec in seconds.items()]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--batch-sizes", default="", help="comma-separated batch sizes to time, e.g. 1,4,16")
    p.add_argument("--eval-e2e", action="store_true", help="time evaluate() at batch size 1 and the default")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--eval-max-new-tokens", type=int, help="default: the persona preset's (256)")
    p.add_argument("--ttft-breakdown", action="store_true", help="where the time to the first token goes")
    p.add_argument("--ttft-prompts", type=int, default=3, help="short eval prompts for --ttft-breakdown")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args(argv)

    model_path = bench_model(a.preset)
    command = ("python benchmarks/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    batch_sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    if a.ttft_breakdown:
        return ttft(a, model_path, command, load)
    if batch_sizes or a.eval_e2e:
        result = {"benchmark": "batched generation", "command": command, "machine": machine_info(),
                  "preset": a.preset, "dtype": "float32", "load_average": load}
        lines = []
        if batch_sizes:
            rates = bench_batch(model_path, a.new_tokens, a.trials, batch_sizes)
            result.update(new_tokens=a.new_tokens, trials=a.trials, tokens_per_sec=rates)
            lines += _batch_markdown(a.preset, a.new_tokens, a.trials, rates, load) + [""]
        if a.eval_e2e:
            seconds = bench_eval(model_path, a.eval_prompts, a.eval_seeds, a.eval_max_new_tokens)
            result.update(eval_prompts=a.eval_prompts, eval_seeds=a.eval_seeds, eval_seconds=seconds)
            lines += _eval_markdown(a.preset, a.eval_prompts, a.eval_seeds, seconds, load) + [""]
        from mlx_persona.backend import sgemm
        from mlx_persona.backend.cpu import describe_flags

        mode = f"bf16 ({sgemm.bf16_status()})" if sgemm.bf16_active() else "exact fp32"
        result["matmuls"] = mode
        lines.append(f"Matmuls: {mode}. CPU: {cpu_model()} ({describe_flags()}). Load average {load} on "
                     f"{os.cpu_count()} CPUs while this ran; the goals (>= 6x at batch 16, >= 5x for eval) are to be "
                     "measured on a quiet machine.")
        write_results(Path(a.out), f"bench_generate_batch_{a.preset}", result, "\n".join(lines),
                      append=not a.no_results)
    if not batch_sizes and not a.eval_e2e:
        single_sequence(a, model_path, command)


def ttft(a, model_path: Path, command: str, load: str) -> None:
    """The --ttft-breakdown table (benchmarks/ttft_breakdown.py): MLX first, then transformers."""
    from benchmarks import ttft_breakdown

    machine = machine_info()
    res = {"mlx": ttft_breakdown.bench_mlx(model_path, a.ttft_prompts, a.trials)}
    if not a.no_torch:
        res["torch"] = {dt: ttft_breakdown.bench_torch(model_path, a.ttft_prompts, a.trials, dt)
                        for dt in ("bfloat16", "float32")}
    load = f"{load} before, {' '.join(f'{x:.1f}' for x in os.getloadavg())} after"
    result = {"benchmark": "time to first token", "command": command, "machine": machine, "preset": a.preset,
              "dtype": "float32", "trials": a.trials, "load_average": load, "milliseconds": res}
    md = ttft_breakdown.markdown(res, a.trials, load, f"{cpu_model()}: {machine.get('cpu')}")
    write_results(Path(a.out), f"bench_generate_ttft_{a.preset}", result, md, append=not a.no_results)


def single_sequence(a, model_path: Path, command: str) -> None:
    """The single-sequence table: our chain against mlx-lm's samplers and transformers."""
    res = bench_mlx(model_path, a.new_tokens, a.trials)
    prompt_len = res.pop("_prompt_tokens")
    if not a.no_torch:
        res.update(bench_torch(model_path, a.new_tokens, a.trials, prompt_len))
    base = res["mlx-lm plain"]["decode_tps"]
    overhead = 1 - res["mlx_persona persona"]["decode_tps"] / base
    result = {"benchmark": "generation speed", "command": command, "machine": machine_info(), "preset": a.preset,
              "dtype": "float32", "prompt_tokens": prompt_len, "new_tokens": a.new_tokens, "variants": res,
              "persona_chain_overhead_vs_mlx_lm_plain": overhead, "target_overhead": "<= 0.05"}
    lines = [f"### Generation ({a.preset}, random weights, fp32, prompt {prompt_len} tokens, {a.new_tokens} new "
             f"tokens, median of {a.trials})", "",
             "| variant | prompt tok/s | decode tok/s | decode vs mlx-lm plain |", "|---|---:|---:|---:|"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} | {r['decode_tps'] / base:.3f}x |")
    lines.append(f"\nOur full chain costs {overhead * 100:.1f}% decode throughput vs mlx-lm's plain sampler "
                 "(target <= 5%).")
    md = "\n".join(lines)
    write_results(Path(a.out), f"bench_generate_{a.preset}", result, md, append=not a.no_results)


if __name__ == "__main__":
    main()
