"""The checkpoint writer's durability protocol, observed call by call.

A crash-safe save must, in this order: write every file into the temporary folder, fsync each one,
write the manifest last (it vouches for the others, so nothing may change after it), fsync the
temporary folder (its entries), rename it into place, and fsync the checkpoints folder (the rename).
Otherwise a power cut can leave a checkpoint whose manifest verifies but whose data never reached
the disk, or lose the rename. These tests wrap the real ``os.fsync``, ``os.replace`` / ``os.rename``,
``open`` and ``mx.save_safetensors`` (recording each call with its path; an fd is resolved through
``/proc/self/fd``) around `checkpoint.save_checkpoint` with small real arrays, and check the order.
A second variant watches the system calls themselves under ``strace`` (skipped without it).
"""

import builtins
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_persona.tuner import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
WRITE_MODES = set("wax+")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(seed: int):
    mx.random.seed(seed)
    weights = {"layers.0.lora_a": mx.random.normal((16, 4)), "layers.0.lora_b": mx.random.normal((4, 8))}
    opt = {"step": mx.array(3, mx.uint64), "learning_rate": mx.array(1e-3),
           "layers": [{"lora_a": {"m": mx.zeros((16, 4)), "v": mx.ones((16, 4))}}]}
    state = {"loop": {"step": 3, "epoch": 0, "batch": 3, "seed": seed}, "rng": [0, seed]}
    return weights, opt, state


