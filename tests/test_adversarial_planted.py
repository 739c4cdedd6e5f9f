"""The planted-library attack, run for real (SECURITY.md): another local user fills every folder the victim
might load native code from with a library that leaves a mark when it is loaded, and the victim trains.

The attacker is uid 65534 (`nobody`, by subprocess's `user=`); the victim is root (this process and its
children), so the tests need root and are skipped otherwise (CI runs as root). The planted library's
constructor appends ``PLANTED_CODE_RAN uid=<uid> <its path>`` to a marker file: that file must never appear.

The attacker learns what to plant the way anyone can: the victim's own earlier run (same software, same
machine) shows every name it looks up (the cache layout with its keys, and the name of every kernel MLX
compiles); those keys and names do not depend on the user. The folders planted:
- the shared ``$TMPDIR``: the old kernel folder ``$TMPDIR/mlx_persona-jit-<key>/mlx/<version>/cpu`` and
  MLX's own ``$TMPDIR/mlx/<version>/cpu``, every kernel name in each;
- every cache location the attacker can write: a cache root they own, the victim's own cache root left
  mode 0777, a cache root reached through a link they own or through a folder they can write (re-pointed
  at their own tree after the victim's set-up, before its first kernel), each with ``jit-hook/<key>/
  libmlxp_jit.so``, ``sgemm/<key>/libmlxp_sgemm.so`` and ``jit/<key>/mlx/<version>/cpu/lib<kernel>.so``.

With the hook on (the default on Linux) nothing planted may run, and the victim must still work: in its
own cache, or, when that is refused (with a warning naming the folder), in a fresh private folder of the
run. With ``MLX_PERSONA_JIT=0`` MLX keeps its kernels in ``$TMPDIR/mlx`` as it always has: the last test
shows what SECURITY.md says about that.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

NOBODY = 65534
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the speed layer (and what it loads) is Linux-only"),
    pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                       reason="needs root, to run the attacker as another user (nobody)"),
    pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("g++")),
                       reason="needs gcc and g++ (the planted library; MLX's kernel compiler)"),
]

PLANTED_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
  Dl_info info;
  const char *where = dladdr((void *)planted, &info) && info.dli_fname ? info.dli_fname : "?";
  char line[4096];
  int n = snprintf(line, sizeof line, "PLANTED_CODE_RAN uid=%d %s\n", (int)getuid(), where);
  int fd = open(MARKER, O_WRONLY | O_APPEND | O_CREAT, 0666);
  if (fd >= 0) {
    if (n > 0) write(fd, line, (size_t)n);
    close(fd);
  }
}
"""

# The smaller victim: setup(), a fused elementwise kernel and matrix products (sgemm and sgemv), checked.
VICTIM = r"""
import json, os, stat, sys, time
import mlx_persona.backend as b
from mlx_persona.backend import jit, sgemm
b.setup()
sync = os.environ.get("VICTIM_SYNC")
if sync:  # the attacker's window: set-up has checked its folders, no kernel is built yet
    open(sync + ".ready", "w").close()
    while not os.path.exists(sync + ".go"):
        time.sleep(0.05)
import mlx.core as mx
import numpy as np
x = mx.arange(-8, 8, 0.25, dtype=mx.float32)
got = np.array(mx.compile(lambda v: mx.exp(v * 0.5) * 1.5 + mx.sigmoid(v))(x))
xn = np.array(x, np.float64)
fused_ok = bool(np.allclose(got, np.exp(xn * 0.5) * 1.5 + 1 / (1 + np.exp(-xn)), rtol=1e-5))
a, m, v = (np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in ((64, 48), (48, 40), (48, 1)))
matmul_ok = bool(np.allclose(np.array(mx.array(a) @ mx.array(m)), a @ m, rtol=1e-4, atol=1e-4)
                 and np.allclose(np.array(mx.array(a) @ mx.array(v)), a @ v, rtol=1e-4, atol=1e-4))
folder = jit.status()[0]
chain = {}
if folder:  # from the run or cache root down to the kernel folder: ours, 0700
    for p in (os.path.dirname(os.path.dirname(folder)), os.path.dirname(folder), folder):
        st = os.lstat(p)
        chain[p] = [stat.S_IMODE(st.st_mode), st.st_uid]
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if l.rstrip().endswith(".so")})
print(json.dumps({"jit": jit.status(), "sgemm": [sgemm.active(), sgemm.status()], "fused_ok": fused_ok,
                  "matmul_ok": matmul_ok, "chain": chain, "libs": libs, "compiles": jit.compiles()}))
"""

