"""OpenAI request bodies checked and turned into our generation settings, and OpenAI-style errors.

The rules, field by field (a field sent as ``null`` counts as not sent):

- ``model`` must be the served model's id (``GET /v1/models``), else ``404 model_not_found``.
- ``temperature``, ``top_p``, ``seed`` and ``max_tokens`` (or ``max_completion_tokens``, the same thing)
  mean what :class:`~mlx_persona.sampling.GenerationConfig`'s ``temperature``, ``top_p``, ``seed`` and
  ``max_new_tokens`` mean (transformers' semantics; ``temperature: 0`` is greedy decoding). Extra body
  fields ``min_new_tokens``, ``repetition_penalty``, ``top_k``, ``min_p`` and ``no_repeat_ngram_size``
  set the rest. Every field not sent keeps the server's preset (``--preset``, persona by default).
- ``max_tokens`` may not exceed the model's context (``max_position_embeddings``), and the prompt plus
  ``max_tokens`` may not either (checked once the prompt is tokenized); without ``max_tokens`` the
  preset's ``max_new_tokens`` is used, shortened to what the context leaves.
- ``stop``: a string or a list of at most :data:`MAX_STOP` non-empty strings; the reply stops before the
  first one and does not contain it (as ``mlx-persona generate --stop``).
- ``frequency_penalty`` and ``presence_penalty`` are refused unless 0: OpenAI's additive, count-based
  penalties have no counterpart in transformers' sampling; ``repetition_penalty`` is the one we have.
  ``n`` must be 1; log-probabilities, ``logit_bias``, tools, non-text response formats, ``echo``,
  ``suffix`` and ``best_of`` > 1 are refused. ``user``, ``metadata``, ``store``, ``service_tier`` and
  ``parallel_tool_calls`` are accepted and ignored; any other field is an error (a typo in
  ``min_new_tokens`` must not pass silently).
- Chat messages: ``role`` one of system, developer (read as system), user, assistant; ``content`` a
  string or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from mlx_persona.sampling import GenerationConfig

MAX_STOP = 16
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 421: "invalid_request_error", 503: "server_error", 500: "server_error"}


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}`` with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request: what to render, the settings, and how to answer."""

    prompt: list[dict] | str  # chat messages (rendered with the chat template), or raw text
    config: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False

    @property
    def chat(self) -> bool:
        return not isinstance(self.prompt, str)


# Request field -> GenerationConfig field.
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "max_tokens": "max_new_tokens",
            "max_completion_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens",
            "repetition_penalty": "repetition_penalty", "top_k": "top_k", "min_p": "min_p",
            "no_repeat_ngram_size": "no_repeat_ngram_size"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


def _zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


_PENALTY = ("has no counterpart in transformers' sampling (OpenAI's penalty is additive, by count); "
            "use repetition_penalty (multiplicative, over prompt + reply; 1 = off)")
# OpenAI fields accepted only at the value that asks for nothing: (is it that value, why anything else is refused).
NEUTRAL = {
    "frequency_penalty": (_zero, _PENALTY),
    "presence_penalty": (_zero, _PENALTY),
    "n": (lambda v: v == 1 and not isinstance(v, bool), "only n=1 is served"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported"),
    "logprobs": (lambda v: v is False or _zero(v), "log-probabilities are not returned"),
    "top_logprobs": (_zero, "log-probabilities are not returned"),
    "tools": (lambda v: v == [], "tool calls are not supported"),
    "tool_choice": (lambda v: v == "none", "tool calls are not supported"),
    "response_format": (lambda v: v == {"type": "text"}, "only {\"type\": \"text\"} responses are served"),
}
COMPLETION_NEUTRAL = {
    "echo": (lambda v: v is False, "echo is not supported"),
    "suffix": (lambda v: False, "suffix is not supported"),
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "only best_of=1 is served"),
}
_CHAT_FIELDS = {"model", "messages", "stream", "stream_options", "stop", *SAMPLING, *IGNORED, *NEUTRAL}
_COMPLETION_FIELDS = {"model", "prompt", "stream", "stream_options", "stop", *SAMPLING, *IGNORED, *NEUTRAL,
                      *COMPLETION_NEUTRAL}


