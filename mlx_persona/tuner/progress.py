"""A small progress bar: step, loss, tokens/s and ETA on one line (a line per update when not a tty)."""

from __future__ import annotations

import sys
import time


def _fmt_time(sec: float) -> str:
    sec = int(max(sec, 0))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Prints to stderr; on a terminal the line is redrawn in place, elsewhere it prints every ~5%."""

    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 24):
        self.total = max(total, 1)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.width = width
        self._every = max(self.total // 20, 1)
        self._start_step = 0
        self._t0 = time.perf_counter()
        self._open = False

    def start(self, step: int = 0) -> None:
        self._start_step = step
        self._t0 = time.perf_counter()

    def update(self, step: int, loss: float, tps: float, extra: str = "") -> None:
        if not self.enabled:
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.total - step)
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        shown = f"{extra}  " if extra else ""
        line = (f"[{bar}] step {step}/{self.total}  loss {loss:.4f}  {shown}{tps:,.0f} tok/s  "
                f"elapsed {_fmt_time(elapsed)}  eta {_fmt_time(eta)}")
        if self.tty:
            self.stream.write("\r" + line)
            self._open = True
        elif step % self._every == 0 or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