TRAIN_ARGS = ["--no-progress", "--set", "steps=2", "--set", "batch_size=4", "--set", "eval_every=2",
              "--set", "save_every=2", "--set", "lora.rank=4"]


# ----------------------------------------------------------------------------------------------- helpers


def _attack(plan: dict) -> None:
    """Does what `plan` says as nobody, with the shell's tools (the attacker needs no Python): folders
    ("dirs", mode 0777), copies of the planted library ("files"), "renames", and "links" put in place
    atomically. Fails the test if the attacker could not."""
    q = shlex.quote
    lines = ["set -e", "umask 0"]
    lines += [f"mkdir -p -m 777 {q(d)}" for d in plan.get("dirs", [])]
    for f in plan.get("files", []):
        lines += [f"mkdir -p -m 777 {q(os.path.dirname(f))}", f"cp {q(plan['lib'])} {q(f)}", f"chmod 777 {q(f)}"]
    lines += [f"mv -T {q(src)} {q(dst)}" for src, dst in plan.get("renames", [])]
    lines += [f"ln -sfn {q(target)} {q(link + '.new')} && mv -T {q(link + '.new')} {q(link)}"
              for link, target in plan.get("links", [])]
    proc = subprocess.run(["/bin/sh", "-c", "\n".join(lines)], user=NOBODY, group=NOBODY, extra_groups=[],
                          cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"the attacker (nobody) could not {plan}: {proc.stderr[-2000:]}"


def _env(home: Path, tmpdir: Path, cache: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLX_PERSONA_") or k == "MLX_PERSONA_CPU_FLAGS_MASK"}  # the CPU the suite runs as
    env.update(HOME=str(home), TMPDIR=str(tmpdir), HF_HUB_OFFLINE="1", **extra)
    for name in ("TMP", "TEMP", "TEMPDIR"):  # MLX's temp_directory_path() would read them after TMPDIR
        env.pop(name, None)
    if cache is not None:
        env["MLX_PERSONA_CACHE"] = str(cache)
    return env


def _victim(env: dict) -> tuple[dict, list[str]]:
    """Runs VICTIM as root; returns (its report, its warning lines)."""
    proc = subprocess.run([sys.executable, "-c", VICTIM], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), _warnings(proc.stderr)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mlx_persona: warning")]


def _train(env: dict, tiny_path: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mlx_persona.train", "--model", str(tiny_path), "--data",
                           str(data), "-o", str(out), *TRAIN_ARGS], env=env, capture_output=True, text=True,
                          timeout=900, check=False, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "done: 2 steps" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    return proc


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its owner, mode, size and mtime (links not followed)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            out[os.path.relpath(os.path.join(top, name), root)] = (st.st_uid, st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def _cache_plants(root: Path, learned: dict) -> list[str]:
    """Every library the victim looks up in a cache at `root`: the hook, the sgemm layer, each kernel."""
    return [str(root / rel) for rel in learned["layout"]]


def _tmpdir_plants(tmpdir: Path, learned: dict) -> list[str]:
    """Every kernel in the old kernel folder and in MLX's own folder, under a shared TMPDIR."""
    old = tmpdir / f"mlx_persona-jit-{learned['key']}" / "mlx" / learned["version"] / "cpu"
    mlx_own = tmpdir / "mlx" / learned["version"] / "cpu"
    return [str(folder / name) for folder in (old, mlx_own) for name in learned["kernels"]]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def arena():
    """A world's shared folders, like /tmp (root-owned, mode 1777): the shared TMPDIR, the planted library,
    the marker; outside pytest's own folders, which nobody cannot enter."""
    base = Path(tempfile.mkdtemp(prefix="mlxp-planted-", dir="/tmp"))  # not $TMPDIR: nobody may not reach it
    base.chmod(0o1777)
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    tmpdir.chmod(0o1777)
    marker = base / "PLANTED_CODE_RAN"
    src = base / "planted.c"
    src.write_text(PLANTED_C)
    lib = base / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)], check=True,
                   capture_output=True, timeout=120)
    lib.chmod(0o644)
    yield {"base": base, "tmpdir": tmpdir, "marker": marker, "lib": str(lib)}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def marker(arena):
    """The marker file: absent before the test; after it, absent too, or the test fails saying what ran."""
    m = arena["marker"]
    m.unlink(missing_ok=True)
    yield m
    ran = m.read_text() if m.exists() else ""
    m.unlink(missing_ok=True)
    assert not ran, f"planted code ran in the victim:\n{ran}"


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_path, small_data):
    """The victim's own earlier run (private HOME, private TMPDIR): what it looks up, by name."""
    root = tmp_path_factory.mktemp("learn")
    home, tmpdir = root / "home", root / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    env = _env(home, tmpdir)
    _train(env, tiny_path, small_data, root / "out")
    report, warnings = _victim(env)
    assert report["jit"][0] and report["sgemm"][0] and not warnings, (report, warnings)
    cache = home / ".cache" / "mlx_persona"
    layout = sorted(str(p.relative_to(cache)) for p in cache.rglob("*.so"))
    kernels = sorted({Path(p).name for p in layout if p.startswith("jit/")})
    key = Path(report["jit"][0]).name
    version = next(Path(p).parts[3] for p in layout if p.startswith(f"jit/{key}/mlx/"))
    assert any(p.startswith("jit-hook/") for p in layout) and any(p.startswith("sgemm/") for p in layout), layout
    assert len(kernels) >= 10, kernels  # training fuses dozens of kernels; the small victim adds one
    return {"cache": cache, "layout": layout, "kernels": kernels, "key": key, "version": version}


