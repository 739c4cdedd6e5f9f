"""Training configuration: dataclasses mirrored 1:1 by YAML.

Precedence is CLI options > YAML file > dataclass defaults. Unknown keys, wrong types and impossible
values raise :class:`ConfigError` naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_persona.paths import data_path
from mlx_persona.safe_io import InputError, clip, load_yaml, parse_yaml, shorten


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


PREFERENCE_METHODS = ("dpo", "orpo")
DEFAULT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """Adapter settings (ignored by `method: full`)."""

    rank: int = 8
    alpha: float = 16.0  # scale = alpha / rank, as in peft
    dropout: float = 0.0
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES))
    num_layers: int = -1  # adapt the last N transformer blocks; -1 = all


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * learning_rate`."""

    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class PreferenceConfig:
    """Preference training (``method: dpo`` or ``orpo``; see :mod:`mlx_persona.tuner.preference`)."""

    # A run folder of `mlx-persona train` (its base plus its adapter are where training starts and, for DPO,
    # the frozen reference), or a model; null: `model`. On the command line: --from.
    start_from: str | None = None
    adapter: str = "auto"  # auto | lora | dora | full; auto: the start run's adapter trains on, else lora
    beta: float = 0.1  # DPO's beta (IPO's tau)
    loss: str = "sigmoid"  # DPO: sigmoid | ipo
    orpo_lambda: float = 0.1  # ORPO: the weight of the odds-ratio term


