"""Shared fixtures: a per-session model cache, the built-in tiny model, and small data folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests never reach the hub; set before huggingface_hub reads its constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx_persona.backend

mlx_persona.backend.setup()  # the Linux CPU speed layer, once, before anything imports mlx.core

REPO = Path(__file__).resolve().parents[1]
BLUEY = REPO / "data" / "bluey"
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skips the calling test unless `condition` holds; under ``CI=true`` fails it instead, so that a CI
    machine missing a tool (Chromium, transformers.js) cannot pass by skipping what needs it."""
    if not condition:
        if CI:
            pytest.fail(f"CI=true, and this test cannot run here: {reason}", pytrace=False)
        pytest.skip(reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(condition, reason): run only if condition holds; skipped locally, "
                                       "failed under CI=true (see need)")


def _unmet_needs(item) -> list[str]:
    return [m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else "")
            for m in item.iter_markers("needs") if not (m.args[0] if m.args else m.kwargs["condition"])]


def pytest_collection_modifyitems(config, items):
    if not CI:  # skipped by a mark, so that the report names the test's line, not this file's
        for item in items:
            for reason in _unmet_needs(item):
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    for reason in _unmet_needs(item):
        need(False, reason)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Built-in models are built once per session in a private cache (never the user's)."""
    cache = os.environ.get("MLX_PERSONA_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("MLX_PERSONA_CACHE")
    os.environ["MLX_PERSONA_CACHE"] = cache
    yield Path(cache)
    if old is None:
        os.environ.pop("MLX_PERSONA_CACHE", None)
    else:
        os.environ["MLX_PERSONA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_path(_model_cache) -> Path:
    from mlx_persona.models import resolve_model

    return resolve_model("builtin:tiny")


def _subset(dst: Path, n_train: int, n_valid: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("valid.jsonl", n_valid)):
        lines = [l for l in (BLUEY / name).read_text().splitlines() if l.strip()][:n]
        (dst / name).write_text("\n".join(lines) + "\n")
    return dst


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """12 training and 4 validation conversations from the shipped data."""
    return _subset(tmp_path_factory.mktemp("data"), 12, 4)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="data.jsonl"):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    return write


@pytest.fixture(params=["mlx", "cpu"])
def draw_path(request, monkeypatch):
    """The sampler's two ways to draw: MLX ops, or the CPU kernel (mlx_persona.backend.draw) where it runs."""
    from mlx_persona.backend import draw

    if request.param == "mlx":
        monkeypatch.setenv(draw.ENV, "0")
    elif not draw.available():
        pytest.skip("the CPU draw kernel is not loaded here")
    return request.param
