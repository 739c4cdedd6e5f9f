"""Tests for mlx_persona.runs: reading what a train output folder says about itself."""

import json

from mlx_persona.runs import adapter_config, is_adapter_folder, recorded_base


def test_adapter_config_of_adapter_full_and_no_folder(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "model": "x"}))
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert adapter_config(lora) == {"fine_tune_type": "lora", "model": "x"}
    assert adapter_config(full) == {"fine_tune_type": "full"}
    assert adapter_config(None) == {}
    assert is_adapter_folder(lora) and not is_adapter_folder(full)
    (lora / "config.json").write_text("{}")  # a model folder that also has an adapter config needs no base
    assert not is_adapter_folder(lora)


def test_recorded_base_prefers_the_folder_while_it_exists(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    assert recorded_base({"model": str(base), "model_spec": "builtin:tiny"}) == str(base)
    # Moved to another machine: the folder is gone, the spec it came from still names the base.
    assert recorded_base({"model": str(tmp_path / "gone"), "model_spec": "builtin:tiny"}) == "builtin:tiny"
    assert recorded_base({"model": str(tmp_path / "gone")}) == str(tmp_path / "gone")
    assert recorded_base({"model_spec": "google/gemma-3-270m-it"}) == "google/gemma-3-270m-it"
    assert recorded_base({}) is None