def _kind(v) -> str:
    return "null" if v is None else {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(v), "a number")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict:
    """The JSON object of a request body (strict UTF-8, no NaN/Infinity), or a 400."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _check_fields(body: dict, allowed: set[str], neutral: dict) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise APIError(400, f"unrecognized request argument {unknown[0][:100]!r}", param=unknown[0][:100])
    for name, (ok, why) in neutral.items():
        if body.get(name) is not None and not ok(body[name]):
            raise APIError(400, f"{name}: {why}", param=name)


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model: required, a string (GET /v1/models lists it)", param="model")
    if model != model_id:
        raise APIError(404, f"the model {model[:200]!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")


def _stop(value) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise APIError(400, f"stop: a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    return list(stops)


def sampling_config(body: dict, defaults: GenerationConfig, context: int | None) -> tuple[GenerationConfig, bool]:
    """(the settings of `body` over `defaults`, whether max_tokens was given), or a 400 naming the field."""
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        raise APIError(400, "max_tokens and max_completion_tokens differ; send one", param="max_tokens")
    cfg = dataclasses.replace(defaults, stop=list(defaults.stop))
    for name, field in SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise APIError(400, f"{name}: must be a number, not {_kind(value)}", param=name)
        trial = dataclasses.replace(cfg, **{field: value})
        try:
            trial.validate()
        except ValueError as e:
            raise APIError(400, str(e).replace(f"GenerationConfig.{field}", name), param=name) from None
        cfg = trial
    if body.get("stop") is not None:
        cfg.stop = _stop(body["stop"])
    given = a is not None or b is not None
    if given and context is not None and cfg.max_new_tokens > context:
        name = "max_tokens" if a is not None else "max_completion_tokens"
        raise APIError(400, f"{name} is {cfg.max_new_tokens}; this model's context is {context} tokens, "
                            "prompt included", param=name, code="context_length_exceeded")
    return cfg, given


def _stream(body: dict) -> tuple[bool, bool]:
    stream, options = body.get("stream") or False, body.get("stream_options")
    if not isinstance(stream, bool):
        raise APIError(400, f"stream: must be a boolean, not {_kind(stream)}", param="stream")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise APIError(400, "stream_options: an object, only with stream: true", param="stream_options")
    usage = (options or {}).get("include_usage") or False
    if not isinstance(usage, bool):
        raise APIError(400, "stream_options.include_usage: must be a boolean", param="stream_options")
    return stream, usage


def _content(i: int, content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise APIError(400, f"messages[{i}].content: a string or a list of {{\"type\": \"text\", \"text\": ...}} parts",
                   param=f"messages[{i}].content")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages: required, a non-empty array", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}]: must be an object, not {_kind(m)}", param=f"messages[{i}]")
        extra = sorted(k for k in m if k not in ("role", "content", "name") and m[k] is not None)
        if extra:
            raise APIError(400, f"messages[{i}].{extra[0][:100]}: not supported (text messages only)",
                           param=f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role: one of system, developer, user, assistant",
                           param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role, "content": _content(i, m.get("content"))})
    return out


def chat_request(body: dict, *, model_id: str, defaults: GenerationConfig, context: int | None) -> Request:
    """A ``POST /v1/chat/completions`` body checked (module docstring), or an :class:`APIError`."""
    _check_fields(body, _CHAT_FIELDS, NEUTRAL)
    _check_model(body, model_id)
    messages = _messages(body.get("messages"))
    config, given = sampling_config(body, defaults, context)
    stream, usage = _stream(body)
    return Request(messages, config, stream, usage, given)


def completion_request(body: dict, *, model_id: str, defaults: GenerationConfig, context: int | None) -> Request:
    """A ``POST /v1/completions`` body: ``prompt`` (a string, or a list of one) as raw text, no chat template."""
    _check_fields(body, _COMPLETION_FIELDS, {**NEUTRAL, **COMPLETION_NEUTRAL})
    _check_model(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt: required, a string (or a list of one string)", param="prompt")
    config, given = sampling_config(body, defaults, context)
    stream, usage = _stream(body)
    return Request(prompt, config, stream, usage, given)


def finish_reason(stop_reason: str) -> str:
    """OpenAI's ``finish_reason`` of a :class:`~mlx_persona.generation.GenerationResult`'s ``stop_reason``."""
    return "length" if stop_reason == "length" else "stop"

