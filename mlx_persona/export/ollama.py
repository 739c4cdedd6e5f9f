"""An Ollama model folder: the GGUF file and a ``Modelfile`` that chats like Gemma's template.

``ollama create NAME -f DIR/Modelfile`` imports it. The Modelfile holds:

- ``FROM ./model.gguf`` (Ollama resolves it beside the Modelfile);
- a ``TEMPLATE`` in Go's ``text/template`` that renders Ollama's ``.Messages`` exactly as Gemma's chat
  template renders the conversation with the generation prompt: a leading system message folded into
  the first user turn as ``SYSTEM\\n\\n``, each turn ``<start_of_turn>{user|model}\\n...<end_of_turn>\\n``, the
  reply opened with ``<start_of_turn>model\\n``. ``<bos>`` is not in it: llama.cpp adds it when it
  tokenizes (the file says ``add_bos_token``). Two differences Go's template language cannot avoid:
  it has no ``trim``, so content is used as sent (Gemma's template strips surrounding whitespace), and
  it cannot raise, so roles that do not alternate are rendered rather than refused;
- ``PARAMETER stop "<end_of_turn>"`` and the generation preset's temperature, top_k, top_p, min_p,
  repeat_penalty (over the whole context, ``repeat_last_n -1``, as transformers' penalty is) and
  num_predict (``max_new_tokens``). Ollama has no ``min_new_tokens``: the reply may end at any token,
  so the comment above the parameters says what the preset asked for and what the user gets instead.
"""

from __future__ import annotations

from pathlib import Path

from mlx_persona import __version__
from mlx_persona.export.errors import ExportError
from mlx_persona.outputs import atomic_output_dir, check_output_dir, output_lock

__all__ = ["GGUF_NAME", "OLLAMA_TEMPLATE", "export_ollama", "modelfile"]

GGUF_NAME = "model.gguf"

# Go text/template over Ollama's values: .Messages (Role, Content). `$system` holds a leading system
# message until the first user turn takes it. No whitespace trimming ("{{-"): every byte is literal.
OLLAMA_TEMPLATE = (
    '{{ $system := "" }}'
    "{{ range $i, $m := .Messages }}"
    '{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $system = printf "%s\\n\\n" $m.Content }}'
    '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
    "{{ else }}<start_of_turn>user\n{{ $system }}{{ $m.Content }}<end_of_turn>\n"
    '{{ $system = "" }}'
    "{{ end }}"
    # The last newline comes from an action, so a Modelfile reader that trims the value cannot drop it.
    '{{ end }}<start_of_turn>model{{ "\\n" }}'
)


def _number(value: float) -> str:
    """A parameter value as Ollama reads it: integers without a decimal point, floats in shortest form."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def modelfile(generation, *, preset_name: str, source: str, gguf_name: str = GGUF_NAME) -> str:
    """The Modelfile text for a GGUF file beside it and a generation config (see the module docstring)."""
    if '"""' in OLLAMA_TEMPLATE:
        raise ExportError('the template holds """, which a Modelfile cannot quote')
    g = generation
    min_new = int(g.min_new_tokens)
    ending = (f"The {preset_name!r} preset asks for at least {min_new} new tokens (min_new_tokens): Ollama has no "
              "such setting, so here a reply may end at any token and can be shorter than with `mlx-persona "
              "generate`; num_predict still caps its length.") if min_new else \
        f"The {preset_name!r} preset sets no minimum reply length (min_new_tokens 0), as Ollama cannot either."
    lines = [
        f"# Ollama Modelfile written by mlx-persona {__version__} from {source}.",
        f"#   ollama create NAME -f {Path('DIR') / 'Modelfile'}    (DIR: this folder; then: ollama run NAME)",
        "# The template renders the conversation as Gemma's chat template does (a system message joins the",
        "# first user turn); Ollama's llama.cpp adds <bos> itself. Content is not trimmed (Go templates cannot).",
        f"# Generation: the {preset_name!r} preset of mlx-persona.",
        *_wrap_comment(ending),
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        'PARAMETER stop "<end_of_turn>"',
        f"PARAMETER temperature {_number(g.temperature)}",
        f"PARAMETER top_k {int(g.top_k)}",
        f"PARAMETER top_p {_number(g.top_p)}",
        f"PARAMETER min_p {_number(g.min_p)}",
        f"PARAMETER repeat_penalty {_number(g.repetition_penalty)}",
        "PARAMETER repeat_last_n -1",
        f"PARAMETER num_predict {int(g.max_new_tokens)}",
    ]
    if g.seed is not None:
        lines.append(f"PARAMETER seed {int(g.seed)}")
    return "\n".join(lines) + "\n"


def _wrap_comment(text: str, width: int = 100) -> list[str]:
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "#"
        line += " " + word
    return lines + [line]


def export_ollama(source, out_dir, dtype: str = "f16", *, preset: str = "persona", overwrite: bool = False,
                  log=None) -> Path:
    """Writes ``DIR/model.gguf`` and ``DIR/Modelfile`` for ``ollama create``.

    Args:
        source: as for :func:`mlx_persona.export.gguf.export_gguf` (a LoRA run is fused first).
        out_dir: the folder to write; replaced in one rename when complete.
        dtype: the GGUF weights (``f32``, ``f16``, ``q8_0``, ``q4_0``, ``q4_K_M``).
        preset: the generation preset whose settings become the Modelfile's parameters.
        overwrite: replace an existing non-empty folder.
        log: optional ``log(str)`` for progress.

    Returns:
        The written folder.
    """
    import tempfile

    from mlx_persona.export.gguf import GGUF_DTYPES, model_folder, write_gguf
    from mlx_persona.sampling import preset as get_preset

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    try:
        generation = get_preset(preset).validate()
    except ValueError as e:
        raise ExportError(str(e)) from None
    with output_lock(out_dir):
        local = Path(str(source)).expanduser()
        out = check_output_dir(out_dir, overwrite, inputs=(local,) if local.exists() else ())
        with atomic_output_dir(out) as tmp, tempfile.TemporaryDirectory(prefix=".fuse-", dir=tmp.parent) as scratch:
            folder = model_folder(source, Path(scratch), log=log)
            write_gguf(folder, tmp / GGUF_NAME, dtype, log=log)
            (tmp / "Modelfile").write_text(modelfile(generation, preset_name=preset, source=str(source)),
                                           encoding="utf-8")
    return out