@pytest.fixture
def shared_tmp(arena, learned):
    """The shared TMPDIR with every kernel planted in the old folder and in MLX's own; cleaned afterwards."""
    tmpdir = arena["tmpdir"]
    _attack({"lib": arena["lib"], "files": _tmpdir_plants(tmpdir, learned)})
    before = _tree(tmpdir)
    yield tmpdir, before
    for p in tmpdir.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _check_private_run(report: dict, warnings: list[str], tmpdir: Path, refused: str, why: str) -> None:
    """The victim refused `refused` (two warnings, naming it and `why`) and built in its own run folder."""
    assert len(warnings) == 2, warnings  # one for the sgemm layer, one for MLX's kernels
    for w in warnings:
        assert refused in w and why in w and "for this run alone" in w, (refused, why, w)
    folder = Path(report["jit"][0])
    run = folder.parents[1]
    assert run.parent == tmpdir and run.name.startswith("mlx_persona-run-"), folder
    for path, (mode, uid) in report["chain"].items():
        assert mode == 0o700 and uid == 0, (path, oct(mode), uid)
    assert report["sgemm"][0] and report["compiles"] >= 1, report
    assert report["fused_ok"] and report["matmul_ok"], report
    ours = [lib for lib in report["libs"] if "mlxp" in lib or ("/mlx/" in lib and "/cpu/lib" in lib)]
    assert ours and all(lib.startswith(str(run) + "/") for lib in ours), ours
    assert not run.exists()  # removed at exit


# ----------------------------------------------------------------------------------------------- the attacks


def test_training_with_a_planted_shared_tmpdir_loads_only_its_own_kernels(
        marker, shared_tmp, arena, learned, tiny_path, small_data, tmp_path):
    """The original attack: the old kernel folder and MLX's own, pre-created in the shared TMPDIR (mode
    0777, nobody's) with every kernel the training compiles. Root trains with the defaults: its kernels are
    built and loaded in its own cache; nothing in the shared TMPDIR is written, compiled or replaced."""
    tmpdir, before = shared_tmp
    home = tmp_path / "home"  # a victim whose cache is still empty: every kernel is compiled
    home.mkdir()
    proc = _train(_env(home, tmpdir), tiny_path, small_data, tmp_path / "out")
    assert not _warnings(proc.stderr), proc.stderr
    kernels = home / ".cache" / "mlx_persona" / "jit" / learned["key"] / "mlx" / learned["version"] / "cpu"
    built = {p.name for p in kernels.glob("lib*.so")}
    assert built and built <= set(learned["kernels"]), sorted(built - set(learned["kernels"]))  # all planted too
    planted = Path(arena["lib"]).read_bytes()
    assert all((kernels / name).read_bytes() != planted for name in built)
    assert _tree(tmpdir) == before  # nothing read into, written to or compiled in the shared folders


