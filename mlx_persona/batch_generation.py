"""Batched generation: many prompts decode together, every row as :func:`mlx_persona.generation.generate`
would decode it alone.

The batch machinery is mlx-lm's ``BatchGenerator`` (``mlx_lm.generate``): prompts of different lengths
are prefilled together (right-padded, then rolled so that every row is left-padded; ``BatchKVCache`` and,
for Gemma's sliding-window layers, ``BatchRotatingKVCache`` keep a per-row offset), a finished row leaves
the batch at once (``filter``: it costs no more work) and a queued prompt is prefilled and joins in its
place (``extend``). It takes one sampler and one list of logits processors per row, and per-row stop
token sequences. What it lacks is added here:

* transformers' semantics per row: each row has its own :class:`~mlx_persona.sampling.HFLogitsProcessor`
  (``min_new_tokens`` counted from its own prompt; repetition penalty and n-gram ban over its own prompt
  and tokens) and :class:`~mlx_persona.sampling.HFSampler` (its own settings and seed);
* stop strings, which need each row's text: a row whose text reaches one is removed from the batch;
* finish reasons named as :func:`~mlx_persona.generation.generate` names them (``end_token``,
  ``stop_string``, ``length``), the end id left out of the tokens as there;
* a default batch size from the memory a row's KV cache needs (:func:`default_batch_size`).

Seeds, per row: a seeded row's sampler draws with its own generator (its key chain, split once per token
it draws; on the CPU, the draw kernel's counter: :mod:`mlx_persona.backend.draw`), so its tokens depend on
its seed, prompt and settings only -- never on which rows share its batch, on the
batch size, or on the order rows finish -- and equal the unbatched generation's. A row with ``seed=None``
draws from MLX's global generator, like the unbatched path; its draws then depend on everything else
that uses that generator, including the other rows.

Greedy rows share one sampler object, so mlx-lm takes one argmax over the whole batch; sampled rows each
draw from their own row (the vocabulary-wide work is per row anyway).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from mlx_persona.generation import (
    GenerationResult,
    ReplyText,
    end_token_ids,
    prompt_ids,
)
from mlx_persona.sampling import GenerationConfig, HFLogitsProcessor, HFSampler

MAX_DEFAULT_BATCH = 16
MEMORY_FRACTION = 0.25  # of the memory available when generation starts
LOGITS_COPIES = 8  # float32 [vocab] arrays a row holds per step: logits, processed, normalised, warped, ...

LogitsHook = Callable[[int, int, mx.array], None]


# ------------------------------------------------------------------------------------------- batch size
def kv_bytes_per_row(model, tokens: int) -> int:
    """Bytes one row's KV cache reaches at `tokens` positions (prompt + new tokens).

    Read from the model's own cache layout (``make_cache``): a full-attention layer holds every position, a
    sliding-window layer (mlx-lm's ``RotatingKVCache``) at most its window.
    """
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    args = model.args
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    try:  # the cache holds what the model computes in: its embedding's dtype (a quantized one's scales)
        embed = model.model.embed_tokens
        itemsize = getattr(embed, "scales", embed.weight).dtype.size
    except AttributeError:
        itemsize = 4
    positions = sum(min(tokens, c.max_size) if isinstance(c, RotatingKVCache) else tokens
                    for c in make_prompt_cache(model))
    return 2 * heads * head_dim * itemsize * positions  # keys and values


def available_memory() -> int:
    """Bytes free for generation: Linux's MemAvailable, else (macOS) Metal's recommended working set minus
    what MLX holds now."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = mx.device_info()
    total = info.get("max_recommended_working_set_size") or info.get("memory_size")
    if total:
        return max(int(total) - mx.get_active_memory(), 0)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_batch_size(model, tokens: int, *, available: int | None = None) -> int:
    """How many rows decode together by default.

    The rule: a row needs its KV cache at `tokens` positions (:func:`kv_bytes_per_row`) plus
    ``LOGITS_COPIES`` float32 vocabulary rows of per-step work; as many rows as fit in ``MEMORY_FRACTION``
    (a quarter) of the available memory, at least 1, at most ``MAX_DEFAULT_BATCH`` (16; on the CPU more
    rows stop paying once the weights' memory traffic is shared).

    Args:
        model: an mlx-lm model (``args``, ``make_cache``).
        tokens: the longest prompt plus the largest ``max_new_tokens``.
        available: bytes free (default: :func:`available_memory`).
    """
    per_row = kv_bytes_per_row(model, tokens) + LOGITS_COPIES * 4 * getattr(model.args, "vocab_size", 0)
    free = available_memory() if available is None else available
    return max(1, min(MAX_DEFAULT_BATCH, int(free * MEMORY_FRACTION) // max(per_row, 1)))


# ------------------------------------------------------------------------------------------- generation
@dataclass
class Row:
    """One prompt's reply while it decodes in a batch."""

    index: int
    config: GenerationConfig
    prompt_tokens: int
    reply: ReplyText
    tokens: list[int]
    t_first: float | None = None
    t_last: float | None = None


def _configs(configs: GenerationConfig | Sequence[GenerationConfig] | None, n: int) -> list[GenerationConfig]:
    if configs is None or isinstance(configs, GenerationConfig):
        configs = [configs or GenerationConfig()] * n
    configs = list(configs)
    if len(configs) != n:
        raise ValueError(f"configs: one per prompt expected, got {len(configs)} for {n} prompts")
    return [c.validate() for c in configs]


def greedy_sampler() -> HFSampler:
    """A greedy sampler for :func:`insert_rows`; rows given the same one are drawn with one argmax."""
    return HFSampler(GenerationConfig(temperature=0.0))


def insert_rows(gen, tokenizer, ids: Sequence[list[int]], configs: Sequence[GenerationConfig], end_ids: list[int],
                *, greedy: HFSampler, indexes: Sequence[int] | None = None) -> dict[int, Row]:
    """Queues prompts (token ids) in an mlx-lm ``BatchGenerator`` `gen`, each row with its own processor,
    sampler (`greedy` for every greedy row) and the end ids as its stop tokens; returns ``{uid: Row}``
    (``Row.index``: `indexes`, default 0, 1, ...). Configs must be validated."""
    from mlx_lm.generate import StopSequences

    uids = gen.insert(
        list(ids), [c.max_new_tokens for c in configs],
        samplers=[HFSampler(c) if c.do_sample else greedy for c in configs],
        logits_processors=[[HFLogitsProcessor(c, prompt_tokens=i, eos_token_ids=end_ids)]
                           for c, i in zip(configs, ids)],
        stop_sequences=[StopSequences([[e] for e in end_ids])] * len(ids))
    indexes = range(len(ids)) if indexes is None else indexes
    return {uid: Row(k, c, len(i), ReplyText(tokenizer, c.stop), [])
            for uid, k, c, i in zip(uids, indexes, configs, ids)}


def row_result(row: Row, stop_reason: str) -> GenerationResult:
    row.reply.finish()  # the reply's text is complete; callers that stream send result.text past what they sent
    n = len(row.tokens)
    elapsed = (row.t_last or 0.0) - (row.t_first or 0.0)
    return GenerationResult(
        text=row.reply.text, tokens=row.tokens, prompt_tokens=row.prompt_tokens, generated_tokens=n,
        stop_reason=stop_reason,
        # Rows share every step: this is the rate this reply saw, not the batch's throughput; and prompts
        # are prefilled together, so there is no per-row prompt speed.
        decode_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9)


def batch_stream(model, tokenizer, prompts: Sequence[str | list[dict] | list[int]],
                 configs: GenerationConfig | Sequence[GenerationConfig] | None = None, *,
                 batch_size: int | None = None, system: str | None = None, end_ids: list[int] | None = None,
                 chat_template: bool = True, on_logits: LogitsHook | None = None
                 ) -> Iterator[tuple[int, GenerationResult]]:
    """Generates a reply to every prompt, `batch_size` rows at a time; yields each as it finishes.

    Args:
        model, tokenizer: from :func:`mlx_persona.models.load_model`.
        prompts: user messages, message lists or token ids (as :func:`~mlx_persona.generation.generate`).
        configs: one :class:`GenerationConfig` for all, or one per prompt (each row keeps its own
            ``max_new_tokens``, ``min_new_tokens``, penalties, stop strings and seed).
        batch_size: rows decoding at once; a finished row's place goes to the next queued prompt
            (default: :func:`default_batch_size`).
        system, chat_template: how string prompts are rendered.
        end_ids: ids that end a reply (default: :func:`~mlx_persona.generation.end_token_ids`).
        on_logits: called as ``on_logits(prompt index, step, logprobs)`` for every token drawn, with the
            float32 ``[vocab]`` processed log-probabilities the row's sampler was given (what
            :func:`~mlx_persona.sampling.process_logits` returns for that row's history with the warpers
            off; the sampler then applies temperature, top-k, top-p and min-p). A debugging and test hook.

    Yields:
        ``(prompt index, GenerationResult)`` in the order rows finish.
    """
    from mlx_persona.batch_step import batch_generator

    configs = _configs(configs, len(prompts))
    end_ids = list(end_ids if end_ids is not None else end_token_ids(tokenizer))
    ids = [prompt_ids(tokenizer, p, system=system, chat_template=chat_template) for p in prompts]
    if any(not i for i in ids):
        raise ValueError("every prompt needs at least one token")
    if not ids:
        return
    if batch_size is None:
        batch_size = default_batch_size(model, max(map(len, ids)) + max(c.max_new_tokens for c in configs))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = batch_generator(model, batch_size)
    try:
        rows = insert_rows(gen, tokenizer, ids, configs, end_ids, greedy=greedy_sampler())
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                row = rows[r.uid]
                if on_logits is not None:
                    on_logits(row.index, len(row.tokens), r.logprobs)
                _, done = advance(row, r.token, r.finish_reason, now)
                if done is not None:
                    if r.finish_reason is None:  # a stop string: mlx-lm still holds the row
                        gen.remove([r.uid])
                    del rows[r.uid]
                    yield row.index, row_result(row, done)
    finally:
        gen.close()


def advance(row: Row, token: int, finish_reason: str | None, now: float) -> tuple[str, str | None]:
    """Adds mlx-lm's next token (drawn at time `now`) to a row: (its new printable text, the row's stop
    reason when it is finished, else None)."""
    row.t_first, row.t_last = row.t_first or now, now
    if finish_reason == "stop":  # one of the end ids (our only stop sequences); not part of the reply
        return "", "end_token"
    row.tokens.append(token)
    piece = row.reply.add(token)
    if row.reply.stopped:
        return piece, "stop_string"
    return piece, "length" if finish_reason == "length" else None


def batch_generate(model, tokenizer, prompts: Sequence[str | list[dict] | list[int]],
                   configs: GenerationConfig | Sequence[GenerationConfig] | None = None,
                   **kwargs) -> list[GenerationResult]:
    """Every prompt's reply, in the prompts' order; see :func:`batch_stream` for the arguments."""
    results: list[GenerationResult | None] = [None] * len(prompts)
    for index, result in batch_stream(model, tokenizer, prompts, configs, **kwargs):
        results[index] = result
    return results