class Spy:
    """Records (call, path, detail) for fsync, replace/rename, opens for writing and safetensors writes."""

    def __init__(self, monkeypatch, tmp: Path):
        self.events = []
        self.manifest_snapshot = None  # {name: sha256} of the other files when the manifest is opened
        self.tmp = tmp
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
        real_open, real_os_open, real_save = builtins.open, os.open, mx.save_safetensors

        def fsync(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.events.append(("fsync", path, os.fstat(fd).st_size))
            return real_fsync(fd)

        def replace(src, dst, *a, **k):
            self.events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
            return real_replace(src, dst, *a, **k)

        def rename(src, dst, *a, **k):
            self.events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
            return real_rename(src, dst, *a, **k)

        def opened(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and WRITE_MODES & set(mode):
                path = Path(file).resolve()
                if path.name == "manifest.json" and path.parent == self.tmp:
                    self.manifest_snapshot = {p.name: _sha(p) for p in path.parent.iterdir()
                                              if p.name != "manifest.json"}
                self.events.append(("open-w", str(path), mode))
            return real_open(file, mode, *a, **k)

        def os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                self.events.append(("open-w", str(Path(path).resolve()), flags))
            return real_os_open(path, flags, *a, **k)

        def save_safetensors(file, *a, **k):
            self.events.append(("open-w", str(Path(file).resolve()), "safetensors"))
            return real_save(file, *a, **k)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", opened)
        monkeypatch.setattr(io, "open", opened)  # pathlib's write_text goes through io.open
        monkeypatch.setattr(mx, "save_safetensors", save_safetensors)

    def index(self, kind, *args):
        """Indices of the events of `kind` whose fields start with `args`."""
        return [i for i, e in enumerate(self.events) if e[0] == kind and e[1:1 + len(args)] == args]


def _check_protocol(events, root: Path, tmp: Path, final: Path, manifest_snapshot):
    """The ordering rules, given the recorded events (shared by the Python-level and strace variants)."""
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[1:3] == (str(tmp), str(final))]
    assert len(renames) == 1, f"expected one rename {tmp.name} -> {final.name}, got {events}"
    rename = renames[0]
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted([*ckpt.FILES, "manifest.json"])
    last_file_fsync = -1
    for name in names:
        size = (final / name).stat().st_size
        syncs = [i for i, e in enumerate(events[:rename]) if e[0] == "fsync" and e[1] == str(tmp / name)]
        assert syncs, f"{name} was not fsynced before the rename of {tmp.name}"
        writes = [i for i, e in enumerate(events) if e[0] == "open-w" and e[1] == str(tmp / name)]
        assert writes and syncs[-1] > writes[-1], f"{name}: fsynced before it was written"
        if events[syncs[-1]][2] is not None:
            assert events[syncs[-1]][2] == size, f"{name}: fsynced at {events[syncs[-1]][2]} bytes, not {size}"
        last_file_fsync = max(last_file_fsync, syncs[-1])
    dir_syncs = [i for i, e in enumerate(events[:rename]) if e[0] == "fsync" and e[1] == str(tmp)]
    assert dir_syncs and dir_syncs[-1] > last_file_fsync, \
        f"the folder {tmp.name} was not fsynced after its files and before the rename"
    manifest_open = [i for i, e in enumerate(events) if e[0] == "open-w" and e[1] == str(tmp / "manifest.json")]
    assert len(manifest_open) == 1
    for name in ckpt.FILES:
        writes = [i for i, e in enumerate(events) if e[0] == "open-w" and e[1] == str(tmp / name)]
        assert writes and max(writes) < manifest_open[0], f"{name} was written after the manifest"
    if manifest_snapshot is not None:
        done = {n: _sha(final / n) for n in ckpt.FILES}
        assert manifest_snapshot == done, "the manifest was opened before every other file had its final bytes"
    assert any(e[0] == "fsync" and e[1] == str(root) for e in events[rename + 1:]), \
        "the checkpoints folder was not fsynced after the rename"
    assert ckpt.verify(final) is None


@pytest.mark.parametrize("resave", [False, True], ids=["first save", "re-save over the same step"])
def test_save_checkpoint_fsyncs_everything_and_writes_the_manifest_last(tmp_path, monkeypatch, resave):
    """Every file of the checkpoint is fsynced (at its final size) before the temporary folder is renamed,
    the folder itself after its files and before the rename, the checkpoints folder after it; the manifest
    is opened for writing only when every other file has its final bytes. Re-saving a step (over a damaged
    checkpoint after a resume) follows the same protocol."""
    root = (tmp_path / "checkpoints").resolve()
    final, tmp = root / "step-00000003", root / ".tmp-step-00000003"
    if resave:
        ckpt.save_checkpoint(root, 3, *_inputs(1))
        (final / "weights.safetensors").write_bytes(b"damaged")
    spy = Spy(monkeypatch, tmp)
    path = ckpt.save_checkpoint(root, 3, *_inputs(2))
    monkeypatch.undo()
    assert path == final and spy.manifest_snapshot is not None, "the manifest was never opened for writing"
    _check_protocol(spy.events, root, tmp, final, spy.manifest_snapshot)
    saved = mx.load(str(final / "weights.safetensors"))["layers.0.lora_a"]
    assert mx.array_equal(saved, _inputs(2)[0]["layers.0.lora_a"])  # the new contents, not the damaged ones
    assert not tmp.exists() and not (root / ".del-step-00000003").exists()


_SAVE_SCRIPT = textwrap.dedent("""
    import sys
    import mlx.core as mx
    from mlx_persona.tuner import checkpoint as ckpt
    weights = {"a": mx.arange(64, dtype=mx.float32).reshape(16, 4)}
    opt = {"step": mx.array(3, mx.uint64), "a": {"m": mx.zeros((16, 4)), "v": mx.ones((16, 4))}}
    ckpt.save_checkpoint(sys.argv[1], 3, weights, opt, {"loop": {"step": 3}, "rng": [0, 1]})
""")
_OPENAT = re.compile(r'openat\([^,]+, "([^"]+)", ([A-Z_|]+)')
_FSYNC = re.compile(r'f(?:data)?sync\(\d+<([^>]+)>')
_RENAME = re.compile(r'rename(?:at2?)?\((?:[^,]+, )?"([^"]+)", (?:[^,]+, )?"([^"]+)"')


def _parse_strace(text: str) -> list[tuple]:
    """(call, path, detail) events from `strace -f -y` output, in order."""
    events = []
    for line in text.splitlines():
        line = re.sub(r"^(?:\[pid\s+)?\d+\]?\s+", "", line)  # the pid prefix of `strace -f -o`
        if m := _OPENAT.match(line):
            if re.search(r"O_WRONLY|O_RDWR", m.group(2)):
                events.append(("open-w", m.group(1), m.group(2)))
        elif m := _FSYNC.match(line):
            events.append(("fsync", m.group(1), None))
        elif m := _RENAME.match(line):
            events.append(("rename", m.group(1), m.group(2)))
    return events


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_save_checkpoint_system_calls_under_strace(tmp_path):
    """The same protocol, seen as system calls (openat / fsync / rename) of a real process under
    `strace -f`: what reaches the kernel, whatever Python or MLX does on the way."""
    root = (tmp_path / "checkpoints").resolve()
    log = tmp_path / "strace.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = ["strace", "-f", "-y", "-qq", "-o", str(log), "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2",
           sys.executable, "-c", _SAVE_SCRIPT, str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0 and "ptrace" in (proc.stderr + (log.read_text() if log.exists() else "")):
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    events = [e for e in _parse_strace(log.read_text()) if e[1].startswith(str(root))]
    assert events, "strace recorded nothing under the checkpoints folder"
    _check_protocol(events, root, root / ".tmp-step-00000003", root / "step-00000003", None)
