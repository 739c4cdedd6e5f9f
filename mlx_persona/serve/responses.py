"""The OpenAI response bodies: chat completions and text completions, whole or as server-sent events."""

from __future__ import annotations

import json

from mlx_persona.serve.schema import finish_reason

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """The bodies of one job's answer (`chat`: chat completion, else text completion)."""

    def __init__(self, job_id: str, model: str, created: int, *, chat: bool, include_usage: bool = False):
        self.head = {"id": job_id, "object": "", "created": created, "model": model}
        self.chat, self.include_usage = chat, include_usage

    def _body(self, obj: str, choices: list, **extra) -> dict:
        return {**self.head, "object": obj, "choices": choices, **extra}

    def whole(self, result) -> dict:
        """The non-streaming answer of a finished :class:`~mlx_persona.generation.GenerationResult`."""
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason(result.stop_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
        else:
            choice["text"] = result.text
        return self._body("chat.completion" if self.chat else "text_completion", [choice],
                          usage=usage(result.prompt_tokens, result.generated_tokens))

    def chunk(self, text: str | None, finish: str | None = None, *, first: bool = False) -> bytes:
        """A streamed piece (`first`: the chat role's opening delta; `finish`: the closing one)."""
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        extra = {"usage": None} if self.include_usage else {}
        return sse(self._body("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra))

    def last(self, result) -> bytes:
        """The closing chunk (its finish_reason), the usage chunk when asked for, and ``[DONE]``."""
        out = self.chunk(None, finish_reason(result.stop_reason))
        if self.include_usage:
            out += sse(self._body("chat.completion.chunk" if self.chat else "text_completion", [],
                                  usage=usage(result.prompt_tokens, result.generated_tokens)))
        return out + DONE
