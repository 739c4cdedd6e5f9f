"""Crash-safe checkpoints with exact resume state.

A checkpoint is a folder ``OUT/checkpoints/step-NNNNNNNN/`` with
- ``weights.safetensors``: the trainable parameters (adapters, or every weight for full fine-tuning);
- ``optimizer.safetensors``: the optimizer state (moments, step count);
- ``state.json``: step, epoch, position in the epoch's batch order, RNG state, best validation loss,
  early-stopping counter and the resolved config;
- ``manifest.json``: written last, with every file's size and SHA-256 and the step.

It is written to a temporary folder, every file fsynced, then renamed into place in one atomic
``rename``; a crash at any moment leaves either the previous set of checkpoints or the new one, and a
half-written temporary folder that the next save removes. Loading verifies the manifest and skips a
truncated or corrupted checkpoint for the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

PREFIX = "step-"


class CheckpointError(Exception):
    """No usable checkpoint, or one that does not match the run."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data) -> None:
    """Writes JSON to a temporary name, fsyncs, renames."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    _fsync_file(tmp)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, weights: dict, optimizer_state: dict, state: dict) -> Path:
    """Writes one checkpoint atomically.

    Args:
        root: the checkpoints folder (``OUT/checkpoints``).
        step: the optimizer step it captures.
        weights: flat dict name → array of trainable parameters.
        optimizer_state: the optimizer's (nested) state tree.
        state: JSON-serialisable loop state.

    Returns:
        The checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "weights.safetensors"), weights)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    files = {}
    for name in ("weights.safetensors", "optimizer.safetensors", "state.json"):
        p = tmp / name
        _fsync_file(p)
        files[name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        old = root / f".old-{PREFIX}{step:08d}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def verify(path: Path) -> str | None:
    """Returns None if the checkpoint at `path` is complete and intact, else what is wrong."""
    manifest = path / "manifest.json"
    if not manifest.exists():
        return "no manifest (incomplete)"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (ValueError, KeyError):
        return "manifest unreadable"
    for name, meta in files.items():
        p = path / name
        if not p.exists():
            return f"{name} missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {meta['size']} (truncated?)"
        if _sha256(p) != meta["sha256"]:
            return f"{name} checksum mismatch (corrupted)"
    return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_latest(root: str | Path, log=print) -> tuple[Path, dict, dict, dict] | None:
    """Loads the newest intact checkpoint, reporting and skipping damaged ones.

    Returns:
        ``(path, weights, optimizer_state, state)`` or None when there is no checkpoint at all.
    """
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem:
            log(f"warning: checkpoint {path} is unusable: {problem}; trying an older one")
            damaged.append(path)
            continue
        weights = mx.load(str(path / "weights.safetensors"))
        opt = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        state = json.loads((path / "state.json").read_text())
        return path, weights, opt, state
    if damaged:
        raise CheckpointError(f"{root}: every checkpoint is damaged ({len(damaged)} found)")
    return None


def prune(root: str | Path, keep_last: int, keep_steps: set[int]) -> None:
    """Deletes all but the newest `keep_last` checkpoints and those in `keep_steps` (e.g. the best)."""
    root = Path(root)
    for p in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for p in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if int(p.name[len(PREFIX):]) not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)
