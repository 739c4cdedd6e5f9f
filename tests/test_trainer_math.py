"""Known answers for the trainer's arithmetic: gradient accumulation, clipping, early stopping.

The end-to-end checks drive the real `train.train` on a 4-conversation data folder whose replies have
very different lengths (so micro-batches hold very different numbers of loss tokens). AdamW's first
step is about ``lr * sign(g)``, blind to the scale of the gradient, so these runs make it plain SGD:
betas (0, 0) give ``update = lr * g / (|g| + eps)``, and lr = eps = 1e6 makes that ``g`` to within
|g| / eps (< 1e-6 here). One step from the initial adapters (lora_b = 0) then moves lora_b by exactly
minus the gradient of the step, so saved adapters compare gradients, scale included.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map

import mlx_persona.tuner.trainer as train_mod
from mlx_persona import data as data_mod
from mlx_persona.tuner.batching import batch_plan, collate
from mlx_persona.models import load_model
from mlx_persona.tuner.config import TrainConfig
from mlx_persona.tuner.run import run
from mlx_persona.tuner.trainer import clip_by_global_norm, global_norm, track_validation
from mlx_persona.tuner.adapters import attach_adapters
from mlx_persona.tuner.losses import loss_fn
from training_runs import bitwise_equal, config, metrics, weights

quiet = dict(log=lambda *a: None)

REPLIES = [
    "Yes!",
    "Let's play keepy uppy in the backyard with Bingo.",
    "Hooray! We can build a fort out of the couch cushions and pretend it is a castle on a hill, with a moat.",
    ("Okay. Dad says we can go to the beach after lunch, and Mum will bring the picnic basket and the big "
     "umbrella, so we can swim and dig and look for crabs all afternoon long, and then have fish and chips "
     "on the sand while the sun goes down over the water and the seagulls try to steal our chips."),
]
# Plain SGD with learning rate 1 (see the module docstring), no clipping, no dropout, no evaluation.
SGD = {"steps": 1, "lora.dropout": 0.0, "optim.betas": [0.0, 0.0], "optim.eps": 1e6,
       "optim.learning_rate": 1e6, "optim.max_grad_norm": 0.0, "eval_every": 0, "save_every": 0}


def _conversation(i, reply):
    return {"messages": [{"role": "user", "content": f"Question number {i}?"},
                         {"role": "assistant", "content": reply}]}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """4 training conversations (replies of 2 to ~60 words) and 2 validation ones."""
    d = tmp_path_factory.mktemp("uneven")
    rows = [_conversation(i, r) for i, r in enumerate(REPLIES)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    valid = [_conversation(10 + i, r) for i, r in enumerate(["Maybe later.", "I like the blue one best."])]
    (d / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("math")


def _update_diff(a: Path, b: Path) -> float:
    """max |a - b| over every adapter tensor, relative to the largest entry of b (the size of the update)."""
    wa, wb = weights(a / "adapters.safetensors"), weights(b / "adapters.safetensors")
    assert sorted(wa) == sorted(wb)
    scale = max(mx.abs(v).max().item() for k, v in wb.items() if k.endswith("lora_b"))
    assert scale > 1e-3, "the step did not move the adapters measurably"
    return max(mx.abs(wa[k] - wb[k]).max().item() for k in wa) / scale


def _train_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "loss" in r]


def _run(tiny_path, data, out, **changes):
    run(config(tiny_path, data, out, **{**SGD, **changes}), **quiet)
    return out


# --------------------------------------------------------------------------------------------------
# a. Gradient accumulation

# Measured (AMD EPYC, with and without MLX_PERSONA_SGEMM=0): accumulated vs one big batch differ by at
# most 1.4e-6 of the update (k=4; k=2: 5.7e-7), from the order of the additions and the batches' padding;
# logged grad_norm and loss by 1.3e-7. Keeping only the last micro-batch's gradient misses by 0.36-0.72.
ACCUM_RTOL = 2e-5


@pytest.mark.parametrize("batch_size, accum", [(2, 2), (1, 4)])
def test_accumulation_equals_one_big_batch(tiny_path, uneven, runs, batch_size, accum):
    """k micro-batches of b examples give the update of one batch of k*b (the same 4 examples), although the
    micro-batches hold very different numbers of loss tokens: the gradients are summed over micro-batches,
    each divided by the loss tokens of the whole step (not its own, not the last micro-batch's alone)."""
    tok = load_model(tiny_path)[1]
    ds = data_mod.prepare_dataset(tok, data_mod.load_splits(uneven)[0], 1024)
    plan = batch_plan([len(t) for t in ds.tokens], batch_size)
    counts = [sum(int(ds.masks[i][1:].sum()) for i in idx) for idx in plan]
    assert len(plan) == accum and max(counts) > 3 * min(counts), counts  # uneven micro-batches

    big = runs / "big"
    if not big.exists():
        _run(tiny_path, uneven, big, batch_size=4, grad_accumulation=1)
    acc = _run(tiny_path, uneven, runs / f"acc-{batch_size}x{accum}", batch_size=batch_size, grad_accumulation=accum)
    diff = _update_diff(acc, big)
    print(f"accumulation {accum} x {batch_size}: max |diff| / max |update| = {diff:.3g}")
    assert diff <= ACCUM_RTOL, f"{accum} x {batch_size} accumulated vs one batch of 4: relative diff {diff:.3g}"
    (m_big,), (m_acc,) = _train_rows(big), _train_rows(acc)
    print(f"  grad_norm rel diff {m_acc['grad_norm'] / m_big['grad_norm'] - 1:.3g}, "
          f"loss {m_acc['loss'] / m_big['loss'] - 1:.3g}")
    assert m_acc["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-5)
    assert m_acc["loss"] == pytest.approx(m_big["loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# b. Clipping


# Measured over 5 seeds: global_norm vs torch's total norm 2.5e-7 relative, clipped gradients 3.6e-7,
# the norm after clipping vs the limit 3e-7 (float32 sums in a different order).
FN_RTOL = 5e-6


def _random_grads(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"layers": [{"a": (64, 4), "b": (4, 32)}, {"a": (192, 4), "b": (4, 64)}], "m": (64,)}
    return tree_map(lambda s: rng.normal(0, 0.1, s).astype(np.float32), shapes,
                    is_leaf=lambda x: isinstance(x, tuple))


def _torch_params(grads_np):
    params = []
    for _, g in tree_flatten(grads_np):
        p = torch.zeros(g.shape, dtype=torch.float32, requires_grad=True)
        p.grad = torch.tensor(g)
        params.append(p)
    return params


@pytest.mark.parametrize("where", ["below", "at", "above", "far above"])
def test_clipping_equals_torch_clip_grad_norm(where):
    """global_norm and clip_by_global_norm give torch.nn.utils.clip_grad_norm_'s total norm and clipped
    gradients, with the limit above the norm (unchanged), at it, and below it (scaled down)."""
    grads_np = _random_grads()
    grads = tree_map(mx.array, grads_np)
    true_norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for _, g in tree_flatten(grads_np))))
    max_norm = true_norm * {"below": 2.0, "at": 1.0, "above": 0.5, "far above": 0.01}[where]
    params = _torch_params(grads_np)
    torch_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    norm = global_norm(grads)
    assert norm.item() == pytest.approx(torch_norm, rel=FN_RTOL) and torch_norm == pytest.approx(true_norm, rel=FN_RTOL)
    clipped = clip_by_global_norm(grads, norm, max_norm)
    for (name, g), p in zip(tree_flatten(clipped), params):
        np.testing.assert_allclose(np.array(g), p.grad.numpy(), rtol=FN_RTOL, atol=1e-9, err_msg=name)
    got = global_norm(clipped).item()
    assert got == pytest.approx(min(true_norm, max_norm), rel=1e-5)


def test_max_grad_norm_zero_disables_clipping():
    """max_norm 0 means no clipping (torch would zero the gradients instead)."""
    grads = tree_map(mx.array, _random_grads(1))
    same = clip_by_global_norm(grads, global_norm(grads), 0.0)
    assert all(mx.array_equal(a, b) for (_, a), (_, b) in zip(tree_flatten(grads), tree_flatten(same)))


def _step_gradients(tiny_path, uneven, unclipped: Path):
    """The gradients of the first step, computed here with mlx's value_and_grad on the same batch.

    The initial adapters are lora_b = 0 and lora_a as saved after the step: with lora_b = 0 the gradient
    of lora_a is exactly 0, and with betas (0, 0) a zero gradient moves nothing.
    """
    model, tok = load_model(tiny_path)
    attach_adapters(model, "lora", 4, 16.0, 0.0, TrainConfig().lora.modules)
    saved = weights(unclipped / "adapters.safetensors")
    model.load_weights([(k, v if k.endswith("lora_a") else mx.zeros_like(v)) for k, v in saved.items()], strict=False)
    ds = data_mod.prepare_dataset(tok, data_mod.load_splits(uneven)[0], 1024)
    b = collate(ds.tokens, ds.masks)
    model.train()
    batch = [mx.array(x) for x in (b.inputs, b.targets, b.positions, b.weights)]
    _, grads = nn.value_and_grad(model, loss_fn)(model, *batch, mx.array(float(b.n_loss)))
    return {k: np.array(v) for k, v in tree_flatten(grads)}, saved


def _rel_max_diff(got: dict, want: dict) -> float:
    """max |got - want| over the lora_b tensors, relative to the largest |want|."""
    keys = [k for k in want if k.endswith("lora_b")]
    scale = max(np.abs(want[k]).max() for k in keys)
    return max(np.abs(np.asarray(got[k]) - want[k]).max() for k in keys) / scale


# Measured (AMD EPYC): logged vs independently computed norm 6.4e-8 relative; the saved update vs minus
# the gradient 1.2e-6 of max |g| (AdamW's |g| / eps and the compiled step's order of additions); the
# clipped update vs ratio x the unclipped one 2.5e-7. Bounds: 1e-5, 2e-5, 1e-5. The squared norm
# instead of the norm (3.4 for 1.86 here) misses all three by far.
NORM_RTOL, SGD_RTOL, CLIP_RTOL = 1e-5, 2e-5, 1e-5


def test_trainer_logs_and_clips_by_the_l2_norm(tiny_path, uneven, runs):
    """End to end: the grad_norm the trainer logs is torch's L2 norm of the step's gradients (computed here
    independently), and a run with max_grad_norm = norm / 4 moves the adapters by exactly
    max_norm / (norm + 1e-6) times the unclipped update."""
    unclipped = _run(tiny_path, uneven, runs / "unclipped", batch_size=4)
    grads, saved = _step_gradients(tiny_path, uneven, unclipped)
    torch_norm = torch.nn.utils.clip_grad_norm_(_torch_params(grads), 1e9).item()
    (row,) = _train_rows(unclipped)
    print(f"logged grad_norm {row['grad_norm']!r}, torch {torch_norm!r}: "
          f"rel diff {row['grad_norm'] / torch_norm - 1:.3g}")
    assert row["grad_norm"] == pytest.approx(torch_norm, rel=NORM_RTOL), "logged grad_norm is not the L2 norm"
    # The SGD set-up holds: the update is minus the gradient computed here.
    sgd = _rel_max_diff({k: -np.array(v) for k, v in saved.items()}, grads)
    print(f"update vs -gradient: {sgd:.3g}")
    assert sgd <= SGD_RTOL, f"the unclipped update is not minus the gradient: relative diff {sgd:.3g}"

    max_norm = torch_norm / 4
    clipped = _run(tiny_path, uneven, runs / "clipped", batch_size=4, **{"optim.max_grad_norm": max_norm})
    (row_c,) = _train_rows(clipped)
    assert row_c["grad_norm"] == pytest.approx(torch_norm, rel=NORM_RTOL)  # logged before clipping
    ratio = max_norm / (torch_norm + 1e-6)
    wc = weights(clipped / "adapters.safetensors")
    clip = _rel_max_diff(wc, {k: ratio * np.array(v) for k, v in saved.items()})
    print(f"clipped vs {ratio:.4f} x unclipped: {clip:.3g}")
    assert clip <= CLIP_RTOL, f"clipped update is not {ratio:.4f} x the unclipped one: relative diff {clip:.3g}"
    assert all(mx.array_equal(wc[k], v) for k, v in saved.items() if k.endswith("lora_a"))


# --------------------------------------------------------------------------------------------------
# c. Early stopping


def _track(losses, patience):
    loop = {"best_val": None, "best_step": None, "bad_evals": 0}
    decisions = []
    for step, val in enumerate(losses, start=1):
        decisions.append(track_validation(loop, val, step, patience))
        if decisions[-1][1]:
            break
    return decisions, loop


def test_track_validation_stops_after_exactly_patience_evaluations_without_improvement():
    """patience 2: stop at the 2nd evaluation in a row that does not beat the best (equal is not better);
    an improvement resets the count; patience 0 never stops."""
    decisions, loop = _track([3.0, 2.0, 2.5, 2.0, 1.0], 2)
    assert decisions == [(True, False), (True, False), (False, False), (False, True)]
    assert (loop["best_val"], loop["best_step"], loop["bad_evals"]) == (2.0, 2, 2)

    decisions, loop = _track([3.0, 3.1, 2.9, 3.0, 2.95, 4.0], 2)
    assert [d[1] for d in decisions] == [False, False, False, False, True]
    assert [d[0] for d in decisions] == [True, False, True, False, False]
    assert (loop["best_step"], loop["bad_evals"]) == (3, 2)

    decisions, _ = _track([1.0, 2.0, 3.0], 1)
    assert decisions == [(True, False), (False, True)]
    decisions, loop = _track([1.0] + [2.0] * 20, 0)
    assert not any(d[1] for d in decisions) and loop["bad_evals"] == 20


def test_training_stops_early_at_the_expected_step_with_the_best_adapters(tiny_path, uneven, tmp_path, monkeypatch):
    """End to end, with the validation losses scripted (the input here, not what is tested): 3.0, 2.0 (best,
    step 2), 2.5, 2.2 -> patience 2 stops after step 4; summary.json says so, and best/ holds the adapters of
    step 2, equal to that step's checkpoint and different from the final ones."""
    scripted = iter([3.0, 2.0, 2.5, 2.2, 1.0, 0.5] + [9.0] * 20)
    monkeypatch.setattr(train_mod, "evaluate_loss", lambda *a, **k: next(scripted))
    out = tmp_path / "early"
    cfg = config(tiny_path, uneven, out, steps=12, batch_size=2, eval_every=1, early_stopping_patience=2,
                 save_every=1, keep_checkpoints=50, **{"lora.dropout": 0.0})
    run(cfg, **quiet)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4, f"stopped after {summary['steps']} steps, expected 4"
    assert summary["stop_reason"].startswith("early stopping") and "2 evaluations" in summary["stop_reason"]
    assert (summary["best_step"], summary["best_val_loss"]) == (2, 2.0)
    assert [r["val_loss"] for r in metrics(out) if "val_loss" in r] == [3.0, 2.0, 2.5, 2.2]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    best = out / "best" / "adapters.safetensors"
    assert bitwise_equal(best, ckpts / "step-00000002" / "weights.safetensors")
    assert not bitwise_equal(best, out / "adapters.safetensors")
    assert bitwise_equal(out / "adapters.safetensors", ckpts / "step-00000004" / "weights.safetensors")
