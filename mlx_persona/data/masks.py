"""Rendering with the model's chat template, and the loss mask: which tokens the model is trained on.

The mask is built in two steps. :func:`_loss_spans` finds, in the rendered text, the character span
of every assistant turn (its content and closing ``<end_of_turn>``, not the header nor the newline
after it); :func:`encode_example` tokenizes the text with character offsets and marks each token
whose first character lies in a span. ``tuner.batching.collate`` then shifts the mask by one (target
t is input t+1) and the loss (``tuner.losses``) is computed only at those positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlx_persona.data.formats import ON_LONG, DataError, Example


@dataclass
class EncodedDataset:
    """Token ids and loss masks ready for batching.

    Attributes:
        tokens: one int32 array per kept example.
        masks: one bool array per kept example, True where the token is a loss target.
        report: counts: ``examples`` (seen), ``kept``, ``truncated`` (kept examples that were cut),
            ``dropped`` (too long under ``drop``, or no loss token left), ``loss_tokens`` and
            ``tokens`` (totals over the kept examples). ``examples == kept + dropped``.
    """

    tokens: list[np.ndarray]
    masks: list[np.ndarray]
    report: dict


def _hf(tokenizer):
    """The transformers tokenizer behind an mlx-lm `TokenizerWrapper` (or the tokenizer itself)."""
    # Imported here so that validating data (`mlx-persona data validate`) never imports transformers.
    from mlx_persona.data.tokenizer import unwrap_tokenizer

    return unwrap_tokenizer(tokenizer)


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render messages to text with the tokenizer's chat template.

    Called on the object given (not the HF tokenizer behind a wrapper) because mlx-lm's wrapper may
    carry its own template function for some models. Templates render with size limits
    (:mod:`mlx_persona.data.template_limits`).
    """
    from mlx_persona.data.template_limits import install

    install()
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def template_supports_system(tokenizer) -> bool:
    """Whether the tokenizer's chat template accepts a system message and keeps its text.

    Args:
        tokenizer: a transformers tokenizer or an mlx-lm `TokenizerWrapper`.

    Returns:
        True if a probe conversation with a system message renders and contains the system text;
        False if the template raises, has no template, or silently drops the system message.
    """
    probe = "mlx-persona system probe 7d1f"
    messages = [
        {"role": "system", "content": probe},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]
    try:
        return probe in _apply_template(tokenizer, messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - any template failure means "no system role"
        return False


def render(tokenizer, example: Example, *, add_generation_prompt: bool = False) -> str:
    """Render an example to the exact text the model is trained on.

    Args:
        tokenizer: a transformers tokenizer or an mlx-lm `TokenizerWrapper`.
        example: a chat example (rendered with the chat template) or a ``text`` example (the raw
            text with the bos token prepended when the tokenizer has one).
        add_generation_prompt: append the assistant header (chat examples only).

    Returns:
        The rendered text (special tokens written out as text).

    Raises:
        DataError: ``source: the chat template failed: ...`` when the template rejects the example.
    """
    if example.text is not None:
        return _bos_text(tokenizer) + example.text
    return _render_messages(tokenizer, example.messages, example.source, add_generation_prompt)


def _bos_text(tokenizer) -> str:
    """The bos token as text, or '' when the tokenizer has none."""
    return getattr(_hf(tokenizer), "bos_token", None) or ""


def _render_messages(tokenizer, messages: list[dict], source: str, add_generation_prompt: bool) -> str:
    """`_apply_template` with template errors reported against the example's source."""
    try:
        return _apply_template(tokenizer, messages, add_generation_prompt)
    except Exception as err:  # noqa: BLE001 - Jinja raises many types; all mean the same to the user
        from mlx_persona.data.template_limits import describe_error

        raise DataError(f"{source}: the chat template failed: {describe_error(err)}") from err


def _loss_spans(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans ``[start, end)`` the loss is computed on.

    For a chat example each assistant turn's span starts after its header and ends after the
    turn's closing text (``<end_of_turn>`` for Gemma) without trailing whitespace. The header's
    end is found by rendering ``messages[:i]`` with the generation prompt and the turn's end by
    rendering ``messages[:i+1]``; this only works if each rendering is a prefix of the next, which
    is checked.
    """
    full = render(tokenizer, example)
    if example.text is not None:
        return full, [(len(_bos_text(tokenizer)), len(full))]
    spans = []
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        before = _render_messages(tokenizer, example.messages[:i], example.source, True)
        last = i == len(example.messages) - 1
        through = full if last else _render_messages(tokenizer, example.messages[: i + 1], example.source, False)
        _check_prefix(before, through, full, i, example.source)
        start = len(before)
        spans.append((start, start + len(through[start:].rstrip())))
    return full, spans


def _check_prefix(before: str, through: str, full: str, i: int, source: str) -> None:
    """Raise if the template is not prefix-stable at assistant message `i`."""
    if through.startswith(before) and full.startswith(through):
        return
    raise DataError(
        f"{source}: the chat template is not prefix-stable at messages[{i}]: rendering the conversation "
        "up to a turn (with the generation prompt) is not a prefix of rendering it further, so the "
        "assistant turns cannot be located for the loss mask (templates that rewrite earlier turns, "
        "such as ones that drop past reasoning, are not supported)"
    )


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[bool]]:
    """Tokenize an example and mark the tokens the loss is computed on.

    Chat examples: every assistant turn's content and its end-of-turn marker are masked in; the bos
    token, system/user turns, role headers and the newline after each turn are not. Text examples:
    every token but bos. A token counts when its first character lies inside a loss span.

    Args:
        tokenizer: a fast transformers tokenizer or an mlx-lm `TokenizerWrapper` around one.
        example: the example.

    Returns:
        ``(token ids, mask)`` of equal length.

    Raises:
        DataError: when the chat template fails or is not prefix-stable.
        TypeError: when the tokenizer cannot report character offsets (a slow tokenizer).
    """
    text, spans = _loss_spans(tokenizer, example)
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    mask = [_starts_inside(start, spans) for start, _ in offsets]
    return ids, mask


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `text`; special tokens come from the text itself."""
    hf = _hf(tokenizer)
    if not getattr(hf, "is_fast", False):
        raise TypeError(f"{type(hf).__name__} is not a fast tokenizer; loss masks need character offsets")
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _starts_inside(start: int, spans: list[tuple[int, int]]) -> bool:
    """Whether a character position lies in any ``[start, end)`` span."""
    return any(lo <= start < hi for lo, hi in spans)


def prepare_dataset(
    tokenizer, examples: Sequence[Example], max_seq_len: int, on_long: str = "truncate"
) -> EncodedDataset:
    """Encode examples and apply the length policy.

    Args:
        tokenizer: as in `encode_example`.
        examples: the examples.
        max_seq_len: the longest token sequence to keep.
        on_long: what to do with longer examples: ``"truncate"`` (keep the first `max_seq_len`
            tokens), ``"drop"`` (leave them out) or ``"error"`` (raise).

    Returns:
        The encoded dataset. Examples left without any loss token (e.g. truncated before the first
        reply) are dropped and counted in ``report["dropped"]``.

    Raises:
        ValueError: for a bad `on_long` or `max_seq_len`.
        DataError: with ``on_long="error"``, one problem per long example naming its source and
            length.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    tokens, masks, too_long = [], [], []
    report = {"examples": 0, "kept": 0, "truncated": 0, "dropped": 0, "loss_tokens": 0, "tokens": 0}
    for example in examples:
        report["examples"] += 1
        ids, mask = encode_example(tokenizer, example)
        cut = len(ids) > max_seq_len
        if cut and on_long != "truncate":
            too_long.append(f"{example.source}: {len(ids)} tokens, longer than max_seq_len={max_seq_len}")
            report["dropped"] += 1
            continue
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            report["dropped"] += 1
            continue
        report["kept"] += 1
        report["truncated"] += int(cut)
        report["tokens"] += len(ids)
        report["loss_tokens"] += sum(mask)
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(mask, dtype=bool))
    if on_long == "error" and too_long:
        raise DataError(too_long)
    return EncodedDataset(tokens=tokens, masks=masks, report=report)
