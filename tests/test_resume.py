"""Exact resume: a stopped-and-resumed run ends with the weights of an uninterrupted one, bit for bit.

The run is stopped by a real SIGTERM (sent from inside the loop at a known step), resumed with
``resume=True``, and compared with an uninterrupted run of the same config; a "cold restart" from the
same checkpoint's weights alone (fresh optimizer, schedule, data order and PRNG) must differ. LoRA
dropout is on, so the PRNG key matters too.
"""

import json
import shutil

import mlx.core as mx
import pytest
from mlx.utils import tree_map
from training_runs import (
    SIGTERM,
    SignalAtStep,
    bitwise_equal,
    config,
    copy_run,
    max_abs_diff,
    metrics,
    reference_run,
)

import mlx_persona.tuner.run as run_mod
from mlx_persona.tuner import checkpoint as ckpt
from mlx_persona.tuner.run import run
from mlx_persona.tuner.trainer import Interrupted, TrainingError

quiet = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tiny_path, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ref = reference_run(tiny_path, small_data, root)
    stopped = root / "stopped"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "Progress", SignalAtStep(SIGTERM, 3))
        with pytest.raises(Interrupted) as info:
            run(config(tiny_path, small_data, stopped), **quiet)
    return {"root": root, "ref": ref, "stopped": stopped, "interrupted": info.value,
            "cfg": lambda out, **kw: config(tiny_path, small_data, out, **kw)}


def _key_order(out):
    return [(r["step"], "val" if "val_loss" in r else "train") for r in metrics(out)]


def _losses(out):
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in metrics(out)]


