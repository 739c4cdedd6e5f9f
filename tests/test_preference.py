"""Preference training (DPO with sigmoid and IPO losses, ORPO): the pairs format, its encoding, the loss and
its gradient against PyTorch, and a short run that learns the preference.

The oracle: the built-in tiny model with LoRA adapters set to random values, a few pairs and DPO's reference
(the same model with its adapters off), in transformers + peft (PyTorch). There the log-probabilities come
from the full ``[tokens x vocab]`` logits (``log_softmax``), the reply masks from the test's own rendering
of the prompt with the generation prompt, and the losses from the published formulas, written here as TRL
1.16 defines them (TRL's DPO loss lives inside ``DPOTrainer._compute_loss`` and its ORPO one needs a trainer,
so neither is callable alone): sigmoid ``-log sigmoid(beta * ((c - c0) - (r - r0)))`` of summed reply
log-probabilities; IPO ``((c - c0)/nc - (r - r0)/nr - 1/(2 beta))^2``, per-token means; ORPO ``-mean log p
(chosen) - lambda * log sigmoid(log odds)`` of per-token means (the NLL over the chosen reply only, as
the paper's L_SFT; TRL's covers the prompt too).
"""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_persona.cli import main
from mlx_persona.data import DataError
from mlx_persona.data.pairs import encode_pairs, is_pairs_file, load_pairs
from mlx_persona.tuner.preference import PreferenceData, PreferenceLoss, reference_logps

END = "<end_of_turn>"
PAIRS = [
    {"prompt": "Hi Bluey! How are you today?", "chosen": "Really good! Bingo and me played keepy uppy all day.",
     "rejected": "Fine."},
    {"prompt": "What is your favourite game?", "chosen": "Magic Xylophone! Dad freezes when I play it.",
     "rejected": "I do not know, maybe nothing at all really, it is all the same to me.", "source": "human"},
    {"messages": [{"role": "user", "content": "Where is Bingo?"}, {"role": "assistant", "content": "Outside."},
                  {"role": "user", "content": "What is she doing?"}],
     "chosen": "Being a butterfly in the garden!", "rejected": "Nothing.", "prompt_key": 7},
    {"prompt": "Tell me about Dad.", "chosen": "He is the best horsey ride ever.", "rejected": "He works.",
     "source": "rule:longer-than"},
]
LOSSES = [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", "sigmoid")]
BETA, LAMBDA = 0.7, 0.3


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    from mlx_persona.models import load_model

    return load_model(tiny_path)


# ---- the pairs file ---------------------------------------------------------------------------------------


def test_pairs_file_loads_and_is_recognised(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", PAIRS)
    pairs = load_pairs(path)
    assert [p.source for p in pairs] == [f"{path}:{i}" for i in range(1, 5)]
    assert pairs[2].messages[-1] == {"role": "user", "content": "What is she doing?"} and pairs[2].prompt_key == 7
    assert pairs[1].origin == "human" and pairs[0].messages == [{"role": "user", "content": PAIRS[0]["prompt"]}]
    assert is_pairs_file(path) and not is_pairs_file(tmp_path / "missing.jsonl")
    result = CliRunner().invoke(main, ["data", "validate", str(path)])
    assert result.exit_code == 0 and "ok, 4 preference pairs" in result.output


BAD = [
    ({"prompt": "a", "chosen": "x"}, "missing 'rejected'"),
    ({"prompt": "a", "chosen": "x", "rejected": " x "}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "a", "chosen": "", "rejected": "y"}, "'chosen' is empty"),
    ({"prompt": "a", "chosen": 3, "rejected": "y"}, "'chosen' must be a string, got number"),
    ({"prompt": "a", "chosen": "x", "rejected": "y", "score": 1}, "unknown key 'score' in a preference pair"),
    ({"prompt": "a", "messages": [], "chosen": "x", "rejected": "y"}, "a preference pair needs exactly one of 'prompt' or 'messages'"),
    ({"chosen": "x", "rejected": "y"}, "a preference pair needs exactly one of 'prompt' or 'messages'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "x",
      "rejected": "y"}, "messages[1]: the prompt must end with a user message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "x",
      "rejected": "y"}, "messages[1]: expected 'assistant', got 'user'"),
    ({"prompt": "a", "chosen": "x", "rejected": "y", "prompt_key": [1]}, "'prompt_key' must be a string or an integer"),
]


