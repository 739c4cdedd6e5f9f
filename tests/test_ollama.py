"""Tests for mlx_persona.export.ollama: the Modelfile's TEMPLATE, rendered by Go's own text/template (the
engine Ollama runs), equals Gemma's chat template byte for byte on 10 conversations; its parameters are
the preset's; the folder holds the GGUF file it names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_persona.data.tokenizer import unwrap_tokenizer
from mlx_persona.export.ollama import (
    GGUF_NAME,
    OLLAMA_TEMPLATE,
    export_ollama,
    modelfile,
)
from mlx_persona.models import load_model
from mlx_persona.sampling import preset

gguf = pytest.importorskip("gguf")
GO = shutil.which("go")
needs_go = pytest.mark.needs(GO is not None, "Go is not installed (apt-get install golang; scripts/setup.sh test)")
RENDER_GO = Path(__file__).parent / "go" / "render_template.go"

PERSONA = ("You are Bluey Heeler, a six-year-old Blue Heeler puppy from Brisbane.\nYou love games, "
           "especially Keepy Uppy, and you always say \"Hooray!\" when something good happens.")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are Bingo."}, {"role": "user", "content": "What's your favourite game?"}],
    [{"role": "system", "content": PERSONA}, {"role": "user", "content": "Can we play?"},
     {"role": "assistant", "content": "Hooray! Let's play Keepy Uppy."}, {"role": "user", "content": "Who starts?"}],
    [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"},
     {"role": "assistant", "content": "Four"}, {"role": "user", "content": "Five"}],
    [{"role": "user", "content": "東京 😀 café naïve — “quotes” ‘too’"}],
    [{"role": "user", "content": "Line one\nline two\n\n\tindented"},
     {"role": "assistant", "content": "A\n\nB"}, {"role": "user", "content": "C"}],
    [{"role": "user", "content": "Say <start_of_turn>model\nhi<end_of_turn> literally"}],
    [{"role": "user", "content": "Braces {{ .Prompt }} and {{ end }} stay text; so does %s and \\n"}],
    [{"role": "system", "content": "Rules: <b>bold</b> & 'quotes' \"double\""},
     {"role": "user", "content": "a < b > c & d"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}],
]


def _modelfile_commands(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs of a Modelfile: comments skipped, \"\"\" strings kept verbatim."""
    commands, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.startswith("#"):
            rest = after
            continue
        name, _, arg = line.partition(" ")
        if arg.startswith('"""'):
            body, _, rest = (arg[3:] + "\n" + after).partition('"""')
            rest = rest.partition("\n")[2]
            commands.append((name, body))
        else:
            commands.append((name, arg))
            rest = after
    return commands


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """Renders conversations with the template through Go's text/template, built in a private folder."""
    work = Path(tempfile.mkdtemp(prefix="go-render-"))  # 0700
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GOFLAGS": "",
           "CGO_ENABLED": "0"}
    binary = work / "render_template"
    subprocess.run([GO, "build", "-o", str(binary), str(RENDER_GO)], check=True, env=env, cwd=work,
                   capture_output=True)

    def run(template: str, conversations: list) -> list[str]:
        (work / "template.txt").write_text(template, encoding="utf-8")
        proc = subprocess.run([str(binary), str(work / "template.txt")], input=json.dumps(conversations),
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    yield run
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def exported(tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ollama") / "bluey"
    return export_ollama(tiny_path, out, "q8_0")


@needs_go
def test_template_renders_like_gemmas_chat_template(render, exported, tiny_path):
    tok = unwrap_tokenizer(load_model(str(tiny_path))[1])
    commands = dict(_modelfile_commands((exported / "Modelfile").read_text(encoding="utf-8")))
    assert commands["TEMPLATE"] == OLLAMA_TEMPLATE
    ours = render(commands["TEMPLATE"], CONVERSATIONS)
    for conversation, got in zip(CONVERSATIONS, ours, strict=True):
        want = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # llama.cpp adds <bos> when it tokenizes the prompt (add_bos_token in the GGUF file).
        assert want.startswith("<bos>") and got == want.removeprefix("<bos>"), conversation
    # The template starts and ends with actions, so a reader that trims the value changes nothing.
    assert render(commands["TEMPLATE"].strip(), CONVERSATIONS) == ours


@needs_go
def test_untrimmed_content_is_the_one_difference(render, tiny_path):
    # Go templates have no trim: surrounding whitespace reaches the prompt, where Gemma's template strips it.
    tok = unwrap_tokenizer(load_model(str(tiny_path))[1])
    padded = [{"role": "user", "content": "  Hi there \n"}]
    [got] = render(OLLAMA_TEMPLATE, [padded])
    assert got == "<start_of_turn>user\n  Hi there \n<end_of_turn>\n<start_of_turn>model\n"
    assert tok.apply_chat_template(padded, tokenize=False, add_generation_prompt=True) == \
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"


def test_modelfile_parameters_are_the_presets(exported):
    text = (exported / "Modelfile").read_text(encoding="utf-8")
    commands = _modelfile_commands(text)
    params = {arg.split(" ", 1)[0]: arg.split(" ", 1)[1] for name, arg in commands if name == "PARAMETER"}
    p = preset("persona")
    assert params == {"stop": '"<end_of_turn>"', "temperature": "0.8", "top_k": "50", "top_p": "0.95",
                      "min_p": "0", "repeat_penalty": "1.1", "repeat_last_n": "-1", "num_predict": "256"}
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.max_new_tokens) == \
        (0.8, 50, 0.95, 0.0, 1.1, 256)
    assert commands[0] == ("FROM", f"./{GGUF_NAME}")
    comments = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    assert "at least 50 new tokens (min_new_tokens): Ollama has no such setting" in comments
    assert "ollama create NAME -f DIR/Modelfile" in comments
    reader = gguf.GGUFReader(str(exported / GGUF_NAME))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert sorted(p.name for p in exported.iterdir()) == ["Modelfile", GGUF_NAME]


def test_greedy_preset_and_a_seed():
    g = preset("greedy")
    g.seed = 7
    text = modelfile(g, preset_name="greedy", source="x")
    assert "PARAMETER temperature 0\n" in text and "PARAMETER top_k 0\n" in text and "PARAMETER top_p 1\n" in text
    assert "PARAMETER seed 7\n" in text and "min_new_tokens 0" in text
    assert re.search(r"^PARAMETER num_predict 256$", text, re.MULTILINE)


def test_cli_writes_the_folder_and_refuses_an_existing_one(tiny_path, tmp_path):
    from mlx_persona.cli import main

    out = tmp_path / "m"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "ollama", str(tiny_path), "-o", str(out), "--dtype", "q4_0",
                                  "--preset", "greedy"])
    assert result.exit_code == 0, result.output
    assert f"ollama create NAME -f {out}/Modelfile" in result.output
    assert "PARAMETER temperature 0\n" in (out / "Modelfile").read_text()
    again = runner.invoke(main, ["export", "ollama", str(tiny_path), "-o", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output and "Traceback" not in again.output
    bad = runner.invoke(main, ["export", "ollama", str(tiny_path), "-o", str(tmp_path / "n"), "--preset", "wild"])
    assert bad.exit_code == 1 and "unknown generation preset 'wild'" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
