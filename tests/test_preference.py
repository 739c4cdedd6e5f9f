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
    path.write_text("\n".join([json.dumps(PAIRS[0]), "{not json", json.dumps(PAIRS[0]), b"\xff".decode("latin-1")]))
    result = CliRunner().invoke(main, ["data", "validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"{path}:2: bad JSON") and lines[1] == f"{path}:3: duplicate of line 1"
    assert lines[2].startswith(f"{path}:4: ")


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
    f32 = lambda x: mx.array(x.astype(np.float32))  # noqa: E731

    def total(logps):
        return loss.pair_losses(logps, f32(np.concatenate([nc, nr])), f32(c0), f32(r0))[0].sum()

    logps = f32(np.concatenate([c, r]))
    value, grad = mx.value_and_grad(total)(logps)
    t = torch.tensor(np.concatenate([c, r]), requires_grad=True)
    want = _torch_losses(torch, method, kind, t[:4], t[4:], *(torch.tensor(x) for x in (c0, r0, nc, nr))).sum()
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(np.array(grad), t.grad.numpy(), rtol=1e-4, atol=1e-6)
