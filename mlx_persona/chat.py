"""Interactive multi-turn chat: streaming replies, history, a persona prompt and slash commands.

At a terminal, lines are read with editing and history (:mod:`mlx_persona.terminal`) and the model's
turns are labelled with the persona's name. Ctrl-C while a reply streams stops it and returns to the
prompt; the reply so far stays in the conversation, as in llama.cpp's chat and ChatGPT's "stop" (the
text on the screen is the conversation the model sees next; /reset forgets it). At the prompt, Ctrl-C
clears the line like a shell; on an empty line it says how to leave, and a second one leaves, as do
Ctrl-D and /quit.

When stdin is not a terminal (a pipe or a file), every input line gets one reply, printed on its own
line, so that ``printf 'hi\nwhat now?\n' | mlx-persona chat ...`` works in scripts (Ctrl-C ends it).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TextIO

from mlx_persona.generation import end_token_ids, stream_generate
from mlx_persona.sampling import GenerationConfig

HELP = """commands:
  /reset              forget the conversation (keeps the system prompt)
  /settings           show the generation settings
  /settings KEY=VALUE change one, e.g. /settings temperature=0.5 min_new_tokens=20
  /system TEXT        set the system/persona prompt (and reset)
  /help               this list
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
                 model_path=None, name: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = config
        self.system = system
        self.name = name  # who the model plays (a persona card's name): the label of its turns
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
        """Adds a user turn, streams the reply through `on_text`, records it; returns the result.

        A KeyboardInterrupt (Ctrl-C) stops the stream and is raised again; the text streamed so far is
        kept as the model's turn, or, when nothing was streamed yet, the user's turn is dropped too (the
        chat template wants user and model turns to alternate).
        """
        messages = self.history + [{"role": "user", "content": text}]
        result = None
        shown: list[str] = []
        stream = stream_generate(self.model, self.tokenizer, messages, self.config, system=self.system,
                                 end_ids=self.end_ids)
        try:
            for chunk in stream:
                if chunk.text:
                    shown.append(chunk.text)
                    if on_text:
                        on_text(chunk.text)
                result = chunk.result or result
        except KeyboardInterrupt:
            partial = "".join(shown).strip()
            if partial:
                self.history = messages + [{"role": "assistant", "content": partial}]
            raise
        finally:
            stream.close()
        self.history = messages + [{"role": "assistant", "content": result.text.strip()}]
        return result


def _command(session: ChatSession, line: str, say: Callable[[str], object]) -> bool:
    """Runs one /command, reporting through `say`; True when it asks to leave."""
    cmd, _, rest = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/reset":
        session.reset()
        say("(conversation reset)\n")
    elif cmd == "/settings":
        try:
            say((session.set(rest.split()) if rest.strip() else session.describe()) + "\n")
        except ValueError as e:
            say(f"error: {e}\n")
    elif cmd == "/system":
        session.system = rest.strip() or None
        session.reset()
        say("(system prompt set; conversation reset)\n")
    elif cmd == "/help":
        say(HELP + "\n")
    else:
        say(f"unknown command {cmd}; /help lists them\n")
    return False


class _StreamLines:
    """Prompted lines from a stream that is not the process's stdin: no editing, no history."""

    def __init__(self, stream: TextIO, write: Callable[[str], None]):
        self.stream, self.write = stream, write

    def read(self, prompt: str) -> str:
        self.write(prompt)
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def pending(self) -> str:
        return ""


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr, interactive: bool | None = None, reader=None) -> None:
    """The read-reply loop. Interactive on a terminal; one reply per line from a pipe.

    Args:
        session: the conversation.
        stdin, stdout, stderr: where lines come from, replies go, and notes and statistics go.
        interactive: the terminal loop (default: when `stdin` is a terminal).
        reader: what reads the terminal loop's lines (``read(prompt)``, ``pending()``); default: a
            :class:`mlx_persona.terminal.LineReader` with the history file on the process's stdin.
    """
    interactive = stdin.isatty() if interactive is None else interactive

    def write(s: str) -> None:
        stdout.write(s)
        stdout.flush()

    if not interactive:
        for raw in iter(stdin.readline, ""):
            line = raw.strip()
            if line.startswith("/"):
                if _command(session, line, stderr.write):
                    break
            elif line:
                # One reply per line: keep a multi-line reply on its line.
                session.send(line, on_text=lambda s: write(s.replace("\r", " ").replace("\n", " ")))
                write("\n")
        return
    if reader is None:
        from mlx_persona.terminal import LineReader, history_path

        reader = LineReader(history_path(), stderr.write) if stdin is sys.stdin else _StreamLines(stdin, write)
    _terminal_loop(session, reader, write, stderr.write)


def _label(name: str | None) -> str:
    return "".join(c for c in (name or "").strip() if c.isprintable()) or "bot"


def _terminal_loop(session: ChatSession, reader, write: Callable[[str], None], say: Callable[[str], object]):
    say("Chatting. /help for commands; Ctrl-C stops a reply; Ctrl-D or /quit leaves.\n")
    label = _label(session.name)
    armed = False  # Ctrl-C was pressed on an empty line: a second one leaves
    write("\n")
    while True:
        try:
            line = reader.read("you> ").strip()
        except EOFError:  # Ctrl-D: leave on a new line
            write("\n")
            return
        except KeyboardInterrupt:  # clear the line, like a shell
            typed = reader.pending().strip()
            write("\n")
            if not typed and armed:
                return
            armed = not typed
            if armed:
                say("(Ctrl-C again, Ctrl-D or /quit to leave)\n")
            continue
        armed = False
        if not line:
            continue
        turns = len(session.history)
        try:
            if line.startswith("/"):
                if _command(session, line, say):
                    return
            else:
                write(f"{label}> ")
                result = session.send(line, on_text=write)
                write("\n")
                say(f"[{result.generated_tokens} tokens, {result.decode_tps:.1f} tok/s, stopped: "
                    f"{result.stop_reason}, context {result.prompt_tokens + result.generated_tokens} tokens]\n")
        except KeyboardInterrupt:  # Ctrl-C while a reply streams (or a command runs): back to the prompt
            write("\n")
            kept = len(session.history) > turns
            say("(stopped; the reply so far stays in the conversation)\n" if kept else "(stopped)\n")
        write("\n")
