"""Interactive multi-turn chat: streaming replies, history, a persona prompt and slash commands.

When stdin is not a terminal (a pipe or a file), every input line gets one reply, printed on its own
line, so that ``printf 'hi\nwhat now?\n' | mlx-persona chat ...`` works in scripts.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

from mlx_persona.generation import end_token_ids, stream_generate
from mlx_persona.sampling import GenerationConfig

HELP = """commands:
  /reset              forget the conversation (keeps the system prompt)
  /settings           show the generation settings
  /settings KEY=VALUE change one, e.g. /settings temperature=0.5 min_new_tokens=20
  /system TEXT        set the system/persona prompt (and reset)
  /quit               leave (also /exit, Ctrl-D)"""


def _parse_value(field: dataclasses.Field, raw: str):
    if field.name == "stop":
        return [s for s in raw.split("|") if s]
    if field.name == "seed":
        return None if raw.lower() in ("none", "") else int(raw)
    kind = field.type if isinstance(field.type, type) else {"int": int, "float": float}.get(str(field.type), str)
    return kind(raw)


class ChatSession:
    """A conversation with a loaded model; `send` returns the reply and updates the history."""

    def __init__(self, model, tokenizer, config: GenerationConfig, system: str | None = None,
                 model_path=None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config
        self.system = system
        self.history: list[dict] = []
        self.end_ids = end_token_ids(tokenizer, model_path)

    def reset(self) -> None:
        self.history = []

    def set(self, assignments: list[str]) -> str:
        """Applies KEY=VALUE settings; returns a message (raises ValueError on a bad one)."""
        fields = {f.name: f for f in dataclasses.fields(GenerationConfig)}
        new = dataclasses.replace(self.config)
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
            try:
                setattr(new, key, _parse_value(fields[key], raw))
            except ValueError:
                raise ValueError(f"{key}: {raw!r} is not a valid value") from None
        new.validate()
        self.config = new
        return self.describe()

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.config).items())

    def send(self, text: str, on_text: Callable[[str], None] | None = None):
        """Adds a user turn, streams the reply through `on_text`, records it; returns the result."""
        messages = self.history + [{"role": "user", "content": text}]
        result = None
        for chunk in stream_generate(self.model, self.tokenizer, messages, self.config, system=self.system,
                                     end_ids=self.end_ids):
            if chunk.text and on_text:
                on_text(chunk.text)
            result = chunk.result or result
        self.history = messages + [{"role": "assistant", "content": result.text.strip()}]
        return result


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr, interactive: bool | None = None) -> None:
    """The read-reply loop. Interactive on a terminal; one reply per line from a pipe."""
    interactive = stdin.isatty() if interactive is None else interactive

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    if interactive:
        stderr.write("Chatting. /help for commands, /quit to leave.\n")
    while True:
        if interactive:
            write("\nyou> ")
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                session.reset()
                stderr.write("(conversation reset)\n")
            elif cmd == "/settings":
                try:
                    stderr.write((session.set(rest.split()) if rest.strip() else session.describe()) + "\n")
                except ValueError as e:
                    stderr.write(f"error: {e}\n")
            elif cmd == "/system":
                session.system = rest.strip() or None
                session.reset()
                stderr.write("(system prompt set; conversation reset)\n")
            else:
                stderr.write(HELP + "\n")
            continue
        if interactive:
            write("bot> ")
            result = session.send(line, on_text=write)
        else:
            # One reply per line: keep a multi-line reply on its line.
            result = session.send(line, on_text=lambda s: write(s.replace("\r", " ").replace("\n", " ")))
        write("\n")
        if interactive:
            stderr.write(f"[{result.generated_tokens} tokens, {result.decode_tps:.1f} tok/s, "
                         f"stopped: {result.stop_reason}]\n")
