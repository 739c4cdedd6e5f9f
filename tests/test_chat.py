"""`mlx-persona chat` at a terminal: driven under a pseudo-terminal with pexpect, as a person types.

Line editing and history (readline; the history file private and kept across sessions), the persona's
name on the model's turns, Ctrl-C stopping a reply without ending the chat, Ctrl-C at the prompt, unknown
commands, Ctrl-D. Each expect has a generous timeout only so that a broken build fails instead of hanging.
"""

import importlib.util
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from mlx_persona.chat import ChatSession
from mlx_persona.models import load_model
from mlx_persona.sampling import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
PROMPT = "you> "
HINT = "(Ctrl-C again, Ctrl-D or /quit to leave)"
# Skipped when missing, failed instead under CI=true (conftest.need).
needs_pexpect = pytest.mark.needs(importlib.util.find_spec("pexpect") is not None,
                                  reason="needs pexpect (pip install -e '.[test]')")


def spawn(state: Path, *args):
    """`python -m mlx_persona chat --model builtin:tiny ARGS` on a pty, its history under `state`."""
    import pexpect

    env = {k: v for k, v in os.environ.items() if k != "MLX_PERSONA_HISTORY"}
    # A plain terminal and no inputrc of the user's: the keys do what readline's defaults say.
    env.update(XDG_STATE_HOME=str(state), TERM="dumb", INPUTRC=os.devnull, HF_HUB_OFFLINE="1")
    # SIGINT as at a terminal: a suite started in the background (nohup, `&`, some CI runners) ignores it, and
    # a child inherits that, so Python would install no KeyboardInterrupt and Ctrl-C would do nothing.
    child = pexpect.spawn(sys.executable, ["-m", "mlx_persona", "chat", "--model", "builtin:tiny", "--temperature",
                                           "0", *args], cwd=str(REPO), env=env, encoding="utf-8", timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.expect_exact(PROMPT)
    return child


def ends(child) -> int:
    """Waits for the program to end; its exit status."""
    import pexpect

    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus is None, child.signalstatus
    return child.exitstatus


@needs_pexpect
def test_a_conversation_with_a_persona_history_and_commands(tiny_path, tmp_path):
    state = tmp_path / "state"
    child = spawn(state, "--persona", str(REPO / "data" / "bluey" / "persona.yaml"), "--max-new-tokens", "4", "--min-new-tokens", "4")
    child.send("Hi!\r")
    child.expect_exact("Bluey> ")  # the card's name labels the model's turn
    child.expect(r"\[4 tokens, .*, context \d+ tokens\]\r\n")
    child.expect_exact(PROMPT)
    for seed in (7, 8):
        child.send(f"/settings seed={seed}\r")
        child.expect(rf"top_p=\S+ .* seed={seed}\r\n")  # the settings line, not the echo of what was typed
    child.send("\x1b[A\x1b[A\r")  # up-arrow twice recalls "/settings seed=7"
    child.expect(r"top_p=\S+ .* seed=(\d+)\r\n")
    assert child.match.group(1) == "7"
    child.expect_exact(PROMPT)
    child.send("/foo\r")
    child.expect_exact("unknown command /foo; /help lists them\r\n")
    child.expect_exact(PROMPT)
    child.sendeof()
    assert ends(child) == 0
    assert child.before == "\r\n"  # Ctrl-D leaves on a new line

    history = state / "mlx_persona" / "chat_history"
    assert stat.S_IMODE(history.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert history.read_text().splitlines() == ["Hi!", "/settings seed=7", "/settings seed=8",
                                                   "/settings seed=7", "/foo"]
    assert [p.name for p in history.parent.iterdir()] == ["chat_history"]  # no temporary file left


def test_the_next_session_starts_with_the_saved_history(tmp_path, monkeypatch):
    """The history file's lines are readline's history when the next chat starts (the last MAX_HISTORY)."""
    readline = pytest.importorskip("readline")
    from mlx_persona import terminal

    monkeypatch.delenv(terminal.HISTORY_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = terminal.history_path()
    assert path == tmp_path / "mlx_persona" / "chat_history"
    path.parent.mkdir()
    path.write_text("".join(f"line {i}\n" for i in range(terminal.MAX_HISTORY + 5)) + "  \n")
    readline.clear_history()
    try:
        terminal.LineReader(path)
        n = readline.get_current_history_length()
        assert n == terminal.MAX_HISTORY - 1  # the blank last line is not an entry
        assert [readline.get_history_item(i) for i in (1, n)] == ["line 6", f"line {terminal.MAX_HISTORY + 4}"]
    finally:
        readline.clear_history()
    monkeypatch.setenv(terminal.HISTORY_ENV, "")
    assert terminal.history_path() is None  # in memory only


@needs_pexpect
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tiny_path, tmp_path):
    child = spawn(tmp_path / "state", "--max-new-tokens", "100000", "--min-new-tokens", "100000")
    child.send("Hi!\r")
    child.expect(r"bot> \s*\S")  # the first streamed text of a reply that would run for minutes
    child.sendintr()
    child.expect_exact("(stopped; the reply so far stays in the conversation)\r\n")
    child.expect_exact(PROMPT)
    assert child.isalive()
    child.send("/settings max_new_tokens=3 min_new_tokens=3\r")
    child.expect_exact(PROMPT)
    child.send("Again?\r")
    child.expect(r"bot> .*\r\n\[3 tokens, .*, context (\d+) tokens\]\r\n")
    child.expect_exact(PROMPT)

    child.send("half a thought")  # Ctrl-C on a line with text clears it, like a shell
    child.expect_exact("half a thought")
    child.sendintr()
    child.expect_exact(PROMPT)
    assert HINT not in child.before
    child.sendintr()  # on an empty line: how to leave; a second one leaves
    child.expect_exact(HINT)
    child.expect_exact(PROMPT)
    child.sendintr()
    assert ends(child) == 0


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return load_model(tiny_path)


def test_an_interrupted_reply_keeps_what_was_streamed(tiny):
    """The KeyboardInterrupt of Ctrl-C, raised while the reply streams: the text shown so far is the model's
    turn, the interrupt goes on to the caller, and the next turn works on that conversation."""
    model, tok = tiny
    session = ChatSession(model, tok, GenerationConfig(temperature=0.0, max_new_tokens=50, min_new_tokens=50))
    shown = []

    def stop_after_three(text):
        shown.append(text)
        if len(shown) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.send("Hi!", on_text=stop_after_three)
    assert session.history == [{"role": "user", "content": "Hi!"},
                               {"role": "assistant", "content": "".join(shown).strip()}]
    assert session.history[1]["content"]
    result = session.send("Again?")
    assert result.generated_tokens == 50
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
