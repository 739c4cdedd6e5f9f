"""One writer per output folder (mlx_persona.outputs.output_lock), against real second processes.

The lock itself: a second process fails at once, naming the holder's PID and start time, and touches
nothing; the kernel frees the lock of a SIGKILLed holder; it survives --overwrite's emptying and the
atomic rename of fuse/export; every spelling of a folder shares one lock; a planted symbolic link or a
hostile lock file cannot be used against the command. Every command that writes a folder takes it.

The races, 10 second writers each, made deterministic by holding the first writer at chosen points
(mlx_persona.testing) while the others start: (a) two `train` runs into one fresh folder, (b) the same
with --overwrite into a finished run's folder, (c) --resume while another run writes. Every loser exits
non-zero with "OUT is in use by process PID" before touching anything, and the folder ends as the one
run that exited 0 wrote it: its config.yaml, adapters (bitwise), metrics rows, checkpoints and summary.
The two contenders differ in seed and steps, so a folder mixing them cannot pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from training_runs import (
    REPO,
    Held,
    bitwise_equal,
    cli_args,
    config,
    copy_run,
    metrics,
    reference_run,
    train_process,
)

from mlx_persona.outputs import OutputError, OutputInUse, lock_path, output_lock

A = {"seed": 1, "steps": 2}  # the run that should win
B = {"seed": 2, "steps": 3, "save_every": 1}  # the contender (and, in (c), the run resumed)

# A process that holds the locks of the folders named on its command line until its stdin closes.
HOLDER = r"""
import sys
from contextlib import ExitStack
from mlx_persona.outputs import atomic_output_dir, output_lock, prepare_output_dir
from pathlib import Path

mode, outs = sys.argv[1], sys.argv[2:]
with ExitStack() as stack:
    for out in outs:
        stack.enter_context(output_lock(out))
        if mode == "replace":  # as fuse/export do: a sibling folder renamed over OUT
            with atomic_output_dir(Path(out)) as tmp:
                (tmp / "new.txt").write_text("new")
        elif mode == "overwrite":  # as train/eval --overwrite do: OUT emptied
            prepare_output_dir(out, True)
            (Path(out) / "new.txt").write_text("new")
    print("locked", flush=True)
    sys.stdin.read()
