"""Safe by default: no pickle anywhere, trust_remote_code never enabled, no HF token in logs or files,
ONNX external data that cannot point outside its folder."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from training_runs import REPO, cli_args, reference_run

from mlx_persona.cli import main

TOKEN = "hf_TESTtokenNeverWrittenAnywhere0123456789"
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz", ".joblib"}


def _check_no_pickle(folder: Path) -> int:
    """Every file is safetensors, JSON, YAML, text or PNG; none is (or holds) a pickle. Returns the count."""
    from safetensors import safe_open

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        head = p.read_bytes()[:8]
        assert p.suffix not in PICKLE_SUFFIXES, p
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"{p} is a pickle"
        assert not head.startswith(b"PK\x03\x04"), f"{p} is a zip (torch.save format)"
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="numpy") as f:  # parses the header; no code runs
                assert list(f.keys())
        elif p.suffix == ".json" or p.name.endswith(".jsonl"):
            text = p.read_text()
            [json.loads(line) for line in text.splitlines()] if p.name.endswith(".jsonl") else json.loads(text)
        elif p.suffix == ".yaml":
            yaml.safe_load(p.read_text())
        elif p.suffix == ".png":
            assert head.startswith(b"\x89PNG")
        else:
            raise AssertionError(f"unexpected file type: {p}")
    return len(files)


def test_training_outputs_hold_no_pickle(tiny_path, small_data, tmp_path_factory):
    out = reference_run(tiny_path, small_data, tmp_path_factory.mktemp("safety"))
    assert _check_no_pickle(out) >= 15  # results, best/, checkpoints (weights, optimizer state, state, manifest)


def test_source_never_unpickles_or_trusts_remote_code():
    """No code path of the package (or its benchmarks) can load a pickle or enable remote code."""
    patterns = [r"\bimport\s+(c?pickle|dill|joblib|cloudpickle)\b", r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True",
                r"torch\.load\((?![^)]*weights_only\s*=\s*True)", r"trust_remote_code\s*[=:]\s*True",
                r"[\"']trust_remote_code[\"']\s*:\s*True"]
    offenders = []
    for path in [*(REPO / "mlx_persona").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        text = path.read_text()
        offenders += [f"{path.relative_to(REPO)}: {p}" for p in patterns if re.search(p, text)]
    assert offenders == []


def test_loading_a_model_passes_trust_remote_code_false(tiny_path, monkeypatch):
    import transformers

    from mlx_persona.models import load_model

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs.get("trust_remote_code")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(tiny_path)
    assert calls and all(trust is not True for _, trust in calls), calls
    assert any(name == "AutoTokenizer" and trust is False for name, trust in calls), calls


def test_hf_token_never_reaches_logs_configs_or_outputs(tiny_path, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    out = tmp_path / "run"
    logs = []
    result = CliRunner().invoke(main, ["train", *cli_args(tiny_path, small_data, out, steps=2, eval_every=1,
                                                          save_every=1)])
    assert result.exit_code == 0, result.output
    logs.append(result.output)
    # A hub model that cannot be fetched (offline): the error names the model, never the token.
    result = CliRunner().invoke(main, ["train", "--model", "someone/private-model", "--data", str(small_data),
                                       "-o", str(tmp_path / "hub"), "--steps", "1", "--no-progress"])
    assert result.exit_code == 1 and "someone/private-model" in result.output, result.output
    logs.append(result.output)
    for text in logs:
        assert TOKEN not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "adapter_config.json" for p in files)
    for p in files:
        assert TOKEN.encode() not in p.read_bytes(), p


def test_onnx_external_data_stays_inside_its_folder(tiny_path, tmp_path):
    onnx = pytest.importorskip("onnx")
    try:
        from mlx_persona.export.onnx import export_onnx
    except ImportError as e:  # pragma: no cover - the exporter is optional
        pytest.skip(f"mlx_persona.export.onnx.export_onnx is not available: {e}")
    from onnx.external_data_helper import uses_external_data

    from mlx_persona.export.hf import fuse

    hf = fuse(str(tiny_path), None, tmp_path / "hf")
    out = export_onnx(hf, tmp_path / "web", ("q4",))
    folder = (Path(out) / "onnx").resolve()
    graphs = list(folder.glob("*.onnx"))
    assert graphs
    seen = 0
    for graph in graphs:
        model = onnx.load(str(graph), load_external_data=False)
        for t in model.graph.initializer:
            if uses_external_data(t):
                loc = {e.key: e.value for e in t.external_data}["location"]
                target = (graph.parent / loc).resolve()
                assert not os.path.isabs(loc) and "/" not in loc and "\\" not in loc and ".." not in loc, loc
                assert target.parent == folder and target.is_file() and not (graph.parent / loc).is_symlink(), loc
                seen += 1
    assert seen > 0  # q4 writes its weights as external data
    assert not [p for p in Path(out).rglob("*") if p.is_symlink()]
