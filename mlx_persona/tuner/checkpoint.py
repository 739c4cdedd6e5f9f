"""Crash-safe checkpoints with exact resume state.

A checkpoint is a folder ``OUT/checkpoints/step-NNNNNNNN/`` with
- ``weights.safetensors``: the trainable parameters (adapters, or every weight for full fine-tuning);
- ``optimizer.safetensors``: the optimizer state (moments, step count, hence the schedule position);
- ``state.json``: step, epoch, position in the epoch's batch order, RNG key, best validation loss,
  early-stopping counter and the resolved config;
- ``manifest.json``: written last, with every file's size and SHA-256 and the step.

It is written to a temporary folder, every file fsynced, then renamed into place in one atomic
``rename``; a crash at any moment leaves either the previous set of checkpoints or the new one, and a
half-written temporary folder that the next save removes. Loading verifies the manifest and skips a
truncated or corrupted checkpoint for the previous good one. Old checkpoints are renamed aside before
they are deleted, so a crash while pruning never leaves a half-deleted one behind.

Test-only hooks: ``MLX_PERSONA_TEST_PAUSE_IN_SAVE=SECONDS`` sleeps that long after each file of a
checkpoint is written (before the rename), and ``MLX_PERSONA_TEST_HOLD=save:N:FILE`` holds the process
there (:mod:`mlx_persona.testing`), so that tests can kill a process inside a save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_persona import safe_io, testing

PREFIX = "step-"
FILES = ("weights.safetensors", "optimizer.safetensors", "state.json")
MAX_JSON_BYTES = 1 << 20  # state.json holds the loop position and the config: a few kB
# state.json's "loop": what tuner.trainer.new_loop_state holds, each key with its check.
LOOP_KEYS = ("step", "epoch", "batch", "best_val", "best_step", "bad_evals", "stop_reason", "tokens",
             "loss_tokens", "train_time")


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


def _test_pause() -> None:
    """Test-only: widen the window in which a save can be interrupted (see the module docstring)."""
    seconds = os.environ.get("MLX_PERSONA_TEST_PAUSE_IN_SAVE")
    if seconds:
        time.sleep(float(seconds))


def write_json_atomic(path: Path, data) -> None:
    """Writes JSON to a temporary name, fsyncs, renames."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Writes text to a temporary name next to `path`, fsyncs, renames over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with safe_io.writing(path, tmp):  # a full disk: one line naming `path`, and no temporary file left
        tmp.write_text(text)
        _fsync_file(tmp)
        os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced


def move_files_into(src: Path, dst: Path) -> None:
    """Renames every file of folder `src` into `dst` (each one atomically, after an fsync); removes `src`."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        _fsync_file(p)
        os.replace(p, dst / p.name)
    src.rmdir()
    _fsync_dir(dst)


def rng_state() -> list[int]:
    """MLX's global PRNG key as two integers (JSON-friendly)."""
    return [int(x) for x in np.array(mx.random.state[0])]


def set_rng_state(key: list[int]) -> None:
    """Restores MLX's global PRNG key saved by :func:`rng_state`.

    ``mx.random.seed(s)`` sets the key to ``[s >> 32, s & 0xffffffff]``, so any key can be restored
    through it (``mx.random.state`` itself cannot be assigned to).
    """
    hi, lo = (int(x) for x in key)
    mx.random.seed((hi << 32) | lo)


def save_checkpoint(root: str | Path, step: int, weights: dict, optimizer_state: dict, state: dict) -> Path:
    """Writes one checkpoint atomically (see :func:`_save_checkpoint`).

    Raises:
        safe_io.WriteError: it could not be written (a full disk): one line naming the checkpoint; its
            temporary folder is removed, so a failed save holds no space.
    """
    root = Path(root)
    with safe_io.writing(root / f"{PREFIX}{step:08d}", root / f".tmp-{PREFIX}{step:08d}"):
        return _save_checkpoint(root, step, weights, optimizer_state, state)


