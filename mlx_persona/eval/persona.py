"""Persona cards (`persona.yaml`): who the character is, and the words that show it.

```yaml
name: Bluey                    # required, non-empty
description: >-                # required, non-empty
  ...
system_prompt: >-              # optional: the system/persona prompt chat UIs can use
  ...
catchphrases: [hooray, ...]    # phrases she says; matched case-insensitively as whole words
vocabulary: [mum, ...]         # single words of her voice; matched case-insensitively as whole words
breaking_phrases: [as an ai]   # phrases that break character; matched like catchphrases
```
Unknown or repeated keys, missing required keys, wrong types, empty entries and multi-word vocabulary
are errors, each reported as ``path:line: key: reason`` (invalid YAML as ``path:line: invalid YAML: reason``;
anchors and aliases are refused, values are shortened, at most ``MAX_PROBLEMS`` lines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlx_persona.paths import data_path
from mlx_persona.safe_io import InputError, clip, parse_yaml, read_text, shorten


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
_KEYS = _STRINGS + _LISTS
_REQUIRED = ("name", "description")
MAX_PROBLEMS = 20


class _Problems(list):
    """The problems found; those past MAX_PROBLEMS are only counted."""

    extra = 0

    def append(self, problem: str) -> None:
        if len(self) < MAX_PROBLEMS:
            super().append(problem)
        else:
            self.extra += 1

    def text(self) -> str:
        return "\n".join(self) + (f"\n... and {self.extra} more problems" if self.extra else "")


def _describe(value) -> str:
    return f"{type(value).__name__} {shorten(value)}" if value is not None else "nothing (null)"


def load_persona(path: str | Path) -> Persona:
    """Reads and validates a persona card.

    Args:
        path: a YAML file.

    Returns:
        The :class:`Persona`.

    Raises:
        PersonaError: every problem found, one per line, as ``path:line: key: reason`` (a missing key is
            reported at line 1, where the card's mapping starts).
    """
    path = data_path(path)
    if not path.is_file():
        raise PersonaError(f"{path}: no such file")
    try:
        # The node tree keeps each key's and list item's line; the values are built from the same tree.
        root, data = parse_yaml(read_text(path), str(path))
    except InputError as e:
        raise PersonaError(str(e)) from None
    if not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise PersonaError(f"{path}:{line}: (top level): expected a mapping with keys {', '.join(_KEYS)}")
    problems = _Problems()
    lines: dict[str, int] = {}
    items: dict[str, list[int]] = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if not isinstance(key, str):  # a key that is itself a list or mapping: reported as unknown below
            continue
        if key in lines:
            problems.append(f"{path}:{line}: {clip(key)}: given twice (first at line {lines[key]})")
        lines[key] = line
        if type(value_node).__name__ == "SequenceNode":
            items[key] = [n.start_mark.line + 1 for n in value_node.value]

    def where(key: str, index: int | None = None) -> str:
        if index is not None and index < len(items.get(key, [])):
            return f"{path}:{items[key][index]}"
        return f"{path}:{lines.get(key, 1)}"

    for key in data:
        if key not in _KEYS:
            problems.append(f"{where(str(key))}: {clip(key)}: unknown key; known keys: {', '.join(_KEYS)}")
    for key in _STRINGS:
        if key not in data:
            if key in _REQUIRED:
                problems.append(f"{path}:1: {key}: missing (required)")
            continue
        value = data[key]
        if not isinstance(value, str):
            problems.append(f"{where(key)}: {key}: must be a string, got {_describe(value)}")
        elif key in _REQUIRED and not value.strip():
            problems.append(f"{where(key)}: {key}: must not be empty")
    for key in _LISTS:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, list):
            problems.append(f"{where(key)}: {key}: must be a list of strings, got {_describe(value)}")
            continue
        for i, item in enumerate(value):
            if not isinstance(item, str):
                problems.append(f"{where(key, i)}: {key}[{i}]: must be a string, got {_describe(item)}")
            elif not item.strip():
                problems.append(f"{where(key, i)}: {key}[{i}]: must not be empty")
            elif key == "vocabulary" and len(item.split()) != 1:
                problems.append(f"{where(key, i)}: vocabulary[{i}]: {shorten(item)} is not a single word "
                                "(vocabulary matches whole words; put phrases under catchphrases)")
    if problems:
        raise PersonaError(problems.text())
    return Persona(**{k: data[k] for k in _KEYS if k in data})