@pytest.mark.parametrize("owner", ["nobody", "root, mode 0777"])
def test_a_cache_root_others_can_write_is_refused_and_nothing_planted_in_it_runs(
        marker, shared_tmp, arena, learned, tmp_path, owner):
    """MLX_PERSONA_CACHE names a folder nobody made (mode 0777), or the victim's own cache left mode 0777:
    the attacker fills it with the hook, the sgemm layer and every kernel, and the shared TMPDIR too. The
    victim refuses the cache, naming it, and builds everything in a fresh private folder of its run."""
    tmpdir, before = shared_tmp
    cache = arena["base"] / f"cache-{os.getpid()}-{owner.split(',')[0]}"
    if owner == "nobody":
        _attack({"lib": arena["lib"], "dirs": [str(cache)], "files": _cache_plants(cache, learned)})
        why = f"{cache} is owned by uid {NOBODY}"
    else:
        cache.mkdir()
        cache.chmod(0o777)
        _attack({"lib": arena["lib"], "files": _cache_plants(cache, learned)})
        why = f"{cache} is writable by group and others (mode 0777)"
    home = tmp_path / "home"
    home.mkdir()
    try:
        report, warnings = _victim(_env(home, tmpdir, cache))
        _check_private_run(report, warnings, tmpdir, str(cache), why)
        assert not [lib for lib in report["libs"] if lib.startswith(str(cache))], report["libs"]
        assert _tree(tmpdir) == before
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.parametrize("way", ["a link nobody owns", "a folder nobody can write"])
def test_a_cache_root_another_user_can_re_point_is_refused(marker, shared_tmp, arena, learned, tmp_path, way):
    """The cache root itself is the victim's (root, 0700, full of its own good libraries), but the way to
    it is not: a link nobody made in the shared sticky folder, or a folder nobody owns (0777, not sticky).
    Once the victim's set-up has checked its folders, and before its first kernel, the attacker re-points
    that way at their own planted tree. The victim must have refused that way already."""
    tmpdir, before = shared_tmp
    evil = arena["base"] / f"evil-{os.getpid()}"
    parent = arena["base"] / f"open-{os.getpid()}"
    link = arena["base"] / f"cache-link-{os.getpid()}"
    _attack({"lib": arena["lib"], "dirs": [str(evil)], "files": _cache_plants(evil, learned)})
    own = tmp_path / "own-cache"
    shutil.copytree(learned["cache"], own, ignore=shutil.ignore_patterns("models"))
    own.chmod(0o700)
    if way == "a link nobody owns":
        cache = link
        _attack({"links": [[str(cache), str(own)]]})
        refused, why = str(cache), f"owned by uid {NOBODY}"
        swap = {"links": [[str(cache), str(evil)]]}
    else:
        _attack({"dirs": [str(parent)]})
        cache = parent / "cache"  # the victim creates it (root, 0700)
        refused, why = str(parent), f"owned by uid {NOBODY}"
        swap = {"renames": [[str(cache), str(parent / "moved")]], "links": [[str(cache), str(evil)]]}
    home = tmp_path / "home"
    home.mkdir()
    sync = tmp_path / "sync"
    env = _env(home, tmpdir, cache, VICTIM_SYNC=str(sync))
    victim = subprocess.Popen([sys.executable, "-c", VICTIM], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not Path(f"{sync}.ready").exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"{sync}.ready").exists(), victim.communicate(timeout=60)
        _attack(swap)
        assert os.path.realpath(cache) == str(evil)  # the way now leads to the attacker's tree
        Path(f"{sync}.go").touch()
        out, err = victim.communicate(timeout=600)
        assert victim.returncode == 0, err[-4000:]
        report = json.loads(out.strip().splitlines()[-1])
        _check_private_run(report, _warnings(err), tmpdir, refused, why)
        assert not [lib for lib in report["libs"] if lib.startswith((str(cache), str(evil)))], report["libs"]
        assert _tree(tmpdir) == before
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        for p in (evil, parent):
            shutil.rmtree(p, ignore_errors=True)
        link.unlink(missing_ok=True)


