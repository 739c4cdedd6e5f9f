"""The PyTorch comparison benchmarks run end to end on the tiny model (1-2 steps), so they do not rot.

Numbers are not checked (they mean nothing at this size); the work being the same is: both frameworks
start from the same loss on the same batches, and every output file is written.
"""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_mlx_vs_torch_smoke(tmp_path):
    from benchmarks import bench_mlx_vs_torch as bench

    result = bench.main(["--preset", "tiny", "--examples", "4", "--epochs", "2", "--torch-dtype", "float32",
                         "--prompts", "1", "--new-tokens", "4", "--quick", "--no-results",
                         "--out", str(tmp_path), "--charts", str(tmp_path)])
    train = result["train"]["results"]
    with_bf16 = bench.mlx_matmul_modes(bench.argparse.Namespace(mlx_matmul="auto", mlx_dtype="auto")) == ["fp32", "bf16"]
    assert set(train) == {"mlx_persona", "torch_float32"} | ({"mlx_persona_bf16mm"} if with_bf16 else set())
    # Same model, batches and initial adapters: the same first loss, and after one update still close.
    assert abs(train["torch_float32"]["first_loss"] - train["mlx_persona"]["first_loss"]) < 1e-4
    assert abs(train["torch_float32"]["final_loss"] - train["mlx_persona"]["final_loss"]) < 1e-3
    if with_bf16:  # bf16 matmul inputs: the same work, a little less exact
        assert train["mlx_persona_bf16mm"]["dtype"] == "float32" + bench.BF16_MM
        assert abs(train["mlx_persona_bf16mm"]["first_loss"] - train["mlx_persona"]["first_loss"]) < 2e-2
    for r in train.values():
        assert r["tokens_per_sec"] > 0 and r["mfu"] > 0 and r["max_rss_gb"] > 0
    gen = result["generate"]["results"]
    assert set(gen) == {"mlx_persona", "torch_float32"} | ({"mlx_persona_bf16mm"} if with_bf16 else set())
    assert all(r["decode_tokens_per_sec"] > 0 and r["decode_bandwidth_gbs"] > 0 for r in gen.values())
    saved = json.loads((tmp_path / "bench_mlx_vs_torch_tiny.json").read_text())
    assert saved["command"].startswith("python benchmarks/bench_mlx_vs_torch.py")
    assert (tmp_path / "mlx_vs_torch_train_tiny.png").stat().st_size > 0
    assert (tmp_path / "mlx_vs_torch_generate_tiny.png").stat().st_size > 0
    assert "| mlx_persona fp32 |" in (tmp_path / "bench_mlx_vs_torch_tiny.md").read_text()


def test_recipe_smoke(tmp_path):
    from benchmarks import bench_recipe as bench

    result = bench.main(["--skip-extrapolate", "--max-steps", "2", "--eval-every", "1", "--quick", "--no-results",
                         "--out", str(tmp_path), "--charts", str(tmp_path)])
    tiny = result["tiny"]
    for name in ("original", "mlx_persona"):
        assert tiny[name]["steps"] == 2
        assert [e["step"] for e in tiny[name]["evals"]] == [0, 1, 2]
    # The step-0 validation loss of the two recipes is the same metric on the same weights.
    assert abs(tiny["original"]["evals"][0]["val_loss"] - tiny["mlx_persona"]["evals"][0]["val_loss"]) < 1e-3
    assert (tmp_path / "recipe.png").stat().st_size > 0
    assert (tmp_path / "bench_recipe.json").exists()


def test_batched_generation_bench_smoke(tmp_path):
    from benchmarks import bench_generate as bench

    bench.main(["--preset", "tiny", "--batch-sizes", "1,2", "--new-tokens", "4", "--trials", "1", "--eval-e2e",
                "--eval-prompts", "2", "--eval-seeds", "1", "--eval-max-new-tokens", "4", "--no-results",
                "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_generate_batch_tiny.json").read_text())
    from mlx_persona.backend import draw

    names = {"single (generate)", "batch 1", "batch 2"}
    if draw.available():  # and each again with the sampler as MLX ops
        names |= {f"{n}, MLX-op draw" for n in names}
    assert set(saved["tokens_per_sec"]) == names
    assert all(rate > 0 for rate in saved["tokens_per_sec"].values())
    assert next(iter(saved["eval_seconds"])) == "batch 1" and len(saved["eval_seconds"]) == 2
    assert saved["load_average"] and "| batch 2 |" in (tmp_path / "bench_generate_batch_tiny.md").read_text()


def test_ttft_breakdown_bench_smoke(tmp_path):
    from benchmarks import bench_generate as bench

    bench.main(["--preset", "tiny", "--ttft-breakdown", "--ttft-prompts", "2", "--trials", "1", "--no-torch",
                "--no-results", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_generate_ttft_tiny.json").read_text())["milliseconds"]["mlx"]
    for name in ("short", "long"):
        parts = saved[name]
        assert parts["_tokens"] > (200 if name == "long" else 5)
        assert all(ms > 0 for key, ms in parts.items() if not key.startswith(("_", "  norms")))
    md = (tmp_path / "bench_generate_ttft_tiny.md").read_text()
    assert "| LM head, last position |" in md and "vs its loop before" in md
