"""Every `mlx-persona ...` command shown in README.md and docs/*.md parses with the real CLI: its
subcommand exists and click accepts its options, choices and argument count (parsed with
`make_context`, from the repository root so that paths the examples name, such as the persona card,
exist; nothing runs). A command in a bash block must be complete unless it says `...` where options are
left out; one in a code span within prose (`mlx-persona generate --preset persona`) may leave out
required options. A renamed flag or command
fails here until the docs follow."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from mlx_persona.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "|", ";", "&"}


def _shell_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, command line, inline) of every fenced bash block line (continuations joined) and
    every inline code span that starts with `mlx-persona ` (inline)."""
    found, lines, fence, pending = [], text.splitlines(), None, None
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence in ("bash", "sh", "console"):
            start, body = pending or (number, "")
            body += line
            if body.endswith("\\"):
                pending = (start, body[:-1] + " ")
                continue
            pending = None
            found.append((start, body, False))
        elif fence is None:
            found += [(number, span, True) for span in re.findall(r"`(mlx-persona [^`]+)`", line)]
    return found


def _commands(path: Path) -> list[tuple[str, list[str], bool]]:
    """('file:line', argv after `mlx-persona`, inline) of each mlx-persona invocation in the file."""
    out = []
    for number, line, inline in _shell_lines(path.read_text(encoding="utf-8")):
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words, argv = list(lexer), None
        for word in [*words, ";"]:
            if word in SEPARATORS:
                if argv is not None:
                    out.append((f"{path.relative_to(REPO)}:{number}", argv, inline))
                argv = None
            elif argv is not None:
                argv.append(word)
            elif word == "mlx-persona":
                argv = []
    return out


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


def test_the_docs_show_the_commands_of_every_runtime():
    shown = {" ".join(argv[:2]) for _, argv, inline in COMMANDS if not inline}
    for command in ("export gguf", "export ollama", "export onnx", "serve --model", "web runs/bluey-1b-it-onnx"):
        assert any(s.startswith(command) for s in shown), command
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize(("where", "argv", "inline"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_each_documented_command_parses(where, argv, inline, monkeypatch):
    monkeypatch.chdir(REPO)
    elided = "..." in argv  # `mlx-persona eval ... --ratings DB`: the rest of the command left out
    command, args, name = main, [a for a in argv if a != "..."], "mlx-persona"
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"{where}: no command {name} {args[0]}"
        command, name, args = sub, f"{name} {args[0]}", args[1:]
    if any(a in ("-h", "--help", "--version") for a in args):
        return
    try:
        command.make_context(name, list(args))  # click consumes the list it parses
    except click.UsageError as e:
        if (inline or elided) and isinstance(e, click.MissingParameter):
            return
        pytest.fail(f"{where}: {name} {' '.join(args)}: {e.format_message()}")
