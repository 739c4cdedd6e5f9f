from pathlib import Path

import pytest

from mlx_persona.tuner.config import (
    ConfigError,
    TrainConfig,
    config_diff,
    load_config,
    to_dict,
)

# Training configs (compare-*.yaml are evaluation recipes, tested in test_evaluate.py).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("compare-"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_open_with_their_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    first = path.read_text().splitlines()[:3]
    assert first[0].startswith("#")
    assert any(f"--config configs/{path.name}" in line for line in first)


def test_yaml_mirrors_dataclass(tmp_path):
    cfg = TrainConfig()
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(p) == cfg


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: builtin:tiny\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat: unknown key"):
        load_config(p)
    p.write_text("lora:\n  rnk: 4\n")
    with pytest.raises(ConfigError, match=r"lora\.rnk: unknown key"):
        load_config(p)


@pytest.mark.parametrize("text, key", [
    ("batch_size: four\n", "batch_size"),
    ("batch_size: 0\n", "batch_size"),
    ("method: qlora\n", "method"),
    ("optim:\n  learning_rate: -1\n", "optim.learning_rate"),
    ("lora:\n  modules: q_proj\n", "lora.modules"),
    ("overwrite: 3\n", "overwrite"),
    ("[1, 2]\n", "mapping"),
    ("model: [unclosed\n", "invalid YAML"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_cli_overrides_yaml_over_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("batch_size: 2\nepochs: 3\noptim:\n  learning_rate: 1.0e-3\n")
    cfg = load_config(p, {"batch_size": 8, "epochs": None}, ["optim.learning_rate=5e-4", "lora.rank=4"])
    assert cfg.batch_size == 8  # CLI beats YAML
    assert cfg.epochs == 3  # None means "not given on the CLI"
    assert cfg.optim.learning_rate == 5e-4 and cfg.lora.rank == 4
    assert cfg.optim.warmup_steps == TrainConfig().optim.warmup_steps  # default kept


def test_config_diff_names_changed_keys():
    a, b = to_dict(TrainConfig()), to_dict(TrainConfig(batch_size=2))
    b["lora"]["rank"] = 4
    assert config_diff(a, b) == ["batch_size", "lora.rank"]
