"""Persona evaluation: run a prompt set through models and measure the replies.

The pipeline, one direction only::

    options + entries  ->  evaluate  ->  metrics  ->  plots  ->  report
    (inputs, models)       (replies)     (numbers)    (PNGs)     (md, html)

* :func:`evaluate` -- prompts x seeds through each model; per-reply metrics (:mod:`mlx_persona.eval.metrics`),
  validation loss, the verdict of each fine-tuned model against its base and the reference
  (:mod:`mlx_persona.eval.verdict`), the plots (:mod:`mlx_persona.eval.plots`) and a report folder
  (:mod:`mlx_persona.eval.report`, which only renders what it is handed). ``mlx-persona eval``.
* :mod:`mlx_persona.eval.sweep` and :mod:`mlx_persona.eval.compare` build on :class:`Context` and
  :func:`generate_replies` here.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mlx_persona.eval import plots
from mlx_persona.eval.entries import ModelEntry, check_names, find_bases, load_entry, release, resolve_all
from mlx_persona.eval.metrics import StyleModel, reply_metrics, summarize, word_count
from mlx_persona.eval.options import EvalError, EvalOptions, assistant_replies, check_inputs, load_prompts
from mlx_persona.eval.verdict import verdict
from mlx_persona.outputs import output_lock, prepare_output_dir
from mlx_persona.sampling import GenerationConfig


@dataclass
class Context:
    """What every reply is measured against, loaded once."""

    options: EvalOptions
    prompts: list[str]
    persona: object
    style: StyleModel
    system: str | None

    @classmethod
    def load(cls, options: EvalOptions) -> "Context":
        from mlx_persona.eval.persona import load_persona

        check_inputs(options)
        persona = load_persona(options.persona)
        prompts = load_prompts(options.prompts, options.limit)
        style = StyleModel(assistant_replies(options.train))
        if options.persona_system and not persona.system_prompt.strip():
            raise EvalError(f"{options.persona}: system_prompt: empty, so --persona-system has nothing to add")
        return cls(options, prompts, persona, style, persona.system_prompt if options.persona_system else None)

    def measure(self, text: str, stop_reason: str | None) -> dict:
        return reply_metrics(text, stop_reason, persona=self.persona, style=self.style,
                             early_tokens=self.options.early_tokens)

    def reference_texts(self) -> list[str]:
        """The held-out human-written replies (none without validation data), read once per run."""
        return assistant_replies(self.options.valid) if self.options.valid else []


# ------------------------------------------------------------------------------------------- generation
def _seeds_for(config: GenerationConfig, seeds: list[int], log) -> list[int]:
    if not config.do_sample and len(seeds) > 1:
        log(f"note: greedy decoding (temperature 0) gives the same reply for every seed; using seed {seeds[0]} only")
        return seeds[:1]
    return seeds


def generate_replies(model, tokenizer, end_ids, ctx: Context, config: GenerationConfig, *,
                     name: str, extra: dict | None = None, log=print) -> list[dict]:
    """Every prompt x seed through one loaded model, decoded in batches; one measured row per reply.

    Each reply is the one :func:`mlx_persona.generation.generate` gives alone (its own seed, penalties and
    stops); ``ctx.options.batch_size`` replies decode together (0: chosen from memory).
    """
    from mlx_persona.batch_generation import batch_stream, default_batch_size
    from mlx_persona.generation import build_prompt

    seeds = _seeds_for(config, ctx.options.seeds, log)
    ids = [build_prompt(tokenizer, prompt, system=ctx.system) for prompt in ctx.prompts]
    jobs = [(i, seed) for i in range(len(ctx.prompts)) for seed in seeds]
    batch = ctx.options.batch_size or default_batch_size(model, max(map(len, ids)) + config.max_new_tokens)
    total = len(jobs)
    log(f"  {name}: {total} replies, {min(batch, total)} at a time")
    results, every, tic = [None] * total, max(total // 10, 1), time.perf_counter()
    stream = batch_stream(model, tokenizer, [ids[i] for i, _ in jobs],
                          [dataclasses.replace(config, seed=seed) for _, seed in jobs], batch_size=batch,
                          end_ids=end_ids)
    for done, (k, r) in enumerate(stream, 1):
        results[k] = r
        if done % every == 0 or done == total:
            log(f"  {name}: {done}/{total} replies ({time.perf_counter() - tic:.0f}s)")
    rows = []
    for (i, seed), r in zip(jobs, results):
        rows.append({"model": name, **(extra or {}), "prompt_id": i, "prompt": ctx.prompts[i], "seed": seed,
                     "text": r.text, "tokens": r.tokens, "generated_tokens": r.generated_tokens,
                     "stop_reason": r.stop_reason, "decode_tps": round(r.decode_tps, 2),
                     "metrics": ctx.measure(r.text, r.stop_reason)})
    return rows


def summarize_rows(rows: list[dict]) -> dict:
    """The aggregates of :func:`~mlx_persona.eval.metrics.summarize` over measured rows, plus decode speed."""
    summary = summarize([r["text"] for r in rows], [r["metrics"] for r in rows], [r["stop_reason"] for r in rows])
    tps = [r["decode_tps"] for r in rows if r["decode_tps"]]
    summary["decode_tps"] = sum(tps) / len(tps) if tps else None
    return summary


def reference_summary(ctx: Context, texts: list[str]) -> dict | None:
    """The same metrics on the held-out human-written replies: what in-character looks like."""
    return summarize(texts, [ctx.measure(t, None) for t in texts]) if texts else None


def write_results(out: Path, rows: list[dict], result: dict) -> None:
    """``results.jsonl`` (one row per reply) and ``summary.json`` (`result`)."""
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _figures(result: dict, rows: list[dict], reference_texts: list[str]) -> dict[str, bytes]:
    """The eval report's plots as PNG bytes, by file name."""
    ref_words = [word_count(t) for t in reference_texts] if result.get("reference") else None
    return {name: plots.png(fig) for name, fig in plots.eval_figures(result, rows, ref_words).items()}


