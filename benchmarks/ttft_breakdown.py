"""Where the time to the first token goes: `python benchmarks/bench_generate.py --ttft-breakdown`.

For chat prompts of the eval set (~20 tokens) and one long conversation (~400 tokens), persona settings,
each part of the way from a prompt to its first token is timed on its own (an ``mx.eval`` after each; medians
over the trials, milliseconds): rendering the chat template and tokenizing, the per-call set-up (end ids,
sampler and processors, KV cache), the transformer layers over the prompt (and, timed op by op in a
separate pass, their matmuls, their attention and the rest), the LM head at the last position, the first
step's logits processors, the log-softmax and the draw. End to end, prompt text to first token id, for
mlx_persona's loop (:func:`mlx_persona.generation.token_steps`) and for mlx-lm's ``generate_step`` with the
same sampler (the loop mlx_persona used before), taking turns, and for transformers' ``generate`` (one new
token) with bf16 and fp32 weights. "Cold" is the first generation in the process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PERSONA = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}


def prompts(n_short: int) -> tuple[list[list[dict]], list[dict]]:
    """`n_short` one-turn chats from the eval prompts, and the longest validation conversation with the
    first eval prompt as its next user turn (the prompts of bench_mlx_vs_torch.py's generation part)."""
    rows = [json.loads(line) for line in (REPO / "data/bluey/eval_prompts.jsonl").read_text().splitlines()
            if line.strip()]
    convs = [json.loads(line)["messages"] for line in (REPO / "data/bluey/valid.jsonl").read_text().splitlines()
             if line.strip()]
    long_conv = max(convs, key=lambda m: sum(len(x["content"]) for x in m))
    short = [[{"role": "user", "content": r["prompt"]}] for r in rows[:n_short]]
    return short, long_conv + [{"role": "user", "content": rows[0]["prompt"]}]


def _ms(fn) -> tuple[float, object]:
    import mlx.core as mx

    tic = time.perf_counter()
    out = fn()
    mx.eval(out)
    return (time.perf_counter() - tic) * 1e3, out


@contextlib.contextmanager
def timed_ops(totals: dict):
    """While inside, every ``nn.Linear`` call and Gemma 3's attention evaluate their inputs, then time
    themselves to their evaluated output, adding milliseconds to ``totals["matmuls"]`` / ``["attention"]``."""
    import mlx.core as mx
    import mlx_lm.models.gemma3_text as gemma3
    from mlx import nn

    def timed(key, fn):
        def call(*args, **kwargs):
            mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
            ms, out = _ms(lambda: fn(*args, **kwargs))
            totals[key] += ms
            return out
        return call

    linear, attention = nn.Linear.__call__, gemma3.scaled_dot_product_attention
    nn.Linear.__call__ = timed("matmuls", linear)
    gemma3.scaled_dot_product_attention = timed("attention", attention)
    try:
        yield
    finally:
        nn.Linear.__call__, gemma3.scaled_dot_product_attention = linear, attention


def parts(model, tok, messages, cfg, model_path) -> dict:
    """Milliseconds of each part of one prompt's first token (see the module doc)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_persona.generation import build_prompt, end_token_ids, log_softmax
    from mlx_persona.sampling import make_sampler_and_processors

    r = {}
    r["chat template + tokenize"], ids = _ms(lambda: build_prompt(tok, messages))
    tic = time.perf_counter()
    ends = end_token_ids(tok, model_path)
    sampler, processors = make_sampler_and_processors(cfg, prompt_tokens=ids, eos_token_ids=ends)
    cache = make_prompt_cache(model)
    r["set-up (end ids, sampler, KV cache)"] = (time.perf_counter() - tic) * 1e3
    tokens = mx.array(ids)
    mx.eval(tokens)
    r["transformer layers"], h = _ms(lambda: model.model(tokens[None], cache)[:, -1:, :])
    totals = collections.Counter()
    with timed_ops(totals):
        op_by_op, _ = _ms(lambda: model.model(tokens[None], make_prompt_cache(model)))
    r["  matmuls (op by op)"] = totals["matmuls"]
    r["  attention (op by op)"] = totals["attention"]
    r["  norms, RoPE, GELU, residuals (op by op)"] = op_by_op - totals["matmuls"] - totals["attention"]
    r["LM head, last position"], logits = _ms(lambda: model.model.embed_tokens.as_linear(h)[:, -1, :])
    r["logits processors (first step)"], logits = _ms(lambda: processors[0](tokens, logits))
    r["log-softmax (fused)"], logprobs = _ms(lambda: log_softmax()(logits))
    r["log-softmax (mx.logsumexp, mlx-lm's)"], _ = _ms(lambda: logits - mx.logsumexp(logits, keepdims=True))
    r["draw (temperature, top-k, top-p)"], _ = _ms(lambda: sampler(logprobs))
    r["_tokens"] = len(ids)
    return r


def first_token_ms(model, tok, messages, cfg, model_path, loop: str) -> float:
    """Prompt text to the first token id, through mlx_persona's loop or mlx-lm's generate_step."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from mlx_persona.generation import build_prompt, end_token_ids, token_steps
    from mlx_persona.sampling import make_sampler_and_processors

    tic = time.perf_counter()
    ids = build_prompt(tok, messages)
    sampler, processors = make_sampler_and_processors(cfg, prompt_tokens=ids, eos_token_ids=end_token_ids(
        tok, model_path))
    if loop == "mlx_persona":
        steps = token_steps(model, ids, sampler, processors, max_tokens=cfg.max_new_tokens)
    else:
        steps = (t for t, _ in generate_step(mx.array(ids), model, max_tokens=cfg.max_new_tokens, sampler=sampler,
                                             logits_processors=processors))
    next(steps)
    ms = (time.perf_counter() - tic) * 1e3
    steps.close()
    return ms


def bench_mlx(model_path: Path, n_short: int, trials: int) -> dict:
    import dataclasses

    import mlx_persona.backend

    mlx_persona.backend.setup()
    from mlx_persona.models import load_model
    from mlx_persona.sampling import preset

    model, tok = load_model(model_path)
    cfg = dataclasses.replace(preset("persona"), seed=0, max_new_tokens=2)
    short, long_conv = prompts(n_short)
    out = {"cold first token ms (mlx_persona, first call in the process)":
           first_token_ms(model, tok, short[0], cfg, model_path, "mlx_persona")}
    for name, batch in (("short", short), ("long", [long_conv])):
        runs, e2e = [], collections.defaultdict(list)
        for messages in batch:  # warm-up: every shape once
            parts(model, tok, messages, cfg, model_path)
            first_token_ms(model, tok, messages, cfg, model_path, "mlx-lm")
        for _ in range(trials):
            for messages in batch:
                runs.append(parts(model, tok, messages, cfg, model_path))
                for loop in ("mlx_persona", "mlx-lm"):  # taking turns, so that load changes hit both
                    e2e[loop].append(first_token_ms(model, tok, messages, cfg, model_path, loop))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        med["end to end, mlx_persona (token_steps)"] = statistics.median(e2e["mlx_persona"])
        med["end to end, mlx-lm generate_step (before)"] = statistics.median(e2e["mlx-lm"])
        out[name] = med
    out["linear_params"] = sum(m.weight.size for _, m in model.model.named_modules() if type(m).__name__ == "Linear")
    return out


def bench_torch(model_path: Path, n_short: int, trials: int, dtype_name: str) -> dict:
    """transformers' generate, persona settings: prompt text to the first new token (a generate call that
    makes one token and returns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(str(model_path))

    def first_token_ms(messages) -> float:
        tic = time.perf_counter()
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1,
                           pad_token_id=0, **PERSONA)
        return (time.perf_counter() - tic) * 1e3

    short, long_conv = prompts(n_short)
    out = {}
    for name, batch in (("short", short), ("long", [long_conv])):
        first_token_ms(batch[0])
        out[name] = statistics.median(first_token_ms(m) for _ in range(trials) for m in batch)
    out["threads"] = torch.get_num_threads()
    return out


def markdown(res: dict, trials: int, load: str, cpu: str) -> str:
    short, long_ = res["mlx"]["short"], res["mlx"]["long"]
    title = (f"### Time to the first token, part by part (gemma-3-270m shape, random weights, fp32, persona "
             f"settings; medians of {trials} trials; load average {load}; CPU {cpu})")
    head = (f"| part | short prompts ({short['_tokens']:.0f} tokens, median), ms | long prompt "
            f"({long_['_tokens']:.0f} tokens), ms |")
    lines = [title, "", head, "|---|---:|---:|"]
    for key in short:
        if not key.startswith("_"):
            lines.append(f"| {key} | {short[key]:.1f} | {long_[key]:.1f} |")
    flops = {name: 2 * res["mlx"]["linear_params"] * res["mlx"][name]["_tokens"] for name in ("short", "long")}
    lines.append("| matmul GFLOP/s (op by op) | " + " | ".join(
        f"{flops[n] / res['mlx'][n]['  matmuls (op by op)'] / 1e6:.0f}" for n in ("short", "long")) + " |")
    for dtype, t in res.get("torch", {}).items():
        lines.append(f"| end to end, transformers generate ({dtype}, {t['threads']} threads) | {t['short']:.1f} | "
                     f"{t['long']:.1f} |")
    lines.append(f"| cold: first call in the process, mlx_persona | "
                 f"{res['mlx']['cold first token ms (mlx_persona, first call in the process)']:.1f} | |")
    ours, before = "end to end, mlx_persona (token_steps)", "end to end, mlx-lm generate_step (before)"
    gain = (f"| mlx_persona vs its loop before (generate_step) | {short[before] / short[ours]:.2f}x faster | "
            f"{long_[before] / long_[ours]:.2f}x faster |")
    lines += ["", "| first token | short | long |", "|---|---:|---:|", gain,
              f"| long prompt tokens/s, mlx_persona | | {long_['_tokens'] / long_[ours] * 1e3:.0f} |"]
    for dtype, t in res.get("torch", {}).items():
        lines.append(f"| mlx_persona vs transformers {dtype} (>1: mlx_persona faster) | {t['short'] / short[ours]:.2f}x "
                     f"| {t['long'] / long_[ours]:.2f}x |")
        lines.append(f"| long prompt tokens/s, transformers {dtype} | | {long_['_tokens'] / t['long'] * 1e3:.0f} |")
    lines.append("\nParts are timed one at a time with an evaluation after each (op by op: after every matmul "
                 "and attention call, a separate pass), so they add up to more than the end-to-end time.")
    return "\n".join(lines)
