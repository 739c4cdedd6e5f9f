"""Paths and run folders behave the same everywhere: absolute paths in a run's config.yaml, relative paths
that say what they were resolved against, run folders accepted by every command that loads a model, resume
of a finished run, and no empty folder from a run that failed before its first step."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from training_runs import (
    RUN,
    SIGTERM,
    SignalAtStep,
    bitwise_equal,
    cli_args,
    config,
    copy_run,
    reference_run,
)

from mlx_persona.cli import main
from mlx_persona.export.web import node_modules
from mlx_persona.tuner import run as run_mod
from mlx_persona.tuner.config import load_config
from mlx_persona.tuner.trainer import Interrupted

quiet = {"log": lambda *a: None}


def cli(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora_run(tiny_path, small_data, tmp_path_factory):
    return reference_run(tiny_path, small_data, tmp_path_factory.mktemp("paths"))  # the shared LoRA run


@pytest.fixture(scope="module")
def full_run(tiny_path, small_data, tmp_path_factory):
    return reference_run(tiny_path, small_data, tmp_path_factory.mktemp("paths-full"), method="full", steps=2)


def test_a_stopped_runs_resume_command_works_from_any_folder(tiny_path, small_data, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    shutil.copytree(small_data, here / "data")
    (here / "tiny").symlink_to(tiny_path)
    monkeypatch.chdir(here)
    cfg = load_config(None, {**RUN, "model": "tiny", "data": "data", "output": "runs/r", "steps": 4})
    with monkeypatch.context() as m:
        m.setattr(run_mod, "Progress", SignalAtStep(SIGTERM, 1))
        with pytest.raises(Interrupted) as info:
            run_mod.run(cfg, **quiet)
    out = here / "runs" / "r"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["model"], saved["data"], saved["output"]) == (str(here / "tiny"), str(here / "data"), str(out))
    command = str(info.value).splitlines()[-1].strip()
    assert command == f"mlx-persona train --config {out / 'config.yaml'} --resume"

    monkeypatch.chdir(elsewhere)
    result = cli(*shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # Its peak memory is the largest of both parts' (the resumed process saw only its own).
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["peak_memory_gb"] >= max(r.get("peak_memory_gb", 0) for r in rows) > 0
    assert json.loads((out / "adapter_config.json").read_text())["model"] == str(here / "tiny")
    assert list(elsewhere.iterdir()) == []


def test_the_shipped_data_name_is_saved_as_the_shipped_folder(tmp_path, monkeypatch):
    from mlx_persona.paths import DEFAULT_DATA
    from mlx_persona.tuner.config import absolute_paths

    monkeypatch.chdir(tmp_path)  # no data/bluey here: the name means the shipped data
    cfg = absolute_paths(load_config(None, {"data": "data/bluey", "output": "runs/q"}))
    assert (cfg.data, cfg.output, cfg.model) == (str(DEFAULT_DATA), str(tmp_path / "runs" / "q"), "builtin:tiny")
    (tmp_path / "data" / "bluey").mkdir(parents=True)  # a folder of the user's wins, as any relative path
    assert absolute_paths(load_config(None, {"data": "data/bluey"})).data == str(tmp_path / "data" / "bluey")


def test_a_relative_path_not_found_says_what_it_was_resolved_against(small_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cwd = Path.cwd()
    result = cli("train", "--data", "data/mine", "-o", "runs/x", "--steps", 1)
    assert result.exit_code == 1
    assert result.output == f"error: --data: data/mine (resolved against {cwd}): no such file or folder\n"
    result = cli("train", "-c", "nope.yaml")
    assert result.output == f"error: nope.yaml (resolved against {cwd}): no such config file\n"
    result = cli("train", "-m", "./models/mine", "--data", small_data, "-o", "runs/x")
    assert result.output.startswith(f"error: -m: ./models/mine (resolved against {cwd}): no such folder")
    result = cli("generate", "--adapter", "runs/none", "-p", "hi")
    assert result.output == f"error: runs/none (resolved against {cwd}): no such adapter folder\n"
    assert list(tmp_path.iterdir()) == []  # and nothing was created


def test_data_validate_takes_a_folder_as_stats_and_train_do(small_data, tmp_path):
    result = cli("data", "validate", small_data)
    assert result.exit_code == 0 and result.output == f"{small_data}: ok, 12 training + 4 validation examples\n"
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(small_data / "train.jsonl", bad)
    (bad / "valid.jsonl").write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n')
    result = cli("data", "validate", bad)
    assert result.exit_code == 1 and f"{bad / 'valid.jsonl'}:1:" in result.output
    result = cli("data", "validate", tmp_path / "bad" / "..")
    assert result.exit_code == 1 and "no train.jsonl in this folder" in result.output


def _reply(*args) -> list[int]:
    result = cli("generate", "-p", "Hi Bluey!", "--preset", "greedy", "--max-tokens", 8, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tokens"]


def test_generate_takes_a_run_folder_wherever_eval_does(tiny_path, lora_run, full_run):
    lora = _reply("--model", tiny_path, "--adapter", lora_run)
    assert _reply("--model", lora_run) == lora  # a LoRA run alone: its recorded base + itself
    assert _reply("--adapter-path", lora_run) == lora  # --model defaults to the base it records
    full = _reply("-m", full_run)
    assert _reply("--adapter", full_run) == full  # a full fine-tune is the model itself
    assert _reply("--model", tiny_path, "--adapter", full_run) == full
    assert _reply("--model", tiny_path) not in (lora, full)  # the runs' weights are what answered


def test_fuse_and_export_take_a_run_folder(tiny_path, lora_run, full_run, tmp_path):
    result = cli("fuse", "--adapter", full_run, "-o", tmp_path / "full")
    assert result.exit_code == 0, result.output  # was: "adapter_config.json names no base model"
    assert bitwise_equal(tmp_path / "full" / "model.safetensors", full_run / "model.safetensors")
    assert cli("fuse", "-m", lora_run, "-o", tmp_path / "a").exit_code == 0
    assert cli("fuse", "--adapter", lora_run, "--output", tmp_path / "b").exit_code == 0
    assert bitwise_equal(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert not bitwise_equal(tmp_path / "a" / "model.safetensors", tmp_path / "full" / "model.safetensors")
    stray = tmp_path / "stray"
    stray.mkdir()
    result = cli("fuse", "--adapter", stray, "-o", tmp_path / "c")
    assert result.exit_code == 1 and "not an output folder of `mlx-persona train`" in result.output

    result = cli("export", "onnx", lora_run, "-o", tmp_path / "onnx", "--dtype", "q4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "onnx" / "model_q4.onnx").is_file()
    assert json.loads((tmp_path / "onnx" / "mlx_persona.json").read_text())["fused"]["adapter"] == str(lora_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "full", "onnx", "stray"]  # no fuse left over


@pytest.mark.needs((node_modules() / "@huggingface" / "transformers" / "dist").is_dir(),
                   reason="transformers.js not installed: run `npm ci` in mlx_persona/export/web")
def test_web_takes_a_run_folder_and_exports_it_first(lora_run, tmp_path):
    result = cli("web", lora_run, "--no-serve")
    assert result.exit_code == 1 and "pass -o DIR to export it" in result.output
    result = cli("web", lora_run, "-o", tmp_path / "web", "--dtype", "q4", "--no-serve")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "web" / "index.html").is_file() and (tmp_path / "web" / "onnx" / "model_q4.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web"]


def test_the_python_api_takes_a_preset_name_a_seed_and_a_run_folder(tiny_path, lora_run):
    import mlx_persona
    from mlx_persona.sampling import preset

    model = str(tiny_path)
    a = mlx_persona.generate(model, "Hi Bluey!", "persona", seed=3, max_new_tokens=8)
    b = mlx_persona.generate(model, "Hi Bluey!", dataclasses.replace(preset("persona"), seed=3, max_new_tokens=8))
    assert a.tokens == b.tokens and len(a.tokens) == 8
    assert mlx_persona.generate(model, "Hi Bluey!", "persona", seed=4, max_new_tokens=8).tokens != a.tokens
    with pytest.raises(ValueError, match="unknown generation preset 'nope'"):
        mlx_persona.generate(model, "Hi", "nope")
    with pytest.raises(ValueError, match="unknown generation setting.*'temp'"):
        mlx_persona.generate(model, "Hi", "persona", temp=0.5)
    run_alone = mlx_persona.generate(str(lora_run), "Hi Bluey!", "greedy", max_new_tokens=8)
    assert run_alone.tokens == mlx_persona.generate(model, "Hi Bluey!", "greedy", max_new_tokens=8,
                                                    adapter=str(lora_run)).tokens


def test_resuming_a_finished_run_leaves_its_results_as_they_were(tiny_path, small_data, lora_run, tmp_path):
    out = copy_run(lora_run, tmp_path / "run")
    before = files(out)
    summary = run_mod.run(config(tiny_path, small_data, out), resume=True, **quiet)
    assert files(out) == before
    assert summary == json.loads(before["summary.json"]) and summary["peak_memory_gb"] > 0
    # mlx_lm.lora's --resume-adapter-file names the run by a file in it.
    result = cli("train", *cli_args(tiny_path, small_data, out), "--resume-adapter-file", out / "adapters.safetensors")
    assert result.exit_code == 0 and "the run is finished" in result.output
    assert files(out) == before


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tiny_path, small_data, lora_run, tmp_path):
    args = ["-m", tiny_path, "--data", small_data, "--batch-size", 50, "--no-progress"]
    result = cli("train", *args, "-o", tmp_path / "new")
    assert result.exit_code == 1
    assert result.output.endswith("error: --batch-size: 50 is larger than the 12 training examples\n")
    assert list(tmp_path.iterdir()) == []  # no folder, no lock file
    # --overwrite of a finished run that then fails: the earlier run is still whole.
    old = copy_run(lora_run, tmp_path / "old")
    before = files(old)
    assert cli("train", *args, "-o", old, "--overwrite").exit_code == 1
    assert files(old) == before
    # A folder that was there and empty (someone made it) stays.
    mine = tmp_path / "mine"
    mine.mkdir()
    assert cli("train", *args, "-o", mine).exit_code == 1
    assert mine.is_dir() and list(mine.iterdir()) == []
