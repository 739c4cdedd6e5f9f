"""The command line: entry points, doctor, init-model, data commands; user mistakes exit cleanly."""

import json
import subprocess
import sys

from click.testing import CliRunner

from mlx_persona.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_entry_points_are_the_same_group():
    for cmd in ([sys.executable, "-m", "mlx_persona", "--help"], [sys.executable, "-m", "mlx_persona.train", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "train" in subprocess.run([sys.executable, "-m", "mlx_persona", "--help"], capture_output=True,
                                     text=True).stdout
    assert "--resume" in proc.stdout  # python -m mlx_persona.train is `mlx-persona train`


def test_importing_the_cli_loads_no_mlx_nor_heavy_extras():
    """Every command imports lazily: `--help` stays instant, and `python -m mlx_persona` can set the backend
    up before mlx loads."""
    heavy = ["mlx", "mlx_lm", "numpy", "onnx", "torch", "transformers"]
    code = f"import sys, mlx_persona.cli; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_doctor_reports_backend_and_measured_gflops():
    result = run("doctor", "--size", "256")
    assert result.exit_code == 0
    out = result.output
    for key in ("device:", "dtype:", "blas:", "quantized:", "matmul:"):
        assert key in out
    gflops = float(out.split("matmul:")[1].split("GFLOP/s")[0])
    assert gflops > 0
    assert "float32" in out.split("dtype:")[1].splitlines()[0]  # CPU backend: fp32


def test_blas_is_optimized_on_linux():
    from mlx_persona import backend as plat

    if sys.platform == "linux":
        path, reason = plat.blas_status()
        assert path is not None and "openblas" in path.lower(), reason


def test_openblas_gets_the_cpus_kernels():
    # OpenBLAS 0.3.21 falls back to its SSE3 "Prescott" kernels on CPUs it does not know (8x slower here).
    from mlx_persona import backend as plat

    assert plat.openblas_coretype({"avx2", "fma", "sse3"}) == "Haswell"
    assert plat.openblas_coretype({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                                   "avx512cd"}) == "SkylakeX"
    assert plat.openblas_coretype({"sse3"}) is None
    info = plat.describe()
    if sys.platform == "linux" and plat.openblas_coretype(plat.cpu_flags()) and info["blas_core"]:
        assert info["blas_core"].lower() not in ("prescott", "core2", "nehalem", "katmai"), info


def test_init_model_writes_a_folder_transformers_and_mlx_lm_load(tmp_path):
    out = tmp_path / "m"
    assert run("init-model", str(out), "--preset", "tiny").exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<start_of_turn>" in tok_cfg["chat_template"]
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Both load every weight and compute the same model: equal token ids and equal logits.
    model, tok = load(str(out))
    hf, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    text = tok.apply_chat_template([{"role": "user", "content": "Hi Bluey! Shall we play keepy uppy?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == ids and len(ids) > 10
    ours = np.array(model(mx.array([ids]))[0])
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    print(f"init-model: mlx-lm vs transformers max logit diff {np.abs(ours - theirs).max():.2e} "
          f"(largest |logit| {np.abs(theirs).max():.2f})")
    assert np.abs(theirs).max() > 0.1  # random weights, not zeros
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # measured 6.3e-7
    again = run("init-model", str(out), "--preset", "tiny")
    assert again.exit_code == 1 and "already exists" in again.output


def test_data_validate_and_stats(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Hi!", "completion": "Hooray, let's play!"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    ok = run("data", "validate", str(good))
    assert ok.exit_code == 0 and "1 examples" in ok.output
    fail = run("data", "validate", str(bad))
    assert fail.exit_code == 1 and f"{bad}:1:" in fail.output
    stats = run("data", "stats", "data/bluey", "--json")
    assert stats.exit_code == 0
    s = json.loads(stats.output)
    assert s["examples"] == 170 and s["reply_words"]["min"] >= 10


def test_unknown_model_is_a_clean_error(tmp_path):
    result = run("train", "--model", "no/such-model-here", "--data", "data/bluey", "-o", str(tmp_path / "o"),
                 "--steps", "1", "--no-progress")
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
