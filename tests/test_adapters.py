"""Known answers for the adapted layers that `tuning.attach_adapters` puts into the model.

With lora_a / lora_b (and DoRA's magnitude) set to fixed values, a layer's output must equal the
published formula written out independently in numpy (float64), and the same layer built by peft on
torch with the same weights. mlx-lm's layout: ``LoRALinear`` stores ``lora_a`` [in, r] and ``lora_b``
[r, out] and computes ``linear(x) + scale * (x @ lora_a) @ lora_b``; peft's ``lora_A.weight`` is
[r, in] and ``lora_B.weight`` [out, r] (so A = lora_a.T, B = lora_b.T), with ``scaling = alpha / r``.
DoRA (Liu et al. 2024): ``y = m * (W + s B A) x / ||W + s B A||``, the norm of each output row (over
the input dimension), as both mlx-lm (``axis=1`` of the [out, in] weight) and peft (``dim=1``) take it.

Tolerance: max |difference| <= RTOL * max |reference|. Measured (AMD EPYC, OpenBLAS, fp32, with and
without MLX_PERSONA_SGEMM=0): one layer at most 3.1e-7 of max |reference| against numpy float64 and
3.9e-7 against peft, so RTOL = 1e-5 is 25x that; the whole tiny model (4 blocks) 1.5e-6 against the
merged base, bound 3e-5 (20x). A scale of alpha instead of alpha / rank (4x here) misses by far more.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_persona.models import load_model
from mlx_persona.tuner.adapters import attach_adapters

RANK, ALPHA = 4, 12.0  # scale alpha / rank = 3, so scale = alpha (12) or 1 would be caught
SCALE = ALPHA / RANK
RTOL = 1e-5  # one layer
RTOL_MODEL = 3e-5  # the whole model


def _close(got, want, what, rtol=RTOL):
    err = np.abs(np.asarray(got, np.float64) - want).max()
    bound = rtol * np.abs(want).max()
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g} (max |reference| {np.abs(want).max():.3g})"


def _adapted(tiny_path, method):
    model, _ = load_model(tiny_path)
    config = attach_adapters(model, method, RANK, ALPHA, dropout=0.0, modules=["q_proj", "down_proj"])
    return model, config


def _layer(model, name, block=1):
    layer = model.layers[block]
    return layer.self_attn.q_proj if name == "q_proj" else layer.mlp.down_proj


def _set_known(layer, seed, method):
    """Fixed lora_a [in, r], lora_b [r, out] (and DoRA magnitude m [out]); returns them as numpy."""
    out_dims, in_dims = layer.linear.weight.shape
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.3, (in_dims, RANK)).astype(np.float32)
    b = rng.normal(0, 0.3, (RANK, out_dims)).astype(np.float32)
    layer.lora_a, layer.lora_b = mx.array(a), mx.array(b)
    m = None
    if method == "dora":
        m = rng.uniform(0.5, 2.0, (out_dims,)).astype(np.float32)
        layer.m = mx.array(m)
    x = rng.normal(0, 1, (2, 3, in_dims)).astype(np.float32)
    return a, b, m, x


def _reference(w, a, b, m, x, scale):
    """The published formulas in float64: LoRA W x + s B A x; DoRA m * (W + s B A) x / ||W + s B A||_row."""
    w, a, b, x = (v.astype(np.float64) for v in (w, a, b, x))
    if m is None:
        return x @ w.T + scale * (x @ a) @ b
    adapted = w + scale * (a @ b).T  # [out, in]
    return (x @ adapted.T) * (m / np.linalg.norm(adapted, axis=1))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attach_adapters_uses_alpha_over_rank(tiny_path, method):
    """The scale in every adapted layer and in adapter_config.json is alpha / rank, as in peft."""
    model, config = _adapted(tiny_path, method)
    assert config["lora_parameters"]["scale"] == SCALE and config["lora_parameters"]["rank"] == RANK
    kind = "DoRALinear" if method == "dora" else "LoRALinear"
    layers = [m for _, m in model.named_modules() if type(m).__name__ == kind]
    assert len(layers) == 2 * len(model.layers)
    assert {l.scale for l in layers} == {SCALE}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("name", ["q_proj", "down_proj"])
def test_layer_output_equals_the_published_formula(tiny_path, method, name):
    """An adapted layer of the tiny model (square q_proj, 192 -> 64 down_proj) with known A, B (and m)
    computes W x + (alpha / rank) B A x, or DoRA's normalised version of it."""
    model, _ = _adapted(tiny_path, method)
    layer = _layer(model, name)
    assert type(layer).__name__ == ("DoRALinear" if method == "dora" else "LoRALinear")
    a, b, m, x = _set_known(layer, seed=1, method=method)
    w = np.array(layer.linear.weight)
    _close(layer(mx.array(x)), _reference(w, a, b, m, x, SCALE), f"{method} {name} vs formula")


def _peft_layer(w, a, b, m):
    """peft's LoRA/DoRA layer around a torch Linear with weight `w`, with A, B (and m) copied over."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)

    module = Tiny()
    module.proj.weight.data = torch.tensor(w)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, use_dora=m is not None)
    module = inject_adapter_in_model(config, module)
    layer = module.proj
    assert layer.scaling["default"] == SCALE
    layer.lora_A["default"].weight.data = torch.tensor(a.T.copy())  # [r, in]
    layer.lora_B["default"].weight.data = torch.tensor(b.T.copy())  # [out, r]
    if m is not None:
        layer.lora_magnitude_vector["default"].weight.data = torch.tensor(m)
    return layer


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("name", ["q_proj", "down_proj"])
def test_layer_output_equals_peft(tiny_path, method, name):
    """The same layer equals peft's LoraLayer (use_dora=False/True) with the same weights, in float32."""
    import torch

    model, _ = _adapted(tiny_path, method)
    layer = _layer(model, name)
    a, b, m, x = _set_known(layer, seed=2, method=method)
    w = np.array(layer.linear.weight)
    peft_layer = _peft_layer(w, a, b, m)
    with torch.no_grad():
        want = peft_layer(torch.tensor(x)).numpy().astype(np.float64)
    _close(layer(mx.array(x)), want, f"{method} {name} vs peft")


def test_adapted_model_equals_the_base_with_merged_weights(tiny_path):
    """Whole model: every adapted layer set to known A, B gives the logits of the base model whose weights
    are W + (alpha / rank) (A B)^T, so attach_adapters adapts the layers it claims and nothing else."""
    model, _ = _adapted(tiny_path, "lora")
    merged, tok = load_model(tiny_path)
    names = dict(tree_flatten(merged.parameters()))
    updates = []
    for i in range(len(model.layers)):
        for name in ("q_proj", "down_proj"):
            layer = _layer(model, name, block=i)
            a, b, _, _ = _set_known(layer, seed=10 + i, method="lora")
            key = f"model.layers.{i}." + ("self_attn.q_proj" if name == "q_proj" else "mlp.down_proj") + ".weight"
            w = np.array(names[key], np.float64)
            updates.append((key, mx.array((w + SCALE * (a.astype(np.float64) @ b).T).astype(np.float32))))
    merged.load_weights(updates, strict=False)
    x = mx.array([tok.encode("Hooray! Let's play keepy uppy with Bingo in the backyard.")])
    _close(model(x), np.array(merged(x), np.float64), "adapted model vs merged base", RTOL_MODEL)