@dataclass
class TrainConfig:
    """Everything `mlx-persona train` needs. YAML keys are these field names."""

    model: str = "builtin:tiny"
    data: str = "data/bluey"  # a folder with train.jsonl [+ valid.jsonl], or a train .jsonl file
    valid_data: str | None = None  # a valid .jsonl when `data` is a file
    output: str = "runs/quickstart"
    overwrite: bool = False
    method: str = "lora"  # lora | dora | full (SFT) | dpo | orpo (preference pairs; see `preference`)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    batch_size: int = 4
    epochs: int = 5
    steps: int = 0  # > 0 overrides epochs
    grad_accumulation: int = 1
    grad_checkpoint: bool = False
    max_seq_len: int = 1024
    on_long: str = "truncate"  # truncate | drop | error
    seed: int = 0
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    eval_every: int = 50  # validation loss every N steps (and at the end); 0 = only at the end
    eval_batches: int = -1  # -1 = the whole validation set
    save_every: int = 100  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # the last N, plus the best
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0 = off
    log_every: int = 10
    loss_chunk: int = 8192  # vocabulary chunk of the fused LM-head cross-entropy (memory ~ loss tokens x chunk)
    progress: bool = True

    @property
    def adapter_kind(self) -> str:
        """What trains: ``lora``, ``dora`` or ``full`` (``auto`` for dpo/orpo continuing a start run's adapter)."""
        return self.preference.adapter if self.method in PREFERENCE_METHODS else self.method

    def validate(self) -> "TrainConfig":
        """Checks values that types alone cannot; returns self."""
        finite = [k for k in ("lora.alpha", "optim.learning_rate", "optim.weight_decay", "optim.eps",
                              "optim.min_lr_ratio", "optim.max_grad_norm", "preference.beta",
                              "preference.orpo_lambda") if not math.isfinite(_get(self, k))]
        finite += [f"optim.betas[{i}]" for i, b in enumerate(self.optim.betas) if not math.isfinite(b)]
        if finite:
            got = shorten(_get(self, finite[0].split('[')[0]))
            raise ConfigError(f"{finite[0]}: must be a finite number (got {got})")
        checks = [
            (self.method in ("lora", "dora", "full", *PREFERENCE_METHODS), "method",
             "must be lora, dora, full, dpo or orpo"),
            (self.preference.adapter in ("auto", "lora", "dora", "full"), "preference.adapter",
             "must be auto, lora, dora or full"),
            (self.preference.loss in ("sigmoid", "ipo"), "preference.loss", "must be sigmoid or ipo"),
            (self.preference.beta > 0, "preference.beta", "must be > 0"),
            (self.preference.orpo_lambda >= 0, "preference.orpo_lambda", "must be >= 0"),
            (self.preference.start_from is None or self.method in PREFERENCE_METHODS, "preference.start_from",
             "is only for method dpo or orpo"),
            (self.preference.start_from is None or self.preference.start_from.strip() != "",
             "preference.start_from", "must name a run folder or a model"),
            (self.output.strip() != "", "output", "must name a folder"),
            (self.model.strip() != "", "model", "must name a model"),
            (0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)"),
            (self.on_long in ("truncate", "drop", "error"), "on_long", "must be truncate, drop or error"),
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.epochs >= 1 or self.steps >= 1, "epochs", "must be >= 1 (or set steps)"),
            (self.steps >= 0, "steps", "must be >= 0"),
            (self.grad_accumulation >= 1, "grad_accumulation", "must be >= 1"),
            (self.max_seq_len >= 8, "max_seq_len", "must be >= 8"),
            (self.lora.rank >= 1, "lora.rank", "must be >= 1"),
            (self.lora.alpha > 0, "lora.alpha", "must be > 0"),
            (0 <= self.lora.dropout < 1, "lora.dropout", "must be in [0, 1)"),
            (len(self.lora.modules) > 0, "lora.modules", "must name at least one module"),
            (self.lora.num_layers == -1 or self.lora.num_layers >= 1, "lora.num_layers", "must be -1 or >= 1"),
            (self.optim.learning_rate > 0, "optim.learning_rate", "must be > 0"),
            (self.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
            (self.optim.eps > 0, "optim.eps", "must be > 0"),
            (len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas), "optim.betas",
             "must be two numbers in [0, 1)"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]"),
            (self.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
             "must be auto, float32, bfloat16 or float16"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
            (self.eval_batches == -1 or self.eval_batches >= 1, "eval_batches", "must be -1 or >= 1"),
            (self.save_every >= 0, "save_every", "must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            (self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.loss_chunk >= 256, "loss_chunk", "must be >= 256"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{key}: {why} (got {shorten(_get(self, key))})")
        return self


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_type(key: str, value: Any, annotation) -> Any:
    """Coerces a YAML/CLI value to the field's type, or raises ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {shorten(value)}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shorten(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {shorten(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {shorten(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {shorten(value)}")
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def from_dict(cls, data: dict, prefix: str = ""):
    """Builds dataclass `cls` from a nested dict; unknown keys are errors that name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {shorten(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{clip(key)}"
        if key not in fields:
            close = [k for k in fields if k.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{name}: unknown key{hint}; known keys: {', '.join(fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = from_dict(annotation, value, prefix=f"{name}.")
        else:
            kwargs[key] = _check_type(name, value, annotation)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The nested dict that `from_dict` reads back (what is saved as the resolved config)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {shorten(item)}: expected KEY=VALUE, e.g. --set optim.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), parse_yaml(raw, f"--set {clip(key.strip())}")[1] if raw.strip() else ""
    except InputError as e:
        raise ConfigError(str(e).replace(":1: invalid YAML", ": invalid YAML", 1)) from None


def _merge(base: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = base
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{clip(dotted)}: {clip(part)} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                sets: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Reads a YAML config, applies CLI overrides, validates.

    Args:
        path: a YAML file mirroring :class:`TrainConfig`, or None for defaults.
        overrides: dotted keys → values from CLI options (None values are ignored).
        sets: ``KEY=VALUE`` strings from ``--set`` (values parsed as YAML).

    Returns:
        A validated :class:`TrainConfig`.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{_resolved(p)}: no such config file")
        try:  # no anchors or aliases, at most 64 kB, strict UTF-8 (see mlx_persona.safe_io)
            loaded = load_yaml(p)
        except InputError as e:
            raise ConfigError(str(e)) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of keys to values at the top level")
        data = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _merge(data, key, value)
    for item in sets:
        _merge(data, *_parse_override(item))
    try:
        cfg = from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg.validate()


PATH_KEYS = ("model", "data", "valid_data", "output")  # the keys that may name a local path


def _resolved(value) -> str:
    """`value` as a message names a path not found: a relative one with what it was resolved against."""
    return str(value) if Path(value).expanduser().is_absolute() else f"{value} (resolved against {Path.cwd()})"


def _absolute(value: str | Path, key: str = "") -> str:
    """`value` as an absolute path; for ``data``/``valid_data`` after :func:`~mlx_persona.paths.data_path`
    (``data/bluey`` is the shipped data where this folder has none)."""
    path = data_path(value) if key in ("data", "valid_data") else Path(value)
    return os.path.abspath(path.expanduser())


def _maybe_hub_id(spec: str) -> bool:
    """What a missing local model may still be: ``builtin:NAME`` or a hub id (``org/name``)."""
    return spec.startswith("builtin:") or (spec.count("/") == 1 and not spec.startswith((".", "/", "~")))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` whose local paths are absolute (resolved against the current folder): ``data``,
    ``valid_data``, ``output``, and ``model`` when it is a local folder (a hub id or ``builtin:NAME``
    stays as it is). The ``config.yaml`` a run saves then works from any folder.

    Raises:
        ConfigError: ``data`` or ``valid_data`` does not exist, or ``model`` is neither a folder nor a hub
            id or built-in; a relative path's message says what it was resolved against.
    """
    def existing(key: str, value: str) -> str:
        path = _absolute(value, key)
        if not os.path.exists(path):
            raise ConfigError(f"{key}: {_resolved(value)}: no such file or folder")
        return path

    changes = {"data": existing("data", cfg.data), "output": _absolute(cfg.output)}
    if cfg.valid_data is not None:
        changes["valid_data"] = existing("valid_data", cfg.valid_data)
    start = cfg.preference.start_from
    if start is not None:  # its base is the model: the start run's, or the model it names
        from mlx_persona.runs import RunFolderError, resolve_run

        start = _absolute(start) if os.path.exists(_absolute(start)) else start
        try:
            model = resolve_run(start, None, model_flag="preference.start_from")[0]
        except RunFolderError as e:
            raise ConfigError(f"preference.start_from: {e}") from None
        changes["preference"] = dataclasses.replace(cfg.preference, start_from=start)
        cfg = dataclasses.replace(cfg, model=model)
        changes["model"] = model
    if not cfg.model.startswith("builtin:") and os.path.exists(_absolute(cfg.model)):
        changes["model"] = _absolute(cfg.model)
    elif not _maybe_hub_id(cfg.model):
        raise ConfigError(f"model: {_resolved(cfg.model)}: no such folder, and not a hub id (org/name) or "
                          "builtin:NAME")
    return dataclasses.replace(cfg, **changes)


def absolute_saved_paths(saved: dict) -> dict:
    """A saved config dict with its relative local paths made absolute as :func:`absolute_paths` does
    (runs saved before paths were stored absolute compare equal to the same config today)."""
    out = dict(saved)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not value.startswith("builtin:") and \
                (key != "model" or os.path.exists(_absolute(value))):
            out[key] = _absolute(value, key)
    return out


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
