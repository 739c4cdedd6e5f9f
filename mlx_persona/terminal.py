"""Reading the chat's lines at a terminal: line editing and history with the standard library's readline,
the history kept in a private per-user file.

The file is ``$MLX_PERSONA_HISTORY`` when set (empty: history in memory only), else
``$XDG_STATE_HOME/mlx_persona/chat_history`` (``~/.local/state/...`` without XDG_STATE_HOME). Its folder is
made 0700 and the file is written 0600 (a temporary file in that folder, then renamed), one entry per line,
the last :data:`MAX_HISTORY` entries. It holds what was typed, so it stays as private as a shell history.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HISTORY_ENV = "MLX_PERSONA_HISTORY"
MAX_HISTORY = 1000
MAX_HISTORY_BYTES = 1 << 20


def history_path() -> Path | None:
    """Where the chat history lives; None keeps it in memory."""
    chosen = os.environ.get(HISTORY_ENV)
    if chosen is not None:
        return Path(chosen).expanduser() if chosen.strip() else None
    state = os.environ.get("XDG_STATE_HOME", "").strip() or str(Path.home() / ".local" / "state")
    return Path(state) / "mlx_persona" / "chat_history"


class LineReader:
    """``input()`` with readline's editing and history when the platform has readline.

    Args:
        history: the history file (see :func:`history_path`); None: in memory only.
        warn: where a history file that cannot be read or written is reported (once), e.g. ``sys.stderr.write``.
    """

    def __init__(self, history: Path | None, warn=None):
        try:
            import readline
        except ImportError:  # e.g. Windows: plain input(), no history
            readline = None
        self.readline, self.history, self.warn = readline, history, warn or sys.stderr.write
        self._warned = False
        if readline is not None and history is not None:
            self._load()

    def read(self, prompt: str) -> str:
        """One line, without its newline. Raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
        line = input(prompt)
        if line.strip():
            self._save()
        return line

    def pending(self) -> str:
        """The text on the line when Ctrl-C interrupted :meth:`read` ('' when readline cannot tell)."""
        return self.readline.get_line_buffer() if self.readline is not None else ""

    def _problem(self, doing: str, err: OSError) -> None:
        if not self._warned:
            self._warned = True
            self.warn(f"(chat history not {doing} {self.history}: {err.strerror or err}; kept in memory)\n")

    def _load(self) -> None:
        try:
            with open(self.history, "rb") as f:
                data = f.read(MAX_HISTORY_BYTES)
        except FileNotFoundError:
            return
        except OSError as err:
            self._problem("read from", err)
            return
        for line in data.decode("utf-8", errors="replace").splitlines()[-MAX_HISTORY:]:
            if line.strip():
                self.readline.add_history(line)

    def _save(self) -> None:
        if self.readline is None or self.history is None:
            return
        rl = self.readline
        n = rl.get_current_history_length()
        lines = [rl.get_history_item(i) for i in range(max(1, n - MAX_HISTORY + 1), n + 1)]
        body = "".join(f"{line}\n" for line in lines if line)
        tmp = None
        try:
            self.history.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.history.parent, prefix=".chat_history.")  # mode 0600
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
                f.write(body)
            os.replace(tmp, self.history)
            tmp = None
        except OSError as err:
            self._problem("saved to", err)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