@pytest.mark.parametrize("row, reason", BAD)
def test_a_bad_pair_is_reported_on_its_line(tmp_path, row, reason):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(f"{path}:3: {reason}")


def test_every_problem_of_a_pairs_file_is_listed_and_the_cli_exits_1(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes("\n".join([json.dumps(PAIRS[0]), "{not json", json.dumps(PAIRS[0])]).encode() + b"\n\xff\n")
    result = CliRunner().invoke(main, ["data", "validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"{path}:2: bad JSON") and lines[1] == f"{path}:3: duplicate of line 1"
    assert lines[2].startswith(f"{path}:4: invalid UTF-8 at byte 1 of the line")


def test_a_bad_pairs_file_stops_train_with_its_line(tiny_path, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({**PAIRS[1], "rejected": PAIRS[1]["chosen"]}) + "\n")
    result = CliRunner().invoke(main, ["train", "--method", "dpo", "--model", str(tiny_path), "--data", str(path),
                                       "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{path}:2: 'chosen' and 'rejected' are the same reply" in result.output
    assert not (tmp_path / "out").exists()


def test_encoding_masks_only_the_reply_and_its_end_of_turn(tiny, tmp_path):
    _, tok = tiny
    pairs = load_pairs(_write(tmp_path / "pairs.jsonl", PAIRS))
    enc = encode_pairs(tok, pairs, 1024)
    assert enc.report["kept"] == 4 and enc.report["dropped"] == 0
    hf = tok._tokenizer
    for i, pair in enumerate(pairs):
        prompt = hf.apply_chat_template(pair.messages, tokenize=False, add_generation_prompt=True)
        for reply, ids, mask in ((pair.chosen, enc.chosen[i], enc.chosen_masks[i]),
                                 (pair.rejected, enc.rejected[i], enc.rejected_masks[i])):
            assert hf.decode(ids) == prompt + reply + END + "\n"  # the prompt, the reply, its end of turn
            assert hf.decode(ids[mask]) == reply + END  # earlier assistant turns (pair 3) are not trained
            assert mask[np.flatnonzero(mask)[0]:np.flatnonzero(mask)[-1] + 1].all()
    cut = encode_pairs(tok, pairs, 20)  # pair 3's prompt alone is longer than 20 tokens: dropped as a pair
    assert cut.report["dropped"] >= 1 and cut.report["kept"] + cut.report["dropped"] == 4


# ---- the loss and its gradient against PyTorch ------------------------------------------------------------


def _torch_losses(torch, method, kind, c, r, c0, r0, nc, nr):
    """The published losses (as TRL 1.16 writes them), per pair."""
    F = torch.nn.functional
    if method == "orpo":
        a, b = c / nc, r / nr

        def log1mexp(x):
            return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

        log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
        return -a - LAMBDA * F.logsigmoid(log_odds)
    if kind == "sigmoid":
        return -F.logsigmoid(BETA * ((c - c0) - (r - r0)))
    return ((c - c0) / nc - (r - r0) / nr - 1 / (2 * BETA)) ** 2


@pytest.fixture(scope="module")
def oracle(tiny, tiny_path, tmp_path_factory):
    """The MLX model with random LoRA adapters, the encoded pairs, the reference, and the same in PyTorch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlx_persona.models import load_model
    from mlx_persona.tuner.adapters import attach_adapters
    from mlx_persona.tuner.config import DEFAULT_LORA_MODULES

    model, tok = load_model(tiny_path)
    mx.random.seed(3)
    attach_adapters(model, "lora", 4, 8.0, 0.0, DEFAULT_LORA_MODULES, -1)
    enc = encode_pairs(tok, load_pairs(_write(tmp_path_factory.mktemp("pairs") / "p.jsonl", PAIRS)), 1024)
    ref = reference_logps(model, enc, 3, 1024)  # lora_b is zero: the base model, in batches of 3 and 1
    rng = np.random.default_rng(0)
    lora = {k: rng.normal(0, 0.2 if k.endswith("lora_b") else 0.5, v.shape).astype(np.float32)
            for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights([(k, mx.array(v)) for k, v in lora.items()], strict=False)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.float32)
    base.config.use_cache = False
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0, bias="none",
                                           target_modules=DEFAULT_LORA_MODULES, task_type="CAUSAL_LM"))
    params = {}
    with torch.no_grad():
        for key, value in lora.items():
            path, name = key.rsplit(".", 1)
            module = peft.base_model.model.get_submodule(path)
            target = (module.lora_A if name == "lora_a" else module.lora_B)["default"].weight
            target.copy_(torch.from_numpy(value.T.copy()))
            params[key] = target
    peft.eval()
    return {"torch": torch, "model": model, "enc": enc, "ref": ref, "peft": peft, "params": params}


def _torch_logps(o, disable_adapters=False):
    """Summed reply log-probabilities from the full logits, and the reply token counts, per sequence."""
    torch, enc = o["torch"], o["enc"]
    seqs = [*zip(enc.chosen, enc.chosen_masks), *zip(enc.rejected, enc.rejected_masks)]
    n = max(len(t) for t, _ in seqs)
    ids = torch.zeros((len(seqs), n), dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    on = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, (t, m) in enumerate(seqs):
        ids[i, :len(t)], attn[i, :len(t)], on[i, :len(t)] = torch.from_numpy(t.astype(np.int64)), 1, \
            torch.from_numpy(m)
    if disable_adapters:
        with o["peft"].disable_adapter(), torch.no_grad():
            logits = o["peft"](input_ids=ids, attention_mask=attn).logits
    else:
        logits = o["peft"](input_ids=ids, attention_mask=attn).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = on[:, 1:].float()
    return (logp * mask).sum(-1), mask.sum(-1)


def test_reference_log_probs_equal_pytorch(oracle):
    sums, counts = _torch_logps(oracle, disable_adapters=True)
    b = len(oracle["enc"])
    want = np.stack([sums[:b].numpy(), sums[b:].numpy()], axis=1)
    np.testing.assert_allclose(oracle["ref"], want, rtol=1e-5, atol=1e-4)
    assert counts[:b].tolist() == [float(m.sum()) for m in oracle["enc"].chosen_masks]


@pytest.mark.parametrize("method, kind", LOSSES)
def test_loss_and_gradient_equal_pytorch(oracle, method, kind):
    torch, model, enc, ref = oracle["torch"], oracle["model"], oracle["enc"], oracle["ref"]
    loss = PreferenceLoss(method, beta=BETA, loss=kind, orpo_lambda=LAMBDA)
    b = PreferenceData(enc, ref).collate(list(range(len(enc))))
    args = [mx.array(x) for x in (b.inputs, b.targets, b.positions, b.weights)]
    denom = mx.array(float(len(enc)))
    (value, _, stats), grads = nn.value_and_grad(model, loss)(model, *args, denom,
                                                              *(mx.array(x) for x in b.extra), chunk=1024)
    grads = dict(tree_flatten(grads))

    for p in oracle["params"].values():
        p.grad = None
    sums, counts = _torch_logps(oracle)
    n = len(enc)
    c0, r0 = torch.from_numpy(ref[:, 0]), torch.from_numpy(ref[:, 1])
    per_pair = _torch_losses(torch, method, kind, sums[:n], sums[n:], c0, r0, counts[:n], counts[n:])
    want = per_pair.mean()
    want.backward()
    print(f"{method}/{kind}: loss mlx {value.item():.7f} torch {want.item():.7f}")
    assert value.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-4)
    worst = 0.0
    for key, p in oracle["params"].items():
        g_torch, g_mlx = p.grad.numpy().T, np.array(grads[key])
        scale = max(np.abs(g_torch).max(), 1e-8)
        worst = max(worst, np.abs(g_mlx - g_torch).max() / scale)
        np.testing.assert_allclose(g_mlx, g_torch, rtol=1e-4, atol=1e-4 * scale, err_msg=key)
    print(f"{method}/{kind}: gradients max |diff| / max |g| = {worst:.1e} over {len(grads)} tensors")
    assert any(np.abs(p.grad.numpy()).max() > 0 for p in oracle["params"].values())
    # The stats: rewards, margin, accuracy over the pairs.
    if method == "dpo":
        good, bad = BETA * (sums[:n].detach() - c0), BETA * (sums[n:].detach() - r0)
    else:
        good, bad = LAMBDA * sums[:n].detach() / counts[:n], LAMBDA * sums[n:].detach() / counts[n:]
    got = loss.report(dict(zip(loss.stat_names, stats.tolist())))
    assert got["reward_chosen"] == pytest.approx(good.mean().item(), abs=1e-4)
    assert got["reward_margin"] == pytest.approx((good - bad).mean().item(), abs=1e-4)
    assert got["reward_accuracy"] == pytest.approx((good > bad).float().mean().item())


@pytest.mark.parametrize("method, kind", LOSSES)
def test_losses_of_given_log_probs_equal_the_formulas(method, kind):
    """The formulas where every term counts: mean log-probabilities near 0 (where ORPO's log(1 - p) is large)
    and far from it, rewards of both signs; loss and gradient with respect to the log-probabilities."""
    torch = pytest.importorskip("torch")
    c = np.array([-0.02, -3.0, -40.0, -0.6], np.float64)
    r = np.array([-0.5, -1.0, -45.0, -0.7])
    nc, nr = np.array([1.0, 3.0, 20.0, 2.0]), np.array([2.0, 1.0, 30.0, 1.0])
    c0, r0 = np.array([-0.1, -2.0, -41.0, -0.6]), np.array([-0.4, -1.5, -44.0, -0.9])
    loss = PreferenceLoss(method, beta=BETA, loss=kind, orpo_lambda=LAMBDA)
    f32 = lambda x: mx.array(x.astype(np.float32))

    def total(logps):
        return loss.pair_losses(logps, f32(np.concatenate([nc, nr])), f32(c0), f32(r0))[0].sum()

    logps = f32(np.concatenate([c, r]))
    value, grad = mx.value_and_grad(total)(logps)
    t = torch.tensor(np.concatenate([c, r]), requires_grad=True)
    want = _torch_losses(torch, method, kind, t[:4], t[4:], *(torch.tensor(x) for x in (c0, r0, nc, nr))).sum()
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(grad), t.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_gradients_stay_finite_for_a_sure_reply_and_an_empty_pair(method, kind):
    """A chosen reply the model is sure of (mean log-prob -1e-9, where ORPO's log(1 - p) is steep) and a
    zero-weight stand-in pair (log-probs 0, as a rank with no pair of the batch gets): finite loss and
    gradients, and the stand-in adds nothing."""
    loss = PreferenceLoss(method, beta=BETA, loss=kind, orpo_lambda=LAMBDA)
    counts = mx.array([1.0, 0.0, 1.0, 0.0])  # chosen then rejected token counts: pair 2 is the stand-in
    refs = mx.array([-0.1, 0.0]), mx.array([-0.4, 0.0])

    def total(logps, weight):
        return (loss.pair_losses(logps, counts, *refs)[0] * weight).sum()

    logps = mx.array([-1e-9, 0.0, -0.7, 0.0])
    value, grad = mx.value_and_grad(total)(logps, mx.array([1.0, 0.0]))
    assert math.isfinite(value.item()) and bool(mx.all(mx.isfinite(grad)).item()), grad
    assert grad[1].item() == 0.0 and grad[3].item() == 0.0


# ---- runs: learning the preference, from an SFT run; exact resume; signals ---------------------------------


@pytest.fixture(scope="module")
def pairs_data(small_data, tmp_path_factory):
    from training_runs import pairs_folder

    return pairs_folder(small_data, tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def dpo_runs(tiny_path, small_data, pairs_data, tmp_path_factory):
    """An SFT run, a DPO run started from it (uninterrupted), and the same DPO run stopped by SIGTERM."""
    from training_runs import SIGTERM, SignalAtStep, config, reference_run

    import mlx_persona.tuner.run as run_mod
    from mlx_persona.tuner.run import run
    from mlx_persona.tuner.trainer import Interrupted

    root = tmp_path_factory.mktemp("dpo")
    sft = reference_run(tiny_path, small_data, root)
    dpo = {"method": "dpo", "preference.start_from": str(sft), "preference.beta": 0.5}
    ref = reference_run(tiny_path, pairs_data, root, **dpo)
    stopped = root / "stopped"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "Progress", SignalAtStep(SIGTERM, 3))
        with pytest.raises(Interrupted):
            run(config(tiny_path, pairs_data, stopped, **dpo), log=lambda *a: None)
    return {"sft": sft, "ref": ref, "stopped": stopped, "changes": dpo,
            "cfg": lambda out, **kw: config(tiny_path, pairs_data, out, **{**dpo, **kw})}





STEPS = 18  # six epochs of the three batches


def test_dpo_from_an_sft_run_learns_the_preference(dpo_runs, tiny_path, pairs_data, tmp_path):
    """Without dropout, six epochs: the first epoch starts at the reference (rewards 0, loss log 2), the last
    one ranks every pair right, by a margin, and the validation pairs (never trained on) moved too.

    At learning rate 5e-3 and three epochs this held on one CPU's rounding only: Adam turns 1e-7 differences
    in small gradients into whole steps, and with OpenBLAS's AVX-512 kernels, MLX_PERSONA_JIT=0 or another
    RoPE rounding the margins went negative. 2e-3 for six epochs passes with each of those."""
    from training_runs import metrics, reference_run

    sft = dpo_runs["sft"]
    ref = reference_run(tiny_path, pairs_data, tmp_path, **dpo_runs["changes"], steps=STEPS, log_every=1,
                        **{"lora.dropout": 0.0, "optim.learning_rate": 2e-3})
    rows = [r for r in metrics(ref) if "loss" in r]
    assert len(rows) == STEPS and all(k in rows[0] for k in ("reward_chosen", "reward_rejected", "reward_margin",
                                                         "reward_accuracy", "logp_chosen", "logp_rejected"))
    assert abs(rows[0]["reward_margin"]) < 1e-4 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    first, last = rows[:3], rows[-3:]  # an epoch each: every training pair once
    assert sum(r["reward_margin"] for r in last) / 3 > sum(r["reward_margin"] for r in first) / 3 + 0.3
    assert all(r["reward_accuracy"] == 1.0 for r in last)
    vals = [r["val_loss"] for r in metrics(ref) if "val_loss" in r]
    assert vals[-1] < math.log(2) - 0.05
    # The run trained the SFT run's own adapter on: same layout, same base, and it loads where SFT's does.
    sft_cfg, cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (sft, ref))
    shape = lambda c: {k: v for k, v in c["lora_parameters"].items() if k != "dropout"}
    assert shape(cfg) == shape(sft_cfg) and cfg["model"] == sft_cfg["model"] and cfg["num_layers"] == sft_cfg["num_layers"]
    assert cfg["lora_parameters"]["dropout"] == 0.0  # this run's
    start = mx.load(str(sft / "adapters.safetensors"))
    end = mx.load(str(ref / "adapters.safetensors"))
    assert sorted(start) == sorted(end) and any(not mx.array_equal(start[k], end[k]) for k in start)
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["fine_tune_type"] == "lora"


def test_dpo_resume_is_exact(dpo_runs, tmp_path):
    from training_runs import bitwise_equal, copy_run, metrics

    from mlx_persona.tuner.run import run

    resumed = copy_run(dpo_runs["stopped"], tmp_path / "resumed")
    lines = []
    run(dpo_runs["cfg"](resumed), resume=True, log=lines.append)
    assert any("resuming at step 4" in line for line in lines), lines
    assert bitwise_equal(dpo_runs["ref"] / "adapters.safetensors", resumed / "adapters.safetensors")
    keys = ("step", "loss", "grad_norm", "reward_margin", "reward_accuracy", "val_loss")
    assert [[r.get(k) for k in keys] for r in metrics(resumed)] == \
        [[r.get(k) for k in keys] for r in metrics(dpo_runs["ref"])]


def test_a_changed_reference_stops_a_resume(dpo_runs, tmp_path):
    """Another start run (so another reference) is a config change; the same folder with other weights is
    a change of the data's fingerprint, which covers the reference log-probabilities."""
    from training_runs import copy_run

    from mlx_persona.tuner.run import run
    from mlx_persona.tuner.trainer import TrainingError

    out = copy_run(dpo_runs["stopped"], tmp_path / "changed")
    start = copy_run(dpo_runs["sft"], tmp_path / "sft-copy")
    with pytest.raises(TrainingError, match="preference.start_from"):
        run(dpo_runs["cfg"](out, **{"preference.start_from": str(start)}), resume=True, log=lambda *a: None)
    weights = mx.load(str(dpo_runs["sft"] / "adapters.safetensors"))
    mx.save_safetensors(str(dpo_runs["sft"] / "adapters.safetensors"), {k: v * 1.5 for k, v in weights.items()})
    try:
        with pytest.raises(TrainingError, match="training data .* differ"):
            run(dpo_runs["cfg"](out), resume=True, log=lambda *a: None)
    finally:
        mx.save_safetensors(str(dpo_runs["sft"] / "adapters.safetensors"), weights)


@pytest.mark.parametrize("method", ["orpo", "dpo"])
def test_ctrl_c_stops_a_preference_run_at_the_next_step(method, dpo_runs, tiny_path, pairs_data, tmp_path,
                                                        monkeypatch):
    """ORPO from the base (--model), DPO from the SFT run (--from RUN_DIR), through the command line."""
    from training_runs import SIGINT, SignalAtStep, cli_args, metrics

    import mlx_persona.tuner.run as run_mod
    from mlx_persona.tuner import checkpoint as ckpt

    out = tmp_path / "run"
    monkeypatch.setattr(run_mod, "Progress", SignalAtStep(SIGINT, 2))
    start = ["--from", str(dpo_runs["sft"])] if method == "dpo" else []
    result = CliRunner().invoke(main, ["train", "--method", method, *start,
                                       *cli_args(tiny_path, pairs_data, out, save_every=100)])
    assert result.exit_code == 130, result.output
    assert "SIGINT at step 3: checkpoint saved" in result.output and "Traceback" not in result.output
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000003"]
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("reward_accuracy" in r for r in rows)
    if method == "orpo":
        assert all(r["nll"] > 0 and "log_odds" in r for r in rows)
    else:
        assert f"from {dpo_runs['sft']}" in result.output  # its adapter, continued
        import yaml

        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["preference"]["start_from"] == str(dpo_runs["sft"]) and saved["model"] == str(tiny_path)


def test_a_broken_start_run_is_one_clear_line(tiny_path, pairs_data, tmp_path):
    start = tmp_path / "start"
    start.mkdir()
    (start / "adapter_config.json").write_text("[]")
    result = CliRunner().invoke(main, ["train", "--method", "dpo", "--from", str(start), "--data", str(pairs_data),
                                       "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{start / 'adapter_config.json'}: expected a JSON object" in result.output


def test_sft_data_given_to_dpo_is_one_clear_line(tiny_path, small_data, tmp_path):
    result = CliRunner().invoke(main, ["train", "--method", "orpo", "--model", str(tiny_path), "--data",
                                       str(small_data), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_data / 'train.jsonl'}:1: not a preference pair: method orpo trains on")


def test_full_dpo_from_an_lora_run_fuses_its_adapter_first(dpo_runs, tiny_path, pairs_data, tmp_path):
    """`preference.adapter: full` from a LoRA run: the run's adapter fused into the weights, every weight trained,
    a whole model folder written; with the learning rate ~0 the result is the fused SFT model itself."""
    from training_runs import config

    from mlx_persona.models import load_model
    from mlx_persona.tuner.adapters import load_adapters
    from mlx_persona.tuner.run import run

    out = tmp_path / "full"
    cfg = config(tiny_path, pairs_data, out, **{**dpo_runs["changes"], "preference.adapter": "full", "steps": 1,
                                                "optim.learning_rate": 1e-30, "eval_every": 0})
    summary = run(cfg, log=lambda *a: None)
    assert summary["fine_tune_type"] == "full" and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    sft, _ = load_model(tiny_path)
    load_adapters(sft, dpo_runs["sft"])
    want = dict(tree_flatten(sft.parameters()))
    got = mx.load(str(out / "model.safetensors"))
    probe = "model.layers.0.self_attn.q_proj.weight"
    scale = json.loads((dpo_runs["sft"] / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    fused = want[probe.replace(".weight", ".linear.weight")] + scale * (
        want[probe.replace(".weight", ".lora_b")].T @ want[probe.replace(".weight", ".lora_a")].T)
    assert mx.allclose(got[probe], fused, atol=1e-6).item()
    assert not mx.allclose(got[probe], want[probe.replace(".weight", ".linear.weight")], atol=1e-6).item()
    # eval's model entry finds the base of a full preference run (summary.json: method dpo, fine_tune_type full)
    from mlx_persona.eval.entries import parse_model_arg

    assert parse_model_arg(f"dpo={out}").base == summary["model"] == str(tiny_path)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_dora_on_a_base_learns_the_preference(method, tiny_path, pairs_data, tmp_path):
    """`preference.adapter: dora` from a base model (no SFT run; DPO's reference is the base itself): a DoRA
    adapter is attached, trained and saved as DoRA, and the chosen replies pull ahead of the rejected ones."""
    from training_runs import metrics, reference_run

    out = reference_run(tiny_path, pairs_data, tmp_path, method=method, steps=9, log_every=1,
                        **{"preference.start_from": str(tiny_path), "preference.adapter": "dora",
                           "preference.beta": 0.5, "lora.dropout": 0.0, "optim.learning_rate": 5e-3})
    rows = [r for r in metrics(out) if "loss" in r]
    first, last = rows[:3], rows[-3:]
    # ORPO's rewards are beta-scaled mean log-probs, and its odds move slowly next to its NLL term (measured:
    # +0.012 over these 9 steps at this learning rate, where DPO's sums of margins gain +10.4)
    key, gain = ("reward_margin", 0.3) if method == "dpo" else ("log_odds", 0.005)
    assert sum(r[key] for r in last) > sum(r[key] for r in first) + gain, [r[key] for r in rows]
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["fine_tune_type"] == "dora"
    assert any(k.endswith(".m") for k in mx.load(str(out / "adapters.safetensors")))  # DoRA's magnitudes


def test_auto_from_a_model_trains_and_records_lora(tiny_path, pairs_data, tmp_path):
    """`adapter: auto` from a model (not an adapter run): new LoRA adapters, and summary.json says so."""
    from training_runs import reference_run

    out = reference_run(tiny_path, pairs_data, tmp_path, method="orpo", steps=1,
                        **{"preference.start_from": str(tiny_path), "preference.adapter": "auto"})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fine_tune_type"] == "lora" == json.loads((out / "adapter_config.json").read_text())["fine_tune_type"]
