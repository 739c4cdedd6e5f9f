"""What ``run(cfg)`` does differently for ``method: dpo | orpo``: load preference pairs, start from a run
folder's adapter (or a base), and compute DPO's reference log-probabilities once, before any step."""

from __future__ import annotations

from pathlib import Path

from mlx import nn
from mlx.utils import tree_unflatten

from mlx_persona.data import template_supports_system
from mlx_persona.data.lines import DataError
from mlx_persona.data.pairs import (
    encode_pairs,
    first_object,
    is_pairs_file,
    load_pair_splits,
    pairs_path,
)
from mlx_persona.runs import adapter_config as run_adapter_config
from mlx_persona.runs import is_adapter_folder
from mlx_persona.tuner.adapters import (
    attach_adapters,
    load_adapters,
    trainable_parameter_count,
)
from mlx_persona.tuner.config import ConfigError, TrainConfig
from mlx_persona.tuner.preference import (
    PreferenceData,
    PreferenceLoss,
    make_evaluate,
    reference_logps,
)


def load_pair_data(cfg: TrainConfig, tokenizer, log):
    """The training and validation pairs, encoded (no reference yet).

    Raises:
        DataError: as ``data.pairs.load_pair_splits``; SFT data (a first line of another format) as one line.
    """
    first = pairs_path(cfg.data)
    if not is_pairs_file(first) and first_object(first) is not None:
        raise DataError(f"{first}:1: not a preference pair: method {cfg.method} trains on lines of "
                        "{\"prompt\" or \"messages\", \"chosen\", \"rejected\"} (see `mlx-persona data pairs`)")
    train_p, valid_p = load_pair_splits(Path(cfg.data), cfg.valid_data, system_ok=template_supports_system(tokenizer))
    train = encode_pairs(tokenizer, train_p, cfg.max_seq_len, cfg.on_long)
    valid = encode_pairs(tokenizer, valid_p, cfg.max_seq_len, cfg.on_long) if valid_p else None
    r = train.report
    log(f"data: {r['kept']} training pairs ({r['truncated']} truncated, {r['dropped']} dropped), "
        f"{r['loss_tokens']} reply tokens of {r['tokens']}; {len(valid) if valid else 0} validation pairs")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the {len(train)} training pairs")
    return train, valid


def _start_adapter(cfg: TrainConfig) -> Path | None:
    start = cfg.preference.start_from
    return Path(start) if start is not None and is_adapter_folder(Path(start)) else None


def attach(model, cfg: TrainConfig, base: Path, log) -> tuple[dict, int]:
    """Makes `model` the policy training starts from; returns its adapter config and trainable count.

    From a LoRA/DoRA run (``preference.start_from``): its adapter is applied (its shape; ``lora.dropout`` is
    this config's); ``adapter: auto`` (or the run's own kind) trains that adapter on, ``full`` fuses it into the weights and trains every weight. From a
    base: new adapters of ``preference.adapter`` (``auto``: lora) with the ``lora`` settings, or ``full``.
    """
    kind, start = cfg.preference.adapter, _start_adapter(cfg)
    if start is None:
        kind = "lora" if kind == "auto" else kind
        try:
            adapter_config = attach_adapters(model, kind, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                             cfg.lora.modules, cfg.lora.num_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        adapter_config = dict(run_adapter_config(start))  # read and checked once, in runs
        own = adapter_config.get("fine_tune_type", "lora")
        if kind not in ("auto", own, "full"):
            raise ConfigError(f"preference.adapter: {kind}, but {start} is a {own} run; use auto (train its "
                              "adapter on) or full (fuse it and train every weight)")
        model.freeze()
        load_adapters(model, start)
        # The adapter's shape is the start run's; dropout, a training setting, is this run's.
        for _, module in model.named_modules():
            if hasattr(module, "lora_a"):
                module.dropout = nn.Dropout(p=cfg.lora.dropout)
        if "lora_parameters" in adapter_config:
            adapter_config["lora_parameters"]["dropout"] = cfg.lora.dropout
        if kind == "full":
            fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
            model.update_modules(tree_unflatten(fused))
            model.unfreeze()
            adapter_config = {"fine_tune_type": "full", "num_layers": len(model.layers)}
        kind = adapter_config["fine_tune_type"]
    adapter_config.update({"model": str(base), "model_spec": cfg.model})
    n_trainable = trainable_parameter_count(model)
    log(f"model: {cfg.model} ({base}); method {cfg.method} ({kind}"
        + (f", from {start}" if start else "") + f"); {n_trainable:,} trainable parameters")
    return adapter_config, n_trainable


def prepare(model, cfg: TrainConfig, train, valid, log):
    """The loss, the validation function and the data sets (with DPO's reference log-probabilities, computed
    now, by the model as training starts)."""
    p = cfg.preference
    loss = PreferenceLoss(cfg.method, beta=p.beta, loss=p.loss, orpo_lambda=p.orpo_lambda)

    def reference(encoded):
        if encoded is None:
            return None
        ref = reference_logps(model, encoded, cfg.batch_size, cfg.loss_chunk) if cfg.method == "dpo" else None
        return PreferenceData(encoded, ref)

    if cfg.method == "dpo":
        log(f"reference: log-probabilities of {len(train) + (len(valid) if valid else 0)} pairs, computed once")
    return loss, make_evaluate(loss), reference(train), reference(valid)