def _save_checkpoint(root: Path, step: int, weights: dict, optimizer_state: dict, state: dict) -> Path:
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
    _test_pause()
    testing.hold(f"save:{step}:weights.safetensors")
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
    _test_pause()
    testing.hold(f"save:{step}:optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    testing.hold(f"save:{step}:state.json")
    files = {}
    for name in FILES:
        p = tmp / name
        _fsync_file(p)
        files[name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync_file(tmp / "manifest.json")
    _fsync_dir(tmp)
    _test_pause()
    testing.hold(f"save:{step}:manifest.json")
    if final.exists():  # re-saving a step (e.g. over a damaged checkpoint after a resume): replace it
        old = root / f".del-{PREFIX}{step:08d}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    testing.hold(f"save:{step}:renamed")
    return final


def verify(path: Path) -> str | None:
    """Returns None if the checkpoint at `path` is complete and intact, else what is wrong."""
    manifest = path / "manifest.json"
    if not manifest.exists():
        return "no manifest (incomplete)"
    try:
        info = json.loads(safe_io.read_text(manifest, MAX_JSON_BYTES))
        files = info["files"]
        sizes = {name: int(files[name]["size"]) for name in FILES}
        sums = {name: str(files[name]["sha256"]) for name in FILES}
        step = int(info["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest unreadable"
    if step != _step_of(path):
        return f"manifest is for step {step}, not {_step_of(path)}"
    for name in FILES:
        p = path / name
        if not p.exists():
            return f"{name} missing"
        if p.stat().st_size != sizes[name]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {sizes[name]} (truncated?)"
        if _sha256(p) != sums[name]:
            return f"{name} checksum mismatch (corrupted)"
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def check_state(state, step: int, total_steps: int, batches_per_epoch: int | None) -> str | None:
    """What is wrong with a checkpoint's ``state.json`` for this run, or None when it can be resumed from.

    Args:
        state: the parsed ``state.json``.
        step: the checkpoint's step (its folder's name, which its manifest repeats).
        total_steps: this run's optimizer steps.
        batches_per_epoch: the global batches of one epoch of this run's data; None when the data
            differ from the checkpoint's (a ``--force`` resume), so that no position can be checked.
    """
    if not isinstance(state, dict):
        return "state.json: expected a mapping"
    loop, rng = state.get("loop"), state.get("rng")
    if not (isinstance(rng, list) and len(rng) == 2 and all(_is_int(x) and 0 <= x < 2**32 for x in rng)):
        return f"state.json: rng is {safe_io.shorten(rng)}, expected two integers in [0, 2**32)"
    if not isinstance(state.get("data"), str):
        return f"state.json: data is {safe_io.shorten(state.get('data'))}, expected the data's fingerprint"
    if not isinstance(loop, dict):
        return f"state.json: loop is {safe_io.shorten(loop)}, expected a mapping"
    if sorted(loop) != sorted(LOOP_KEYS):
        missing, extra = sorted(set(LOOP_KEYS) - set(loop)), sorted(map(str, set(loop) - set(LOOP_KEYS)))
        return f"state.json: loop has missing keys {missing} and unknown keys {safe_io.shorten(extra)}"
    n = batches_per_epoch if batches_per_epoch is not None else 2**63
    L = loop
    checks = [  # (key, check, what it must be), in order: a later check may assume an earlier one
        ("step", lambda: _is_int(L["step"]) and L["step"] == step, f"the checkpoint's step, {step}"),
        ("step", lambda: L["step"] <= total_steps, f"at most this run's {total_steps} steps"),
        ("epoch", lambda: _is_int(L["epoch"]) and 0 <= L["epoch"] < 2**31, "an integer >= 0"),
        ("batch", lambda: _is_int(L["batch"]) and 0 <= L["batch"] < n, f"an integer in [0, {n}) (an epoch's batches)"),
        ("best_step", lambda: L["best_step"] is None or (_is_int(L["best_step"]) and 0 < L["best_step"] <= step),
         f"null or an integer in [1, {step}]"),
        ("best_val", lambda: (L["best_val"] is None) == (L["best_step"] is None) and
         (L["best_val"] is None or _is_number(L["best_val"])), "a finite number (null when best_step is)"),
        ("bad_evals", lambda: _is_int(L["bad_evals"]) and 0 <= L["bad_evals"] <= step, f"an integer in [0, {step}]"),
        ("stop_reason", lambda: isinstance(L["stop_reason"], str) and len(L["stop_reason"]) <= 200, "a short text"),
        ("tokens", lambda: _is_int(L["tokens"]) and L["tokens"] >= 0, "an integer >= 0"),
        ("loss_tokens", lambda: _is_int(L["loss_tokens"]) and 0 <= L["loss_tokens"] <= L["tokens"],
         "an integer in [0, tokens]"),
        ("train_time", lambda: _is_number(L["train_time"]) and L["train_time"] >= 0, "a finite number >= 0"),
    ]
    for key, ok, expected in checks:
        if not ok():
            return f"state.json: loop.{key} is {safe_io.shorten(L[key])}, expected {expected}"
    return None


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def load_latest(root: str | Path, log=print, check=None) -> tuple[Path, dict, dict, dict] | None:
    """Loads the newest intact checkpoint, reporting and skipping damaged ones.

    A checkpoint is damaged when its files do not match its manifest, cannot be read, hold NaN or inf,
    or when ``check(step, state)`` (e.g. :func:`check_state` for this run) says what is wrong with its
    state: one that passes its checksums but is impossible was damaged before the checksums (by a bug,
    an edit, or tampering), and an older checkpoint, written independently, may still be good.

    Returns:
        ``(path, weights, optimizer_state, state)`` or None when there is no checkpoint at all.

    Raises:
        CheckpointError: there are checkpoints, but every one is damaged.
    """
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            try:
                weights = mx.load(str(path / "weights.safetensors"))
                opt_flat = mx.load(str(path / "optimizer.safetensors"))
                state = json.loads(safe_io.read_text(path / "state.json", MAX_JSON_BYTES))
                bad = safe_io.first_nonfinite(weights) or safe_io.first_nonfinite(opt_flat)
                problem = f"{bad} holds NaN or inf" if bad else check and check(_step_of(path), state)
                if not problem:
                    return path, weights, tree_unflatten(list(opt_flat.items())), state
            except (ValueError, RuntimeError, OSError) as e:  # intact bytes MLX cannot read
                problem = f"unreadable ({safe_io.clip(' '.join(str(e).split()), 200)})"
        log(f"warning: checkpoint {path} is unusable: {problem}; trying an older one")
        damaged.append(path)
    if damaged:
        raise CheckpointError(f"{root}: every checkpoint is damaged ({len(damaged)} found); "
                              "start again with --overwrite")
    return None


def prune(root: str | Path, keep_last: int, keep_steps: set[int]) -> None:
    """Deletes all but the newest `keep_last` checkpoints and those in `keep_steps` (e.g. the best).

    Each one is first renamed aside (atomically) so that no half-deleted checkpoint is ever listed.
    """
    root = Path(root)
    for p in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f".del-{PREFIX}*")]:
        shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(root)
    for p in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if _step_of(p) not in keep_steps:
            aside = root / f".del-{p.name}"
            os.replace(p, aside)
            shutil.rmtree(aside, ignore_errors=True)


def mismatch(weights: dict, optimizer_state: dict, weights_like: dict, optimizer_like: dict) -> str | None:
    """What keeps a loaded checkpoint from fitting this model and optimizer, or None if it fits.

    Args:
        weights, optimizer_state: as returned by :func:`load_latest`.
        weights_like: the model's trainable parameters, flat.
        optimizer_like: the freshly initialised optimizer state tree.
    """
    pairs = (("weights", weights, weights_like),
             ("optimizer state", dict(tree_flatten(optimizer_state)), dict(tree_flatten(optimizer_like))))
    for what, got, want in pairs:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if missing or extra:
            return (f"its {what} do not match this model ({len(missing)} missing, e.g. {missing[:2]}; "
                    f"{len(extra)} unexpected, e.g. {extra[:2]})")
        for k in sorted(want):
            if got[k].shape != want[k].shape or got[k].dtype != want[k].dtype:
                return (f"its {what} {k} is {got[k].dtype} {tuple(got[k].shape)}, "
                        f"this run has {want[k].dtype} {tuple(want[k].shape)}")
    return None


def broadcast(found, weights_like: dict, optimizer_like: dict):
    """Rank 0's :func:`load_latest` result, on every rank of a data-parallel run.

    Only rank 0 reads the output folder (on several machines the others may not have it). The rest
    receive it through ``all_sum`` with (negative) zeros, which is exact. `weights_like` (flat) and
    `optimizer_like` (a tree) give the names and shapes, which every rank knows from its own model
    and optimizer; rank 0 has checked that the checkpoint matches them.

    Returns:
        ``(path, weights, optimizer_state, state)`` or None, as rank 0 found it.
    """
    rank = mx.distributed.init().rank()

    def share(x):
        # The others add -0.0: x + (-0.0) == x for every x, including -0.0 (which + 0.0 would turn into 0.0).
        zero = mx.full(x.shape, -0.0, x.dtype) if mx.issubdtype(x.dtype, mx.floating) else mx.zeros_like(x)
        return mx.distributed.all_sum(x if rank == 0 else zero)

    if not mx.distributed.all_sum(mx.array(int(rank == 0 and found is not None))).item():
        return None
    blob = json.dumps([str(found[0]), found[3]]).encode() if rank == 0 else b""
    n = int(mx.distributed.all_sum(mx.array(len(blob))).item())
    data = share(mx.array(np.frombuffer(blob, np.uint8)) if rank == 0 else mx.zeros((n,), mx.uint8))
    path, state = json.loads(bytes(np.array(data)).decode())
    src_w = found[1] if rank == 0 else weights_like
    src_o = dict(tree_flatten(found[2])) if rank == 0 else dict(tree_flatten(optimizer_like))
    weights = {k: share(src_w[k]) for k in sorted(weights_like)}
    opt = {k: share(src_o[k]) for k in sorted(dict(tree_flatten(optimizer_like)))}
    mx.eval(weights, opt)
    return Path(path), weights, tree_unflatten(list(opt.items())), state