"""


class Holder:
    """A plain Python process holding `outs`' locks (no MLX: it starts in a fraction of a second)."""

    def __init__(self, *outs, mode="lock"):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode, *map(str, outs)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "locked\n"
        self.pid = self.proc.pid

    def release(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` (and the names beside it) with its bytes' hash."""
    if not folder.exists():
        return {"beside": sorted(p.name for p in folder.parent.iterdir())}
    tree = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in folder.rglob("*")}
    return {"tree": tree, "beside": sorted(p.name for p in folder.parent.iterdir())}


def assert_in_use(fn, out: Path, pid: int):
    """`fn` fails on the lock another process still holds (so it did not wait for it), touching nothing,
    and before any work: CPU seconds, not wall time, which a loaded machine stretches (a command that
    loaded a model or imported torch first would spend several here; refused, it spends milliseconds)."""
    before, cpu = snapshot(out), time.process_time()
    with pytest.raises(OutputInUse) as e:
        fn()
    print(f"refused after {time.process_time() - cpu:.3f} CPU s")
    assert time.process_time() - cpu < 5  # measured <= 0.005 for every command here
    assert e.value.pid == pid
    assert str(e.value).startswith(f"{out} is in use by process {pid} (started 20")
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------ the lock
def test_a_second_process_fails_at_once_naming_the_holder_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    with Holder(out) as holder:
        assert lock_path(out) == tmp_path / ".out.lock" and not out.exists()  # beside OUT, before OUT exists
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == holder.pid and info["folder"] == str(out)

        def second():
            with output_lock(out):
                pytest.fail("took a lock another process holds")

        assert_in_use(second, out, holder.pid)
        assert not out.exists()
        holder.release()
    assert not lock_path(out).exists()  # the holder removes its lock file when it lets go
    with output_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_lock_of_a_sigkilled_holder_is_free_at_once(tmp_path):
    out = tmp_path / "out"
    with Holder(out) as holder:
        holder.proc.kill()
        holder.proc.wait()
        assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # a stale file, locking nothing
        with output_lock(out):  # wait=False: had the stale file still locked, this would have raised
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


@pytest.mark.parametrize("mode", ["overwrite", "replace"])
def test_the_lock_survives_overwrite_and_the_atomic_rename(tmp_path, mode):
    """`--overwrite` empties OUT and fuse/export rename a new folder over it: the lock is beside, so the
    holder still holds it after either, and OUT holds nothing but the command's files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with Holder(out, mode=mode) as holder:
        assert sorted(p.name for p in out.iterdir()) == ["new.txt"]

        def second():
            with output_lock(out):
                pass

        assert_in_use(second, out, holder.pid)
        holder.release()


@pytest.mark.needs(os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks to see a process wait for a lock")
def test_the_lock_is_reentrant_in_a_process_and_can_wait(tmp_path):
    out = tmp_path / "out"
    with output_lock(out), output_lock(out):  # compare holds its report folder, then evaluate takes it
        pass
    assert not lock_path(out).exists()
    with Holder(out) as holder:
        released, seen = threading.Event(), {}

        def waiter():  # e.g. a second rank building the same cached model
            with output_lock(out, wait=True):
                seen["after_release"] = released.is_set()
                seen["pid"] = json.loads(lock_path(out).read_text())["pid"]

        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 120  # the test waits until the thread waits in flock (no race)
        while not _waiting_for(lock_path(out)):
            assert thread.is_alive() and time.monotonic() < deadline, seen
            time.sleep(0.01)
        released.set()
        holder.release()
        thread.join(timeout=60)
        assert seen == {"after_release": True, "pid": os.getpid()}


def _waiting_for(path: Path) -> bool:
    """Whether this process waits for the flock of `path`: a ``->`` (blocked) line of /proc/locks with our
    PID and the file's inode."""
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[1] == "->" and fields[5] == str(os.getpid()) \
                and fields[6].rsplit(":", 1)[-1] == str(ino):
            return True
    return False


def test_every_spelling_of_a_folder_shares_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "alias").symlink_to(tmp_path / "real" / "a")
    assert lock_path(tmp_path / "real" / "a") == tmp_path / "real" / ".a.lock"
    assert lock_path(tmp_path / "link" / "a") == tmp_path / "real" / ".a.lock"
    assert lock_path(tmp_path / "alias") == tmp_path / "real" / ".a.lock"
    assert lock_path(tmp_path / "real" / "b" / ".." / "a") == tmp_path / "real" / ".a.lock"
    with Holder(tmp_path / "link" / "a") as holder:
        def second():
            with output_lock(tmp_path / "alias"):
                pass

        assert_in_use(second, tmp_path / "alias", holder.pid)
    with pytest.raises(OutputError, match="no parent folder"):
        lock_path("/")


def test_a_planted_link_or_a_hostile_lock_file_cannot_be_used_against_the_command(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        with output_lock(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious"
    (tmp_path / ".dir.lock").mkdir()
    os.mkfifo(tmp_path / ".fifo.lock")  # opening one for reading would wait for a writer
    for name in ("dir", "fifo"):
        with pytest.raises(OutputError, match="not a regular file"):
            with output_lock(tmp_path / name):
                pass
    # Held by someone who wrote escape sequences and a megabyte into it: not repeated, not read in full.
    hostile = tmp_path / ".other.lock"
    hostile.write_text(json.dumps({"pid": "1; \x1b[2J", "started": "\x1b[31mnow"}) + "x" * 1_000_000)
    code = ("import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(hostile)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "1\n"
        with pytest.raises(OutputInUse) as e:
            with output_lock(tmp_path / "other"):
                pass
        assert str(e.value) == (f"{tmp_path / 'other'} is in use by another process; wait for it to finish, "
                                "or choose another output folder")
        assert e.value.pid is None
    finally:
        proc.kill()
        proc.wait()


def test_every_command_that_writes_a_folder_takes_its_lock(tiny_path, small_data, tmp_path):
    """train (also --resume), eval, sweep, compare (report and variant folders), fuse, export onnx and
    init-model each fail at once on a folder another process holds, before they read or write it."""
    from click.testing import CliRunner

    from mlx_persona.cli import main
    from mlx_persona.eval.compare import compare
    from mlx_persona.eval.entries import ModelEntry
    from mlx_persona.eval.evaluate import evaluate
    from mlx_persona.eval.options import EvalOptions
    from mlx_persona.eval.sweep import sweep
    from mlx_persona.export.hf import fuse
    from mlx_persona.export.onnx import export_onnx
    from mlx_persona.models import init_model
    from mlx_persona.sampling import GenerationConfig
    from mlx_persona.tuner.run import run

    finished = copy_run(reference_run(tiny_path, small_data, tmp_path / "refs", **A), tmp_path / "finished")
    names = ["train", "eval", "sweep", "report", "variant", "fused", "onnx", "model"]
    outs = {n: tmp_path / n for n in names}
    recipe = tmp_path / "recipe.yaml"
    variant_cfg = tmp_path / "variant.yaml"
    variant_cfg.write_text(yaml.safe_dump({"model": str(tiny_path), "data": str(small_data),
                                           "output": str(outs["variant"]), "steps": 1}))
    recipe.write_text(yaml.safe_dump({"output": str(outs["report"]), "variants": [
        {"name": "base", "model": str(tiny_path)}, {"name": "ft", "train": str(variant_cfg)}]}))
    entries = [ModelEntry("base", str(tiny_path))]
    options = EvalOptions(seeds=[0], limit=1)
    with Holder(*outs.values(), finished) as h:
        checks = {
            "train": lambda: run(config(tiny_path, small_data, outs["train"]), log=lambda *a: None),
            "eval": lambda: evaluate(entries, GenerationConfig(), options, outs["eval"], log=lambda *a: None),
            "sweep": lambda: sweep(entries, GenerationConfig(), {"temperature": [0.5]}, options, outs["sweep"],
                                   log=lambda *a: None),
            "report": lambda: compare(recipe, log=lambda *a: None),
            "fused": lambda: fuse(str(tiny_path), None, outs["fused"]),
            "onnx": lambda: export_onnx(tiny_path, outs["onnx"], ("fp32",)),
            "model": lambda: init_model(outs["model"], "tiny"),
        }
        for name, fn in checks.items():
            assert_in_use(fn, outs[name], h.pid)
        assert_in_use(lambda: run(config(tiny_path, small_data, finished, **A), resume=True, log=lambda *a: None),
                      finished, h.pid)
        # compare's variant folder: locked while its report folder is free.
        assert_in_use(lambda: compare(recipe, out=str(tmp_path / "report2"), log=lambda *a: None),
                      outs["variant"], h.pid)
        # The command line: one line, no traceback, a non-zero exit.
        result = CliRunner().invoke(main, ["init-model", str(outs["model"])])
        assert result.exit_code == 1
        assert result.output == (f"error: {outs['model']} is in use by process {h.pid} (started "
                                 f"{json.loads(lock_path(outs['model']).read_text())['started']}); wait for it to "
                                 "finish, or choose another output folder\n")


# ----------------------------------------------------------------------------------------- the races
def _refs(tiny_path, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-refs")
    return reference_run(tiny_path, small_data, root, **A), reference_run(tiny_path, small_data, root, **B)


def _rows(out):
    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in metrics(out)]


def assert_run_of(out: Path, ref: Path, other: Path):
    """`out` is, file by file, what the run of `ref`'s config wrote (and nothing of `other`'s)."""
    def settings(folder):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        return {k: v for k, v in cfg.items() if k not in ("output", "overwrite")}

    assert settings(out) == settings(ref) != settings(other)
    assert bitwise_equal(out / "adapters.safetensors", ref / "adapters.safetensors")
    assert not bitwise_equal(out / "adapters.safetensors", other / "adapters.safetensors")
    def read(folder, name):
        return json.loads((folder / name).read_text())

    def names(folder):
        return sorted(p.name for p in folder.iterdir())

    assert read(out, "adapter_config.json") == read(ref, "adapter_config.json")
    assert _rows(out) == _rows(ref) != _rows(other)
    assert read(out, "summary.json")["steps"] == read(ref, "summary.json")["steps"]
    assert names(out / "checkpoints") == names(ref / "checkpoints")
    assert names(out) == names(ref)


def contend(out: Path, writer: Held, point: str, contenders: list[list[str]]) -> list[tuple]:
    """Starts every contender at once while `writer` waits at `point`; each must fail at once with the
    lock's message and leave the folder as it was (the writer still waiting, so none of them waited)."""
    writer.wait(point)
    before = snapshot(out)
    procs = [train_process(args) for args in contenders]
    results = []
    for args, proc in zip(contenders, procs):
        _, err = proc.communicate(timeout=120)
        results.append((point, proc.returncode, err.strip()))
        assert proc.returncode == 1, (args, err)
        assert err.strip().splitlines()[-1].startswith(f"error: {out} is in use by process {writer.pid} (started"), err
        assert "Traceback" not in err
    assert writer.held(point)
    assert snapshot(out) == before
    writer.release()
    return results


def test_race_two_trains_into_one_fresh_folder(tiny_path, small_data, tmp_path_factory, tmp_path):
    ref_a, ref_b = _refs(tiny_path, small_data, tmp_path_factory)
    out = tmp_path / "run"
    a, b = cli_args(tiny_path, small_data, out, **A), cli_args(tiny_path, small_data, out, **B)
    # Held where the folder is still fresh (the lock taken, nothing written), after a step, inside a save.
    points = ["start", "step:1", "save:2:optimizer.safetensors"]
    with Held(a, points, tmp_path / "holds") as writer:
        losers = contend(out, writer, "start", [b] * 4)
        losers += contend(out, writer, "step:1", [b, b, b + ["--overwrite"]])
        losers += contend(out, writer, "save:2:optimizer.safetensors", [b, b + ["--overwrite"], b])
        assert writer.finish() == 0, writer.output()
    assert len(losers) == 10
    assert_run_of(out, ref_a, ref_b)
    # And once unheld: two started together, one wins, the other is refused by the lock or the folder rule.
    out2 = tmp_path / "run2"
    procs = [train_process(cli_args(tiny_path, small_data, out2, **c)) for c in (A, B)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errs
    loser = errs[codes.index(1)]
    assert "is in use by process" in loser or "already exists" in loser, loser
    assert_run_of(out2, *((ref_a, ref_b) if codes[0] == 0 else (ref_b, ref_a)))


def test_race_overwrite_into_a_finished_runs_folder(tiny_path, small_data, tmp_path_factory, tmp_path):
    ref_a, ref_b = _refs(tiny_path, small_data, tmp_path_factory)
    out = copy_run(ref_b, tmp_path / "run")  # B's finished run; A replaces it
    a = cli_args(tiny_path, small_data, out, **A) + ["--overwrite"]
    b = cli_args(tiny_path, small_data, out, **B) + ["--overwrite"]
    # Before A empties the folder (still B's run), after its first step, after its last checkpoint.
    with Held(a, ["start", "step:1", "results"], tmp_path / "holds") as writer:
        writer.wait("start")
        assert snapshot(out)["tree"] == snapshot(ref_b)["tree"]
        losers = contend(out, writer, "start", [b] * 4)
        losers += contend(out, writer, "step:1", [b, b, b[:-1] + ["--resume"]])
        losers += contend(out, writer, "results", [b] * 3)
        assert writer.finish() == 0, writer.output()
    assert len(losers) == 10
    assert_run_of(out, ref_a, ref_b)


def test_race_resume_while_another_run_writes(tiny_path, small_data, tmp_path_factory, tmp_path):
    ref_a, ref_b = _refs(tiny_path, small_data, tmp_path_factory)
    # B's run as a SIGKILL after its checkpoint of step 2 leaves it; the writer resumes it.
    out = copy_run(ref_b, tmp_path / "run")
    for name in ("adapters.safetensors", "adapter_config.json", "summary.json", "loss.png"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    b = cli_args(tiny_path, small_data, out, **B) + ["--resume"]
    forced = cli_args(tiny_path, small_data, out, **{**B, "seed": 5}) + ["--resume", "--force"]
    fresh = cli_args(tiny_path, small_data, out, **A) + ["--overwrite"]
    # Before it reads the checkpoints, after its step, inside its save.
    with Held(b, ["start", "step:3", "save:3:weights.safetensors"], tmp_path / "holds") as writer:
        losers = contend(out, writer, "start", [b] * 4)
        losers += contend(out, writer, "step:3", [b, b, forced])
        losers += contend(out, writer, "save:3:weights.safetensors", [b, forced, fresh])
        assert writer.finish() == 0, writer.output()
        assert "resuming at step 2 of 3" in writer.output()
    assert len(losers) == 10
    assert_run_of(out, ref_b, ref_a)
