"""Known answers for checkpoint.py's edges, written to kill the mutants that the other tests let live
(`make mutate TARGETS=checkpoint`): leftovers of a killed save, every kind of damaged manifest, files that
grew, intact bytes that cannot be read, what `list_checkpoints` and `prune` take and leave, the exact
`mismatch` messages, the PRNG key round trip, and `broadcast` over one and two processes."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.common import free_ports
from mlx_persona.tuner import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def _save(root, step, value=1.0):
    return ckpt.save_checkpoint(root, step, {"w": mx.array([value, 2.0])}, {"m": {"a": mx.array([3.0])}},
                                {"loop": {"step": step}, "rng": [0, step]})


def _names(root):
    return sorted(p.name for p in Path(root).iterdir())


def test_save_replaces_a_leftover_temporary_folder(tmp_path):
    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step-00000004"
    tmp.mkdir(parents=True)
    (tmp / "junk").write_text("from a killed save")
    path = _save(root, 4)
    assert path == root / "step-00000004" and _names(root) == ["step-00000004"]
    assert _names(path) == ["manifest.json", "optimizer.safetensors", "state.json", "weights.safetensors"]
    assert ckpt.verify(path) is None
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 4 and sorted(manifest["files"]) == sorted(ckpt.FILES)
    for name in ckpt.FILES:
        assert manifest["files"][name]["size"] == (path / name).stat().st_size


def test_move_files_into_a_new_or_an_existing_folder(tmp_path):
    src = tmp_path / "tmp"
    src.mkdir()
    (src / "a.txt").write_text("new a")
    (src / "b.txt").write_text("b")
    dst = tmp_path / "out" / "best"  # neither exists yet
    ckpt.move_files_into(src, dst)
    assert not src.exists() and _names(dst) == ["a.txt", "b.txt"] and (dst / "a.txt").read_text() == "new a"
    src.mkdir()
    (src / "a.txt").write_text("newer a")
    ckpt.move_files_into(src, dst)  # an existing folder: files replaced one by one, others kept
    assert not src.exists() and _names(dst) == ["a.txt", "b.txt"] and (dst / "a.txt").read_text() == "newer a"


def test_fsync_dir_skips_folders_that_cannot_be_opened(tmp_path, monkeypatch):
    """Where a folder cannot be opened for fsync (Windows), the save goes on without it."""
    def refuse(*a, **k):
        raise PermissionError(13, "a folder")

    monkeypatch.setattr(os, "open", refuse)
    assert ckpt._fsync_dir(tmp_path) is None


def test_save_creates_the_missing_folders(tmp_path):
    root = tmp_path / "run" / "out" / "checkpoints"
    assert ckpt.verify(_save(root, 1)) is None and _names(root) == ["step-00000001"]


@pytest.mark.parametrize("text, problem", [
    (b"{}", "manifest unreadable"),  # KeyError
    (b'{"files": null, "step": 3}', "manifest unreadable"),  # TypeError
    (b"[1, 2]", "manifest unreadable"),  # TypeError (a list)
    (b'{"files": {}, "step": 3}', "manifest unreadable"),  # KeyError (a file not listed)
    (b"\xff\xfe not utf-8", "manifest unreadable"),  # UnicodeDecodeError
    (b"{not json", "manifest unreadable"),  # ValueError
])
def test_every_kind_of_broken_manifest_is_reported_not_raised(tmp_path, text, problem):
    path = _save(tmp_path, 3)
    (path / "manifest.json").write_bytes(text)
    assert ckpt.verify(path) == problem


def test_verify_names_the_wrong_step_a_missing_file_and_sizes_either_way(tmp_path):
    path = _save(tmp_path / "a", 3)
    moved = tmp_path / "a" / "step-00000012"
    shutil.copytree(path, moved)
    assert ckpt.verify(moved) == "manifest is for step 3, not 12"
    size = (path / "state.json").stat().st_size
    with open(path / "state.json", "ab") as f:
        f.write(b"  ")  # grew
    assert ckpt.verify(path) == f"state.json has {size + 2} bytes, manifest says {size} (truncated?)"
    (path / "state.json").unlink()
    assert ckpt.verify(path) == "state.json missing"
    path = _save(tmp_path / "b", 3)
    w = path / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1])  # one byte short
    size = w.stat().st_size
    assert ckpt.verify(path) == f"weights.safetensors has {size} bytes, manifest says {size + 1} (truncated?)"


def test_sha256_reads_the_whole_file(tmp_path):
    import hashlib

    p = tmp_path / "big"
    data = bytes(range(256)) * 9000  # 2.3 MB: more than two 1 MiB blocks
    p.write_bytes(data)
    assert ckpt._sha256(p) == hashlib.sha256(data).hexdigest()
    p.write_bytes(b"")
    assert ckpt._sha256(p) == hashlib.sha256(b"").hexdigest()


def _rewrite_manifest(path):
    """Makes the manifest vouch for whatever bytes the files have now (intact but unreadable)."""
    files = {n: {"size": (path / n).stat().st_size, "sha256": ckpt._sha256(path / n)} for n in ckpt.FILES}
    (path / "manifest.json").write_text(json.dumps({"step": ckpt._step_of(path), "files": files}))


@pytest.mark.parametrize("damage", ["weights", "optimizer", "state", "oserror"])
def test_intact_but_unreadable_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch, damage):
    root = tmp_path / "checkpoints"
    _save(root, 1, value=5.0)
    newest = _save(root, 2, value=7.0)
    if damage == "weights":  # MLX raises RuntimeError
        (newest / "weights.safetensors").write_bytes(b"garbage")
    elif damage == "optimizer":
        (newest / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    elif damage == "state":  # ValueError from json
        (newest / "state.json").write_text("{oops")
    else:  # an I/O error while reading
        real = mx.load

        def load(p, *a, **k):
            if "step-00000002" in str(p):
                raise OSError(5, "Input/output error")
            return real(p, *a, **k)

        monkeypatch.setattr(mx, "load", load)
    _rewrite_manifest(newest)
    assert ckpt.verify(newest) is None
    lines = []
    path, weights, opt, state = ckpt.load_latest(root, log=lines.append)
    assert path.name == "step-00000001" and state == {"loop": {"step": 1}, "rng": [0, 1]}
    assert weights["w"].tolist() == [5.0, 2.0] and opt["m"]["a"].tolist() == [3.0]
    assert len(lines) == 1 and "step-00000002 is unusable: unreadable (" in lines[0]


def test_load_latest_without_checkpoints_or_folder(tmp_path):
    assert ckpt.load_latest(tmp_path / "none") is None
    (tmp_path / "empty").mkdir()
    assert ckpt.load_latest(tmp_path / "empty") is None
    lines = []
    root = tmp_path / "bad"
    (_save(root, 5) / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"every checkpoint is damaged \(1 found\)"):
        ckpt.load_latest(root, log=lines.append)
    assert lines == [(f"warning: checkpoint {root / 'step-00000005'} is unusable: no manifest (incomplete); "
                      "trying an older one")]


def test_list_checkpoints_takes_only_step_folders_in_numeric_order(tmp_path):
    assert ckpt.list_checkpoints(tmp_path / "missing") == []
    for name in ("step-00000010", "step-99999999", "step-100000000", ".tmp-step-00000011",
                 ".del-step-00000003", "step-abc", "other", "step-"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-00000012").write_text("a file, not a folder")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000010", "step-99999999", "step-100000000"]


@pytest.mark.parametrize("keep_last, keep, left", [
    (0, set(), []),
    (0, {2}, [2]),
    (1, set(), [4]),
    (1, {1, 3}, [1, 3, 4]),
    (3, set(), [2, 3, 4]),
    (9, set(), [1, 2, 3, 4]),
])
def test_prune_keeps_exactly_the_last_n_and_the_listed_steps(tmp_path, keep_last, keep, left):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    (tmp_path / ".tmp-step-00000005").mkdir()  # leftovers of a killed save and a killed prune
    (tmp_path / ".del-step-00000002").mkdir()
    (tmp_path / ".del-step-00000002" / "weights.safetensors").write_text("x")
    ckpt.prune(tmp_path, keep_last, keep)
    assert _names(tmp_path) == [f"step-{s:08d}" for s in left]


def test_resave_survives_an_old_copy_that_cannot_be_deleted(tmp_path, monkeypatch):
    """Re-saving a step renames the old copy aside and deletes it; if the deletion fails (a busy file on a
    network share, say), the save still succeeds and the next prune retries."""
    root = tmp_path / "checkpoints"
    _save(root, 3, value=1.0)

    def rmdir(path, *a, **k):
        raise PermissionError(13, "busy", str(path))

    monkeypatch.setattr(os, "rmdir", rmdir)  # the old copy's folder stays behind
    path = _save(root, 3, value=9.0)
    _save(root, 4)
    ckpt.prune(root, 1, set())  # step 3 is pruned, but neither it nor the leftover can go: no error either
    assert _names(root) == [".del-step-00000003", "step-00000004"]
    monkeypatch.undo()
    ckpt.prune(root, 5, set())
    assert _names(root) == ["step-00000004"]
    path = _save(root, 3, value=9.0)
    assert mx.load(str(path / "weights.safetensors"))["w"].tolist() == [9.0, 2.0] and ckpt.verify(path) is None


def test_json_files_are_indented_by_two_with_a_final_newline(tmp_path):
    ckpt.write_json_atomic(tmp_path / "s.json", {"a": [1], "b": "c"})
    assert (tmp_path / "s.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": "c"\n}\n'
    assert not list(tmp_path.glob(".*.tmp"))
    path = _save(tmp_path / "ck", 6)
    manifest = (path / "manifest.json").read_text()
    assert manifest == json.dumps(json.loads(manifest), indent=2) + "\n" and manifest.startswith('{\n  "step": 6,')
    state = (path / "state.json").read_text()
    assert state == json.dumps({"loop": {"step": 6}, "rng": [0, 6]}, indent=2) + "\n"


def test_mismatch_messages(tmp_path):
    a, b, c = mx.zeros((2, 3)), mx.zeros((3, 2)), mx.zeros((2, 3), mx.bfloat16)
    opt = {"m": {"x": mx.zeros((2,))}}
    assert ckpt.mismatch({"x": a}, opt, {"x": a}, opt) is None
    assert ckpt.mismatch({"x": a, "y": a}, opt, {"x": a, "y": b}, opt) == \
        "its weights y is mlx.core.float32 (2, 3), this run has mlx.core.float32 (3, 2)"
    assert ckpt.mismatch({"x": a}, opt, {"x": c}, opt) == \
        "its weights x is mlx.core.float32 (2, 3), this run has mlx.core.bfloat16 (2, 3)"
    assert ckpt.mismatch({"q": a}, opt, {"a": a, "b": a, "c": a}, opt) == \
        "its weights do not match this model (3 missing, e.g. ['a', 'b']; 1 unexpected, e.g. ['q'])"
    assert ckpt.mismatch({"x": a, "r": a, "p": a, "q": a}, opt, {"x": a}, opt) == \
        "its weights do not match this model (0 missing, e.g. []; 3 unexpected, e.g. ['p', 'q'])"
    assert ckpt.mismatch({"x": a}, {"m": {"x": mx.zeros((3,))}}, {"x": a}, opt) == \
        "its optimizer state m.x is mlx.core.float32 (3,), this run has mlx.core.float32 (2,)"
    assert ckpt.mismatch({"x": a}, {"m": {"x": a, "z": a}}, {"x": a}, {"m": {"x": a}}) == \
        "its optimizer state do not match this model (0 missing, e.g. []; 1 unexpected, e.g. ['m.z'])"


def test_rng_key_round_trip():
    mx.random.seed((123 << 32) | 456)
    assert ckpt.rng_state() == [123, 456]
    ckpt.set_rng_state([7, 2**32 - 1])
    assert ckpt.rng_state() == [7, 2**32 - 1]
    a = mx.random.uniform(shape=(4,)).tolist()
    ckpt.set_rng_state([7, 2**32 - 1])
    assert mx.random.uniform(shape=(4,)).tolist() == a


def test_test_pause_sleeps_only_when_asked(monkeypatch):
    slept = []
    monkeypatch.setattr(ckpt.time, "sleep", slept.append)
    monkeypatch.delenv("MLX_PERSONA_TEST_PAUSE_IN_SAVE", raising=False)
    ckpt._test_pause()
    monkeypatch.setenv("MLX_PERSONA_TEST_PAUSE_IN_SAVE", "0.25")
    ckpt._test_pause()
    assert slept == [0.25]


def _found(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 2, {"a": mx.array([-0.0, 1.5]), "b": mx.array([[3, 4]], mx.int32)},
                         {"m": {"a": mx.array([-2.5, -0.0])}, "step": mx.array(2, mx.uint64)},
                         {"loop": {"step": 2}, "rng": [1, 2], "name": "héllo"})
    return ckpt.load_latest(root)


def test_broadcast_in_one_process_returns_the_checkpoint(tmp_path):
    assert ckpt.broadcast(None, {"a": mx.zeros((2,))}, {"m": {"a": mx.zeros((2,))}}) is None
    found = _found(tmp_path)
    like_w = {"a": mx.zeros((2,)), "b": mx.zeros((1, 2), mx.int32)}
    like_o = {"m": {"a": mx.zeros((2,))}, "step": mx.array(0, mx.uint64)}
    path, weights, opt, state = ckpt.broadcast(found, like_w, like_o)
    assert path == found[0] and state == found[3]
    assert np.array(weights["a"]).tobytes() == np.array([-0.0, 1.5], np.float32).tobytes()
    assert weights["b"].tolist() == [[3, 4]] and weights["b"].dtype == mx.int32
    assert np.array(opt["m"]["a"]).tobytes() == np.array([-2.5, -0.0], np.float32).tobytes()
    assert opt["step"].item() == 2 and opt["step"].dtype == mx.uint64


TWO_RANKS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlx.core as mx, numpy as np
    from mlx_persona.tuner import checkpoint as ckpt
    root = Path(sys.argv[1])
    rank = mx.distributed.init().rank()
    like_w = {"a": mx.zeros((2,)), "b": mx.zeros((1, 2), mx.int32)}
    like_o = {"m": {"a": mx.zeros((2,))}, "step": mx.array(0, mx.uint64)}
    none = ckpt.broadcast(None, like_w, like_o)
    found = ckpt.load_latest(root) if rank == 0 else None
    path, w, o, state = ckpt.broadcast(found, like_w, like_o)
    out = {"none": none is None, "path": str(path), "state": state,
           "a": np.array(w["a"]).tobytes().hex(), "b": w["b"].tolist(), "bdtype": str(w["b"].dtype),
           "ma": np.array(o["m"]["a"]).tobytes().hex(), "step": o["step"].item(), "sdtype": str(o["step"].dtype)}
    (root.parent / f"rank{rank}.json").write_text(json.dumps(out))
""")


def test_broadcast_over_two_processes_is_exact(tmp_path):
    """Rank 1 receives rank 0's checkpoint bit for bit (-0.0 included), its path and state, and None as None."""
    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        pytest.skip("mlx.launch not installed")
    found = _found(tmp_path)
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(free_ports(2)),
                           "--", sys.executable, str(script), str(tmp_path / "checkpoints")],
                          check=False, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = {"none": True, "path": str(found[0]), "state": found[3],
            "a": np.array([-0.0, 1.5], np.float32).tobytes().hex(), "b": [[3, 4]], "bdtype": "mlx.core.int32",
            "ma": np.array([-2.5, -0.0], np.float32).tobytes().hex(), "step": 2, "sdtype": "mlx.core.uint64"}
    assert got[0] == want and got[1] == want
