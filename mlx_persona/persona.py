"""Persona cards (`persona.yaml`): who the character is, and the words that show it.

```yaml
name: Bluey                    # required, non-empty
description: >-                # required, non-empty
  ...
system_prompt: >-              # optional: the system/persona prompt chat UIs can use
  ...
catchphrases: [hooray, ...]    # phrases she says; matched case-insensitively as substrings
vocabulary: [mum, ...]         # single words of her voice; matched case-insensitively as whole words
breaking_phrases: [as an ai]   # phrases that break character; matched like catchphrases
```
Unknown keys, wrong types, empty entries and multi-word vocabulary are errors naming the key (and the
line, where YAML gives one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


class PersonaError(ValueError):
    """A persona card problem, as `path:line: key: reason` where a line is known."""


@dataclass
class Persona:
    name: str
    description: str
    system_prompt: str = ""
    catchphrases: list[str] = field(default_factory=list)
    vocabulary: list[str] = field(default_factory=list)
    breaking_phrases: list[str] = field(default_factory=list)


_LISTS = ("catchphrases", "vocabulary", "breaking_phrases")
_STRINGS = ("name", "description", "system_prompt")


def _line_of(text: str, key: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith(f"{key}:"):
            return i
    return None


def load_persona(path: str | Path) -> Persona:
    """Reads and validates a persona card.

    Args:
        path: a YAML file.

    Returns:
        The :class:`Persona`.

    Raises:
        PersonaError: naming the file, line and key of the first problems found.
    """
    path = Path(path)
    if not path.is_file():
        raise PersonaError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PersonaError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(e, 'problem', e)}") \
            from None
    if not isinstance(data, dict):
        raise PersonaError(f"{path}: expected a mapping with keys {', '.join(_STRINGS + _LISTS)}")
    problems = []

    def where(key):
        line = _line_of(text, key)
        return f"{path}:{line}" if line else str(path)

    for key in data:
        if key not in _STRINGS + _LISTS:
            problems.append(f"{where(key)}: {key}: unknown key; known keys: {', '.join(_STRINGS + _LISTS)}")
    for key in _STRINGS:
        value = data.get(key, "" if key == "system_prompt" else None)
        if value is None or not isinstance(value, str) or (key != "system_prompt" and not value.strip()):
            problems.append(f"{where(key)}: {key}: must be a non-empty string" if key in data
                            else f"{path}: {key}: missing (required)")
    for key in _LISTS:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            problems.append(f"{where(key)}: {key}: must be a list of non-empty strings")
        elif key == "vocabulary":
            multi = [v for v in value if len(v.split()) != 1]
            if multi:
                problems.append(f"{where(key)}: vocabulary: entries must be single words "
                                f"(put phrases under catchphrases): {', '.join(map(repr, multi))}")
    if problems:
        raise PersonaError("\n".join(problems))
    return Persona(**{k: (data.get(k) if k in data else Persona.__dataclass_fields__[k].default
                          if k in _STRINGS else []) for k in _STRINGS + _LISTS})
