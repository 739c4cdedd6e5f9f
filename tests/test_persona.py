"""Persona cards: the shipped card loads, and every mistake is reported as `path:line: key: reason`."""

import json
from pathlib import Path

import pytest

from mlx_persona.eval.metrics import count_phrases
from mlx_persona.eval.persona import Persona, PersonaError, load_persona

BLUEY = Path(__file__).resolve().parents[1] / "data" / "bluey"

GOOD = "name: Bluey\ndescription: A pup.\n"


def error(tmp_path, text: str) -> str:
    path = tmp_path / "persona.yaml"
    path.write_text(text)
    with pytest.raises(PersonaError) as e:
        load_persona(path)
    return str(e.value).replace(str(path), "P")


def test_shipped_card_loads_and_fits_the_data():
    p = load_persona(BLUEY / "persona.yaml")
    assert p.name == "Bluey" and p.description and p.system_prompt
    assert len(p.catchphrases) >= 5 and len(p.vocabulary) >= 10 and len(p.breaking_phrases) >= 5
    assert all(len(w.split()) == 1 for w in p.vocabulary)
    replies = [m["content"].lower() for f in ("train.jsonl", "valid.jsonl")
               for line in (BLUEY / f).read_text().splitlines() if line.strip()
               for m in json.loads(line)["messages"] if m["role"] == "assistant"]
    # The data README promises that no assistant reply breaks character.
    assert not [b for b in p.breaking_phrases for r in replies if b in r.replace("’", "'")]
    # A quarter of the human-written replies use a catchphrase, matched as the eval matches them (whole words).
    assert sum(bool(count_phrases(r, p.catchphrases)) for r in replies) > len(replies) // 4


def test_minimal_card_has_empty_optional_fields(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD)
    assert load_persona(path) == Persona(name="Bluey", description="A pup.")


def test_unknown_key(tmp_path):
    msg = error(tmp_path, GOOD + "colour: blue\n")
    assert msg.startswith("P:3: colour: unknown key; known keys: name, description")


def test_missing_name(tmp_path):
    assert error(tmp_path, "description: A pup.\n") == "P:1: name: missing (required)"


def test_wrong_types_name_the_key_and_the_item_line(tmp_path):
    msg = error(tmp_path, "name: [Bluey]\ndescription: A pup.\ncatchphrases: hooray\n"
                          "vocabulary:\n  - mum\n  - 3\n  - ''\n")
    assert msg.splitlines() == [
        "P:1: name: must be a string, got list ['Bluey']",
        "P:3: catchphrases: must be a list of strings, got str 'hooray'",
        "P:6: vocabulary[1]: must be a string, got int 3",
        "P:7: vocabulary[2]: must not be empty",
    ]


def test_multi_word_vocabulary(tmp_path):
    msg = error(tmp_path, GOOD + "vocabulary:\n  - mum\n  - for real life\n")
    assert msg == ("P:5: vocabulary[1]: 'for real life' is not a single word (vocabulary matches whole words; "
                   "put phrases under catchphrases)")


def test_invalid_yaml(tmp_path):
    assert error(tmp_path, GOOD + "catchphrases: [hooray\n").startswith("P:4: invalid YAML: expected ',' or ']'")


def test_repeated_key_empty_required_and_not_a_mapping(tmp_path):
    assert error(tmp_path, GOOD + "name: Bingo\n") == "P:3: name: given twice (first at line 1)"
    assert error(tmp_path, "name: ' '\ndescription: A pup.\n") == "P:1: name: must not be empty"
    assert error(tmp_path, "- a\n- b\n").startswith("P:1: (top level): expected a mapping")
    assert error(tmp_path, "").startswith("P:1: (top level): expected a mapping")
    with pytest.raises(PersonaError, match="no such file"):
        load_persona(tmp_path / "missing.yaml")
