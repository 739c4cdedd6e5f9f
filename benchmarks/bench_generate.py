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
- `transformers (torch)`: `model.generate` with the same settings, on the best torch device.

    python benchmarks/bench_generate.py                      # gemma-3-270m shape
    python benchmarks/bench_generate.py --preset tiny --new-tokens 32 --trials 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_train import bench_model  # noqa: E402
from benchmarks.common import machine_info, write_results  # noqa: E402

PROMPT = ("Hi Bluey! My name is Sam and I am seven. Can you tell me all about the best game you ever played "
          "with Bingo in the backyard, and what Mum and Dad did when it started to rain?")


def _time_mlx(model, ids, n_new, sampler, processors) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) for one generation of exactly n_new tokens."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tic = time.perf_counter()
    t_first = None
    count = 0
    for token, _ in generate_step(mx.array(ids), model, max_tokens=n_new, sampler=sampler,
                                  logits_processors=processors):
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

    variants = {
        "mlx-lm plain": lambda: (make_sampler(temp=0.8), [ban_ends]),
        "mlx-lm comparable": lambda: (make_sampler(temp=0.8, top_p=0.95, top_k=50),
                                      make_logits_processors(repetition_penalty=1.1) + [ban_ends]),
        "mlx_persona persona": lambda: make_sampler_and_processors(cfg, prompt_tokens=ids, eos_token_ids=ends),
    }
    out = {}
    for name, make in variants.items():
        _time_mlx(model, ids, 8, *make())  # warm-up (compiles the kernels this shape needs)
    for name, make in variants.items():
        runs = [_time_mlx(model, ids, n_new, *make()) for _ in range(trials)]
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gemma-3-270m", choices=["tiny", "gemma-3-270m", "gemma-3-1b"])
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args()

    model_path = bench_model(a.preset)
    res = bench_mlx(model_path, a.new_tokens, a.trials)
    prompt_len = res.pop("_prompt_tokens")
    if not a.no_torch:
        res.update(bench_torch(model_path, a.new_tokens, a.trials, prompt_len))
    base = res["mlx-lm plain"]["decode_tps"]
    overhead = 1 - res["mlx_persona persona"]["decode_tps"] / base
    command = ("python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])).strip()
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