def _ratings(path: str | None) -> dict | None:
    """The summary of a ratings database for the report (:func:`mlx_persona.rate.summary.report_section`)."""
    if path is None:
        return None
    from mlx_persona.rate.store import RateError
    from mlx_persona.rate.summary import report_section

    try:
        return report_section(path)
    except RateError as e:
        raise EvalError(f"--ratings: {e}") from None


# ------------------------------------------------------------------------------------------- eval
def evaluate(models: list[ModelEntry], config: GenerationConfig, options: EvalOptions, out: str | Path, *,
             overwrite: bool = False, command: str | None = None, log: Callable = print) -> dict:
    """Runs the prompt set through each model and writes a report folder.

    Args:
        models: the models (unique names).
        config: generation settings; its ``seed`` is replaced by each of ``options.seeds``.
        options: prompts, persona card, style/validation data, seeds.
        out: the report folder (must be empty or absent unless `overwrite`).
        command: the command line, quoted in the report.
        log: progress lines.

    Returns:
        The dict written to ``summary.json``: settings, ``models`` (name -> aggregates + validation
        loss + ``base``, the name of its base model's entry or None), ``reference`` (the validation
        replies' aggregates, or None) and ``verdict`` (:func:`mlx_persona.eval.verdict.verdict`).

    Writes ``results.jsonl`` (one row per reply: model, prompt, seed, text, tokens, stop_reason,
    metrics), ``summary.json``, ``report.md``, ``report.html`` and the plots (``lengths.png``,
    ``rates.png``).
    """
    from mlx_persona.eval import report
    from mlx_persona.tuner import losses

    check_names(models)
    config.validate()
    with output_lock(out):  # one writer per folder, from before the check to the last file
        ctx = Context.load(options)
        ratings = _ratings(options.ratings)
        resolve_all(models)
        out = prepare_output_dir(out, overwrite)
        bases = find_bases(models)
        all_rows, per_model = [], {}
        for entry in models:
            model, tok, end_ids = load_entry(entry, log)
            rows = generate_replies(model, tok, end_ids, ctx, config, name=entry.name, log=log)
            summary = summarize_rows(rows)
            if options.valid:
                summary.update(losses.validation_loss(model, tok, options.valid, max_seq_len=options.max_seq_len))
                log(f"  {entry.name}: validation loss {summary['val_loss']:.4f} (perplexity {summary['val_ppl']:.1f})")
            per_model[entry.name] = {"model": entry.model, "adapter": entry.adapter, "note": entry.note,
                                     "base": bases[entry.name], **summary}
            all_rows += rows
            del model, tok
            release()
        reference_texts = ctx.reference_texts()
        result = {
            "out": str(out), "command": command, "generation": config.to_dict(), "options": dataclasses.asdict(options),
            "prompts": ctx.prompts, "system": ctx.system, "models": per_model,
            "reference": reference_summary(ctx, reference_texts),
        }
        result["verdict"] = verdict(result, all_rows)
        if ratings is not None:
            result["ratings"] = ratings
        write_results(out, all_rows, result)
        figures = _figures(result, all_rows, reference_texts)
        for name, png in figures.items():
            (out / name).write_bytes(png)
        report.write_eval_report(out, result, all_rows, figures)
        return result