def test_sigterm_saves_at_the_step_boundary_and_says_how_to_resume(runs):
    stopped, err = runs["stopped"], runs["interrupted"]
    assert err.exit_code == 143
    assert "SIGTERM at step 4" in str(err) and "--resume" in str(err) and str(stopped / "config.yaml") in str(err)
    assert [p.name for p in ckpt.list_checkpoints(stopped / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert not (stopped / "adapters.safetensors").exists()  # the result is written only at the end


def test_checkpoint_holds_the_whole_state(runs):
    path = runs["stopped"] / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "optimizer.safetensors", "state.json",
                                                     "weights.safetensors"]
    assert ckpt.verify(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 4
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["size"] and len(meta["sha256"]) == 64
    state = json.loads((path / "state.json").read_text())
    # 12 examples in batches of 4: 3 batches per epoch, so step 4 is one batch into epoch 1.
    assert {k: state["loop"][k] for k in ("step", "epoch", "batch")} == {"step": 4, "epoch": 1, "batch": 1}
    # The best validation so far is the lowest val_loss the run logged up to step 4 (the first, on a tie).
    vals = {r["step"]: r["val_loss"] for r in metrics(runs["stopped"]) if "val_loss" in r}
    assert sorted(vals) == [2, 4]
    best = min(vals, key=lambda step: (vals[step], step))
    assert (state["loop"]["best_step"], state["loop"]["best_val"]) == (best, vals[best])
    assert state["loop"]["bad_evals"] == (0 if best == 4 else 1)
    assert len(state["rng"]) == 2 and state["config"]["lora"]["dropout"] == 0.1 and len(state["data"]) == 16
    opt = mx.load(str(path / "optimizer.safetensors"))
    assert opt["step"].item() == 4  # the schedule position
    assert any(k.endswith(".m") for k in opt) and any(k.endswith(".v") for k in opt)
    assert sorted(mx.load(str(path / "weights.safetensors"))) == sorted(k[:-2] for k in opt if k.endswith(".m"))


def test_resume_is_exact_and_a_cold_restart_is_not(runs, tmp_path):
    ref, stopped = runs["ref"], runs["stopped"]
    resumed = copy_run(stopped, tmp_path / "resumed")
    summary = run(runs["cfg"](resumed), resume=True, **quiet)
    assert summary["steps"] == 6
    diff = max_abs_diff(ref / "adapters.safetensors", resumed / "adapters.safetensors")
    print(f"resume max |diff| = {diff}")
    assert bitwise_equal(ref / "adapters.safetensors", resumed / "adapters.safetensors"), diff
    assert bitwise_equal(ref / "best" / "adapters.safetensors", resumed / "best" / "adapters.safetensors")
    # Metrics: every step once, same numbers as the uninterrupted run.
    assert _key_order(resumed) == _key_order(ref)
    assert _losses(resumed) == _losses(ref)

    # A cold restart: the step-4 weights only, with a fresh optimizer (moments and schedule), the data
    # order from the start, and the seed's PRNG key.
    cold = copy_run(stopped, tmp_path / "cold")
    root = cold / "checkpoints"
    path, weights, opt, state = ckpt.load_latest(root, log=lambda m: None)
    state["loop"].update(epoch=0, batch=0)
    state["rng"] = [0, 0]
    ckpt.save_checkpoint(root, 4, weights, tree_map(mx.zeros_like, opt), state)
    run(runs["cfg"](cold), resume=True, **quiet)
    cold_diff = max_abs_diff(ref / "adapters.safetensors", cold / "adapters.safetensors")
    print(f"cold restart max |diff| = {cold_diff}")
    assert cold_diff > 1e-4


def test_damaged_newest_checkpoint_is_skipped_and_metrics_are_not_repeated(runs, tmp_path):
    """The complete run's step-6 checkpoint is truncated: resume reports it, continues from step 4, re-saves
    step 6, and metrics.jsonl (which already had rows for steps 5 and 6) holds each row once."""
    ref = runs["ref"]
    out = copy_run(ref, tmp_path / "damaged")
    for name in ("adapters.safetensors", "summary.json"):
        (out / name).unlink()
    weights = out / "checkpoints" / "step-00000006" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a torn line, as a kill while writing would leave
    lines = []
    run(runs["cfg"](out), resume=True, log=lines.append)
    assert any("step-00000006 is unusable" in l and "truncated" in l for l in lines), lines
    assert any("resuming at step 4" in l for l in lines), lines
    assert bitwise_equal(ref / "adapters.safetensors", out / "adapters.safetensors")
    assert ckpt.verify(out / "checkpoints" / "step-00000006") is None
    assert _key_order(out) == _key_order(ref) and _losses(out) == _losses(ref)


def test_changed_config_names_the_keys_and_stops_unless_forced(runs, tmp_path):
    out = copy_run(runs["stopped"], tmp_path / "changed")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    changed = runs["cfg"](out, **{"optim.learning_rate": 2e-2, "seed": 1, "save_every": 1})
    with pytest.raises(TrainingError) as info:
        run(changed, resume=True, **quiet)
    msg = str(info.value)
    assert "optim.learning_rate" in msg and "seed" in msg and "--force" in msg
    assert "save_every" not in msg  # checkpoint cadence may change
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing touched

    summary = run(changed, resume=True, force=True, **quiet)
    assert summary["steps"] == 6
    assert not bitwise_equal(runs["ref"] / "adapters.safetensors", out / "adapters.safetensors")


def test_changed_training_data_stops_unless_forced(runs, tmp_path):
    """Same config, but the data the checkpoint was trained on (its fingerprint) is not this data."""
    out = copy_run(runs["stopped"], tmp_path / "data-changed")
    path, weights, opt, state = ckpt.load_latest(out / "checkpoints", log=lambda m: None)
    state["data"] = "0123456789abcdef"
    ckpt.save_checkpoint(out / "checkpoints", state["loop"]["step"], weights, opt, state)
    with pytest.raises(TrainingError, match="training data .* differ from the run being resumed"):
        run(runs["cfg"](out), resume=True, **quiet)


def test_resume_without_a_run_or_with_every_checkpoint_damaged_fails_clearly(runs, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        run(runs["cfg"](tmp_path / "none"), resume=True, **quiet)
    out = copy_run(runs["stopped"], tmp_path / "all-damaged")
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        (path / "state.json").write_text("{}")
    with pytest.raises(TrainingError, match="every checkpoint is damaged"):
        run(runs["cfg"](out), resume=True, **quiet)
    shutil.rmtree(out)


def test_an_early_stopped_run_stays_stopped_when_resumed(runs, tmp_path):
    """Killed after its early-stopping checkpoint but before writing the results: resuming only writes them."""
    out = copy_run(runs["stopped"], tmp_path / "early")
    path, weights, opt, state = ckpt.load_latest(out / "checkpoints", log=lambda m: None)
    state["loop"]["stop_reason"] = "early stopping: no improvement in 1 evaluations"
    ckpt.save_checkpoint(out / "checkpoints", 4, weights, opt, state)
    summary = run(runs["cfg"](out), resume=True, **quiet)
    assert summary["steps"] == 4 and summary["stop_reason"].startswith("early stopping")
    assert bitwise_equal(path / "weights.safetensors", out / "adapters.safetensors")