@pytest.mark.parametrize("mlx_folder", ["planted by nobody", "not there yet"])
def test_without_the_hook_mlx_s_own_folder_is_ours_or_its_kernels_are_off(
        marker, arena, learned, tmp_path, mlx_folder):
    """The hook is asked for but cannot be put in place (here: a g++ that rejects our flags), so MLX keeps
    its own kernel folder, $TMPDIR/mlx/<version>/cpu, in the shared TMPDIR. Planted there: the victim
    warns, naming it, and turns MLX's kernel compiler off (still right, only slower). Not there yet: the
    victim creates it, 0700, and MLX compiles into it; the attacker can then plant nothing in it."""
    tmpdir = arena["tmpdir"]
    mlx_own = tmpdir / "mlx" / learned["version"] / "cpu"
    if mlx_folder == "planted by nobody":
        _attack({"lib": arena["lib"], "files": [str(mlx_own / name) for name in learned["kernels"]]})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gxx = bin_dir / "g++"
    real = shutil.which("g++")
    gxx.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && '
                   f'{{ echo "g++: error: unrecognized command-line option -march=native" >&2; exit 1; }}; done\n'
                   f'exec {real} "$@"\n')
    gxx.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, tmpdir, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    try:
        before = _tree(tmpdir)
        report, warnings = _victim(env)
        assert report["jit"][0] is None and "cannot build the hook" in report["jit"][1], report["jit"]
        assert report["fused_ok"] and report["matmul_ok"], report
        if mlx_folder == "planted by nobody":
            assert len(warnings) == 1 and str(tmpdir / "mlx") in warnings[0], warnings
            assert "mx.disable_compile()" in warnings[0] and f"owned by uid {NOBODY}" in warnings[0], warnings
            assert "compiled kernels off" in report["jit"][1]
            assert _tree(tmpdir) == before
        else:
            assert warnings == [] and "checked: ours, 0700" in report["jit"][1], (warnings, report["jit"])
            for p in (tmpdir / "mlx", mlx_own.parent, mlx_own):
                st = p.lstat()
                assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, (p, oct(st.st_mode))
            assert list(mlx_own.glob("lib*.so"))  # MLX compiled into it
            with pytest.raises(AssertionError, match="could not"):  # and the attacker cannot plant there
                _attack({"lib": arena["lib"], "files": [str(mlx_own / name) for name in learned["kernels"]]})
    finally:
        for p in tmpdir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def test_with_the_hook_turned_off_mlx_loads_what_its_shared_folder_holds(arena, learned, tmp_path):
    """What SECURITY.md says about MLX_PERSONA_JIT=0: MLX as it is, which loads any library it finds in
    $TMPDIR/mlx/<version>/cpu. With a shared TMPDIR that is the attack (here the marker appears); with a
    private TMPDIR, the mitigation SECURITY.md gives, it is not. If MLX ever checks its folder, this test
    fails and SECURITY.md should say so."""
    m = arena["marker"]
    m.unlink(missing_ok=True)
    tmpdir = arena["tmpdir"]
    mlx_own = tmpdir / "mlx" / learned["version"] / "cpu"
    _attack({"lib": arena["lib"], "files": [str(mlx_own / name) for name in learned["kernels"]]})
    home = tmp_path / "home"
    home.mkdir()
    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    try:
        env = _env(home, tmpdir, MLX_PERSONA_JIT="0")
        proc = subprocess.run([sys.executable, "-c", VICTIM], env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        ran = m.read_text() if m.exists() else ""
        assert f"PLANTED_CODE_RAN uid=0 {mlx_own}/" in ran, (ran, proc.stderr[-2000:])
        m.unlink()
        report, _ = _victim(_env(home, private, MLX_PERSONA_JIT="0"))  # the mitigation
        assert not m.exists() and report["fused_ok"] and list((private / "mlx").rglob("lib*.so"))
    finally:
        m.unlink(missing_ok=True)
        for p in tmpdir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def test_the_attacker_s_preparations_are_real(arena, learned, tmp_path):
    """A control, so that the tests above cannot pass for want of an attack: loaded into a process, a
    planted library leaves its mark, and the planted names are the ones MLX looks up."""
    m = arena["marker"]
    m.unlink(missing_ok=True)
    code = f"import ctypes; ctypes.CDLL({arena['lib']!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert m.read_text().startswith("PLANTED_CODE_RAN uid=0 "), m.read_text()
    m.unlink()
    kernel = textwrap.dedent("""
        import mlx.core as mx
        x = mx.arange(-8, 8, 0.25, dtype=mx.float32)
        mx.eval(mx.compile(lambda v: mx.exp(v * 0.5) * 1.5 + mx.sigmoid(v))(x))
    """)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run([sys.executable, "-c", kernel], env=_env(tmp_path, scratch, MLX_PERSONA_JIT="0"), check=True,
                   timeout=300)
    names = {p.name for p in (scratch / "mlx" / learned["version"] / "cpu").glob("lib*.so")}
    assert names and names <= set(learned["kernels"]), (names, learned["kernels"][:5])
