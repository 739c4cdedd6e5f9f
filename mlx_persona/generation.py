"""One-shot and streaming generation with transformers' sampling semantics.

The decode loop (:func:`token_steps`) is mlx-lm's ``generate_step`` with two costs of the first token
taken out: the prompt goes through the model in one pass with the LM head at its last position only (as
transformers' ``generate`` does), and the draw's log-softmax over the vocabulary is one fused kernel. Its
KV cache, prompt chunks, stream and pipelining are mlx-lm's. The logits processing and the draw are ours
(:mod:`mlx_persona.sampling`), and so is the decision to stop: on any end id from the model's
``generation_config.json`` / tokenizer (for Gemma both ``<eos>`` and ``<end_of_turn>``), on a stop
string, or at ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_persona.sampling import GenerationConfig, make_sampler_and_processors
from mlx_persona.sampling import preset as named_preset

DEFAULT_PRESET = "default"  # plain GenerationConfig() (the CLI's --preset default)


@dataclass
class GenerationResult:
    """What a generation produced and how fast."""

    text: str
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    stop_reason: str = "length"  # end_token | stop_string | length
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    peak_memory_gb: float = 0.0


@dataclass
class Chunk:
    """A piece of streamed text; the last chunk carries the result."""

    text: str
    token: int | None = None
    result: GenerationResult | None = None


def generation_config(config: GenerationConfig | str | None = None, **settings) -> GenerationConfig:
    """The validated settings that `config` and `settings` name, as the CLI's ``--preset`` and options do.

    Args:
        config: a :class:`GenerationConfig`, a preset name (``"persona"``, ``"greedy"``, ``"default"``), or
            None for the defaults.
        **settings: :class:`GenerationConfig` fields that replace the config's (``seed=3``,
            ``max_new_tokens=64``, ...); a None value keeps the config's.

    Raises:
        ValueError: an unknown preset or setting (named), or an impossible value.
    """
    if config is None or config == DEFAULT_PRESET:
        config = GenerationConfig()
    elif isinstance(config, str):
        config = named_preset(config)
    elif not isinstance(config, GenerationConfig):
        raise ValueError(f"config: expected a GenerationConfig or a preset name, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown generation setting(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    given = {k: list(v) if k == "stop" else v for k, v in settings.items() if v is not None}
    return (dataclasses.replace(config, **given) if given else config).validate()


def end_token_ids(tokenizer, model_path: str | Path | None = None) -> list[int]:
    """Every id that ends a reply: generation_config.json's eos_token_id, the tokenizer's eos, and
    ``<end_of_turn>`` when the vocabulary has it (Gemma's chat turns end with it)."""
    ids: set[int] = set()
    if model_path is not None:
        gen = Path(model_path) / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    from mlx_persona.data.tokenizer import unwrap_tokenizer

    listed = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm's wrapper: a set; transformers 5: an int
    ids.update([listed] if isinstance(listed, int) else listed or [])
    hf = unwrap_tokenizer(tokenizer)
    if getattr(hf, "eos_token_id", None) is not None:
        ids.add(hf.eos_token_id)
    eot = hf.convert_tokens_to_ids("<end_of_turn>") if hasattr(hf, "convert_tokens_to_ids") else None
    if isinstance(eot, int) and eot != getattr(hf, "unk_token_id", None):
        ids.add(eot)
    return sorted(ids)


def build_prompt(tokenizer, prompt: str | list[dict], *, system: str | None = None,
                 chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: a message list, or a user message, rendered with the chat template.

    Args:
        tokenizer: mlx-lm ``TokenizerWrapper`` or a transformers tokenizer.
        prompt: a user message, or a list of ``{"role", "content"}`` messages.
        system: an optional system/persona prompt placed before the messages.
        chat_template: False to feed `prompt` as raw text (a string only).
    """
    from mlx_persona.data.tokenizer import unwrap_tokenizer

    hf = unwrap_tokenizer(tokenizer)
    if not chat_template or getattr(hf, "chat_template", None) is None:
        if not isinstance(prompt, str):
            raise ValueError("a message list needs a tokenizer with a chat template")
        ids = hf.encode(prompt, add_special_tokens=False)
        bos = getattr(hf, "bos_token_id", None)
        return ([bos] if bos is not None else []) + ids
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    try:
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - Jinja raises many types; all mean "the template failed"
        from mlx_persona.data.template_limits import describe_error
        from mlx_persona.models import ModelError

        raise ModelError(f"the chat template failed: {describe_error(err)}") from None
    return hf.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer, prompt: str | list[dict] | list[int], *, system: str | None = None,
               chat_template: bool = True) -> list[int]:
    """Token ids of a prompt given as token ids (kept as they are), a user message or a message list
    (rendered by :func:`build_prompt`)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return list(prompt)
    return build_prompt(tokenizer, prompt, system=system, chat_template=chat_template)


def last_logits(model, inputs: mx.array, cache) -> mx.array:
    """The ``[1, vocab]`` next-token logits after ``inputs`` (``[1, n]`` ids), the model run over all of them.

    mlx-lm's models apply the LM head at every position, and MLX computes a whole product before any slice
    of it; transformers' ``generate`` applies it at the last position only. For mlx-lm's Gemma 3 (text) the
    head is applied here to the last hidden state alone (262,144 x 640 weights per position at the 270m
    shape); any other model runs as it is.
    """
    from mlx_lm.models import gemma3_text

    if type(model).__call__ is gemma3_text.Model.__call__:
        h = model.model(inputs, cache)[:, -1:, :]
        head = model.model.embed_tokens.as_linear if model.tie_word_embeddings else model.lm_head
        return head(h)[:, -1, :]
    return model(inputs, cache=cache)[:, -1, :]


def _log_softmax(x: mx.array) -> mx.array:
    m = x.max(axis=-1, keepdims=True)
    return x - (m + mx.log(mx.exp(x - m).sum(axis=-1, keepdims=True)))


@functools.lru_cache(maxsize=1)
def log_softmax():
    """``x - logsumexp(x)`` over the last axis, compiled: its ``exp`` fuses into a vectorised kernel (on
    the Linux CPU, one built for this CPU; see :mod:`mlx_persona.backend.jit`), where ``mx.logsumexp``
    takes one scalar ``exp`` per entry: 8 ms against 0.4 for Gemma's 262,144 logits, every token."""
    return mx.compile(_log_softmax)


# Prompts up to this many tokens (of the last chunk) go through the model in one pass; longer ones as mlx-lm
# does it: all but the last token into the cache alone, then that token. One pass reads every weight once
# instead of twice (~18 ms at the 270m shape on 2 cores, 1.1x on a 24-token prompt), but its last layer
# runs its MLP at every position where the cache needs none of them: ~0.06 ms a token there, as much as
# the second read at ~300 tokens.
ONE_PASS_MAX = 256


def token_steps(model, ids: list[int], sampler, processors, *, max_tokens: int, prompt_cache=None,
                prefill_step_size: int = 2048) -> Iterator[int]:
    """Yields up to `max_tokens` new token ids after the prompt `ids`, as mlx-lm's ``generate_step`` does.

    Differences from it, none in what is drawn from: a prompt of up to :data:`ONE_PASS_MAX` tokens goes
    through the model in one pass (mlx-lm runs all but its last token, then that token on its own: every
    weight read twice), the LM head runs at the last position only (:func:`last_logits`), the draw's
    log-softmax is fused (:func:`log_softmax`; skipped where the sampler draws with the CPU kernel,
    :meth:`~mlx_persona.sampling.HFSampler.cpu_draw`, which needs no normalised row), and no step is computed
    past the last token yielded. Like mlx-lm's, it makes the next step while a token is handed out, except
    where the CPU kernel draws: that step is evaluated as it is made, so it comes after the token instead.

    Args:
        model: an mlx-lm model.
        ids: the prompt's token ids (the tail of it when `prompt_cache` already holds the rest).
        sampler, processors: as ``generate_step`` takes them (:func:`~mlx_persona.sampling.make_sampler_and_processors`):
            each processor is called as ``processor(tokens so far, logits)``, the sampler with log-probabilities.
        max_tokens: how many tokens at most (>= 1).
        prompt_cache: an mlx-lm KV cache to extend (default: a new one).
        prefill_step_size: prompts longer than this go through the model in chunks of at most this many.
    """
    from mlx_lm.generate import generation_stream
    from mlx_lm.models.cache import make_prompt_cache

    if not ids or max_tokens < 1:
        raise ValueError(f"a prompt of {len(ids)} tokens and max_tokens={max_tokens}: both must be >= 1")
    cache = make_prompt_cache(model) if prompt_cache is None else prompt_cache

    eager = False  # the sampler draws with the CPU kernel: it evaluates the step when called

    def step(inputs: mx.array, tokens: mx.array) -> mx.array:
        nonlocal eager
        logits = last_logits(model, inputs[None], cache)
        for processor in processors:
            logits = processor(tokens, logits)
        cpu_draw = getattr(sampler, "cpu_draw", None)  # the CPU kernel needs no normalised row
        eager = cpu_draw is not None and cpu_draw(logits.shape[-1])
        return sampler(logits if eager else log_softmax()(logits))

    with mx.stream(generation_stream):
        tokens = mx.array(ids)
        rest = tokens
        while rest.size > min(prefill_step_size, ONE_PASS_MAX):  # the head of these chunks is never evaluated
            n = min(prefill_step_size, rest.size - 1)
            model(rest[None, :n], cache=cache)
            mx.eval([c.state for c in cache])
            rest = rest[n:]
            mx.clear_cache()
        y = step(rest, tokens)
        mx.async_eval(y)
        # The next token is computed while this one is handed out; not where the step is eager (the CPU
        # draw evaluates it as it is made), which would hold this token back by one step: there it comes after.
        pipelined = not eager
        for n in range(max_tokens):
            if not pipelined:
                yield y.item()
            next_y = None
            if n + 1 < max_tokens:
                tokens = mx.concatenate([tokens, y])
                next_y = step(y, tokens)
                mx.async_eval(next_y)
            if pipelined:
                yield y.item()
            if n % 256 == 0:
                mx.clear_cache()
            y = next_y


class ReplyText:
    """A reply's text as its tokens arrive, cut before the first stop string.

    What :meth:`add` and :meth:`finish` return, joined, is exactly :attr:`text`: text that might be the start
    of a stop string (a tail of the reply that begins one) is held back until it is known not to be, so a
    stream never shows what the final reply trims.

    Args:
        tokenizer: mlx-lm ``TokenizerWrapper`` (its streaming detokenizer, one per reply).
        stops: stop strings; the reply ends where the first one begins.
    """

    def __init__(self, tokenizer, stops: list[str]):
        from mlx_persona.data.tokenizer import unwrap_tokenizer

        self._detok = tokenizer.detokenizer
        # Ids past the tokenizer's last piece (the padded embedding rows of a built-in Gemma-shape model,
        # 262,144 rows for a 2,048-piece tokenizer) have no text, as in transformers' decode; mlx-lm's
        # SentencePiece detokenizer would raise IndexError on them.
        self._pieces = len(unwrap_tokenizer(tokenizer))
        self._detok.reset()
        self._stops = [s for s in stops if s]
        self._shown = 0  # characters of `text` already returned
        self.text = ""
        self.stopped = False  # a stop string appeared; add no more tokens

    def _held(self) -> int:
        """Length of the longest tail of `text` that begins some stop string (and is shorter than it)."""
        return max((k for s in self._stops for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:k])), default=0)

    def _show(self, upto: int) -> str:
        piece = self.text[self._shown:upto]
        self._shown = max(self._shown, upto)
        return piece

    def add(self, token: int) -> str:
        """Adds a token; returns the new printable text (possibly empty)."""
        if token >= self._pieces:
            return ""
        self._detok.add_token(token)
        self.text += self._detok.last_segment
        if not self._stops:
            return self._show(len(self.text))
        hit = min((self.text.find(s) for s in self._stops if s in self.text), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            self.stopped = True
            return self._show(hit)
        return self._show(len(self.text) - self._held())

    def finish(self) -> str:
        """The text not yet returned: what the detokenizer still held and any held-back tail."""
        if not self.stopped:
            self._detok.finalize()
            self.text += self._detok.last_segment
        return self._show(len(self.text))


def stream_generate(model, tokenizer, prompt: str | list[dict] | list[int],
                    config: GenerationConfig | str | None = None, *, system: str | None = None,
                    end_ids: list[int] | None = None, chat_template: bool = True, prompt_cache=None,
                    **settings) -> Iterator[Chunk]:
    """Yields text as it is generated; the final chunk has ``.result``.

    Args:
        model, tokenizer: from :func:`mlx_persona.models.load_model`.
        prompt: a user message, a message list, or token ids.
        config: generation settings or a preset name (default: :class:`GenerationConfig` defaults).
        system: system/persona prompt for chat rendering.
        end_ids: ids that end generation (default: :func:`end_token_ids`).
        chat_template: render string prompts with the chat template.
        prompt_cache: an mlx-lm prompt cache to reuse across calls (chat).
        **settings: :class:`GenerationConfig` fields replacing the config's, e.g. ``seed=3``
            (see :func:`generation_config`).
    """
    config = generation_config(config, **settings)
    ids = prompt_ids(tokenizer, prompt, system=system, chat_template=chat_template)
    end_ids = list(end_ids if end_ids is not None else end_token_ids(tokenizer))
    sampler, processors = make_sampler_and_processors(config, prompt_tokens=ids, eos_token_ids=end_ids)

    reply = ReplyText(tokenizer, config.stop)
    result = GenerationResult(text="", prompt_tokens=len(ids))
    tokens: list[int] = []
    tic = time.perf_counter()
    t_first = None
    for token in token_steps(model, ids, sampler, processors, max_tokens=config.max_new_tokens,
                             prompt_cache=prompt_cache):
        if t_first is None:
            t_first = time.perf_counter()
            result.prompt_tps = len(ids) / max(t_first - tic, 1e-9)
        if token in end_ids:
            result.stop_reason = "end_token"
            break
        tokens.append(token)
        piece = reply.add(token)
        if piece:
            yield Chunk(piece, token)
        if reply.stopped:
            result.stop_reason = "stop_string"
            break
    else:
        result.stop_reason = "length"
    tail = reply.finish()
    if tail:
        yield Chunk(tail, None)
    text = reply.text
    elapsed = time.perf_counter() - (t_first or tic)
    result.text = text
    result.tokens = tokens
    result.generated_tokens = len(tokens)
    # The first token comes from the prefill; decode speed counts the tokens after it.
    result.decode_tps = (len(tokens) - 1) / elapsed if len(tokens) > 1 and elapsed > 0 else 0.0
    result.peak_memory_gb = mx.get_peak_memory() / 1e9
    yield Chunk("", None, result)


def generate(model, tokenizer, prompt, config: GenerationConfig | str | None = None, **kwargs) -> GenerationResult:
    """Generates a whole reply; see :func:`stream_generate` for the arguments (a preset name, ``seed=``)."""
    result = None
    for chunk in stream_generate(model, tokenizer, prompt, config, **kwargs):
        result = chunk.result or result
    return result
