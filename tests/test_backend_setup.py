"""The speed layer's contract: importing changes nothing; mlx_persona.backend.setup() changes MLX alone.

Each check that needs a fresh process (what an import or setup() does to a process) runs in one, with its
own HOME, cache and TMPDIR under tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlx_persona.backend import folders, sgemm
from mlx_persona.backend.folders import UnsafeFolder, private_dir

linux = pytest.mark.skipif(sys.platform != "linux", reason="the speed layer is for Linux")
as_root = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                             reason="needs root to give a folder to another user")
NOBODY = 65534


def _files(*roots: Path) -> set[str]:
    return {str(p) for root in roots if root.exists() for p in root.rglob("*")}


def _fresh(tmp_path: Path, **extra) -> tuple[dict, list[Path]]:
    """An environment with its own HOME, cache and TMPDIR (all empty), and those folders."""
    roots = [tmp_path / "home", tmp_path / "cache", tmp_path / "tmp"]
    roots[0].mkdir()
    roots[2].mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLX_PERSONA_") or k == "MLX_PERSONA_CPU_FLAGS_MASK"}  # the CPU the suite runs as
    env.update(HOME=str(roots[0]), MLX_PERSONA_CACHE=str(roots[1]), TMPDIR=str(roots[2]), **extra)
    return env, roots


def _child(code: str, env: dict) -> tuple[dict, str]:
    """Runs `code`; returns (the JSON of its last stdout line, its stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


IMPORT_ALL = """
import importlib, json, os, pkgutil, sys
before = dict(os.environ)
import mlx_persona
failed = {}
for info in pkgutil.walk_packages(mlx_persona.__path__, "mlx_persona."):
    try:
        importlib.import_module(info.name)
    except ImportError as e:  # an optional extra that is not installed
        if (e.name or "").startswith("mlx_persona"):
            raise
        failed[info.name] = str(e)
from mlx_persona import backend
print(json.dumps({"same": dict(os.environ) == before, "setup_ran": backend._done["setup"],
                  "blas": backend.blas.status(), "jit": backend.jit.status(), "failed": failed,
                  "changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))}))
"""


def test_importing_mlx_persona_and_every_submodule_changes_nothing(tmp_path):
    env, roots = _fresh(tmp_path)
    # Compilers that leave a mark: none may run.
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name in ("g++", "gcc", "cc", "c++"):
        (fake / name).write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'compiled'}\nexit 1\n")
        (fake / name).chmod(0o755)
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    home_before = _files(roots[0])
    r, _ = _child(IMPORT_ALL, env)
    assert r["same"], r["changed"]
    assert not r["setup_ran"] and r["blas"] == [None, "not set up"] and r["jit"] == [None, "not set up"]
    assert not (tmp_path / "compiled").exists(), (tmp_path / "compiled").read_text()
    assert not roots[1].exists(), _files(roots[1])  # no cache folder at all
    assert _files(roots[2]) == set(), _files(roots[2])
    new_in_home = _files(roots[0]) - home_before
    assert not [p for p in new_in_home if "mlx_persona" in p], new_in_home
    assert len(r["failed"]) <= 3, r["failed"]  # only optional extras may be missing


@linux
def test_setup_after_mlx_was_imported_warns_once_on_stderr(tmp_path):
    env, _ = _fresh(tmp_path)
    code = """
    import json
    import mlx_lm
    import mlx_persona
    mlx_persona.backend.setup()
    mlx_persona.backend.setup()  # a second call says nothing more
    print(json.dumps(mlx_persona.backend.blas_status()))
    """
    (path, reason), err = _child(code, env)
    ours = [line for line in err.splitlines() if line.startswith("mlx_persona")]
    assert len(ours) == 1, err
    assert "slower" in ours[0] and "GFLOP/s" in ours[0] and "setup() before importing mlx" in ours[0]
    assert path is None and "before mlx_persona.backend.setup()" in reason


def test_setup_on_macos_changes_nothing_and_models_stay_mlx_lm_s(tiny_path, monkeypatch):
    from mlx_lm.models import gemma3_text

    from mlx_persona import backend
    from mlx_persona.backend import blas, cpu_ops, jit
    from mlx_persona.models import load_model

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(backend, "_done", {"setup": False})  # as in a fresh process
    rewrites = []
    monkeypatch.setattr(cpu_ops, "use_fast_gelu", lambda *a: rewrites.append("gelu"))
    monkeypatch.setattr(cpu_ops, "use_cpu_attention", lambda *a: rewrites.append("attention"))
    monkeypatch.setattr(blas, "setup", lambda: rewrites.append("blas"))
    monkeypatch.setattr(jit, "install", lambda: rewrites.append("jit"))
    env = dict(os.environ)
    backend.setup()
    assert dict(os.environ) == env and rewrites == [] and not backend._done["setup"]
    assert backend.blas_status() == (None, "not Linux: MLX uses Accelerate/Metal")
    assert not backend.cpu_rewrites_enabled()
    model, _ = load_model(tiny_path)
    assert rewrites == []
    assert all(type(layer.mlp) is gemma3_text.MLP for layer in model.model.layers)


SETUP = """
import json, os, stat, subprocess, sys
keys = ("PATH", "TMPDIR", "OPENBLAS_CORETYPE", "MKL_THREADING_LAYER", "LD_PRELOAD", "LD_LIBRARY_PATH")
before = dict(os.environ)
import mlx_persona
mlx_persona.backend.setup()
after = dict(os.environ)
from mlx_persona.backend import blas, jit, sgemm
import mlx.core as mx, numpy as np
k = float(np.random.default_rng().uniform(0.5, 1.5))
mx.eval(mx.compile(lambda x: mx.exp(x * k))(mx.arange(100, dtype=mx.float32)))
folder = jit.status()[0]
child = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                       capture_output=True, text=True, check=True).stdout
modes = {}
if folder:
    root = os.environ["MLX_PERSONA_CACHE"]
    p = folder
    while len(p) >= len(root):
        st = os.stat(p)
        modes[p] = [stat.S_IMODE(st.st_mode), st.st_uid]
        p = os.path.dirname(p)
maps = open("/proc/self/maps").read()
print(json.dumps({"same": after == before, "child_same": json.loads(child) == before,
                  "changed": sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
                  "folder": folder, "jit": jit.status()[1], "command": jit.last_command(),
                  "compiles": jit.compiles(), "modes": modes, "uid": os.getuid(),
                  "kernels": [n for n in os.listdir(folder + "/mlx/" + mx.__version__ + "/cpu")
                              if n.endswith(".so")] if folder else [],
                  "blas": blas.status(), "core": blas.core(), "sgemm": sgemm.active(), "bf16": sgemm.bf16_active(),
                  "loaded_from_cache": [l.split()[-1] for l in maps.splitlines()
                                        if os.environ["MLX_PERSONA_CACHE"] in l and l.endswith(".so")]}))
"""


@linux
@pytest.mark.parametrize("mode", [None, "bf16"])
def test_setup_changes_mlx_alone_and_its_kernels_are_built_privately(tmp_path, mode):
    if mode == "bf16" and sgemm.find_mkl() is None:
        pytest.skip("needs oneMKL")
    env, roots = _fresh(tmp_path, **({sgemm.ENV: mode} if mode else {}))
    env.pop("OPENBLAS_CORETYPE", None)  # so that setup() picks the kernels, for the load alone
    env.pop("MKL_THREADING_LAYER", None)
    r, err = _child(SETUP, env)
    assert r["same"], r["changed"]  # PATH, TMPDIR, OPENBLAS_CORETYPE, MKL_THREADING_LAYER, ...
    assert r["child_same"]  # a child process started after setup() sees the original environment
    assert "warning" not in err, err
    assert r["blas"][1] == "loaded" and r["sgemm"] and r["bf16"] == (mode == "bf16"), r
    from mlx_persona.backend import cpu_flags, openblas_coretype

    if mode is None and openblas_coretype(cpu_flags()):
        assert r["core"].lower() == openblas_coretype(cpu_flags()).lower()  # set for the load, then unset
    if r["folder"] is None:
        pytest.skip(f"MLX's compiler is not changed here: {r['jit']}")
    assert r["folder"].startswith(str(roots[1] / "jit")), r["folder"]
    for path, (perm, uid) in r["modes"].items():  # every folder from the cache root down: ours, 0700
        assert perm == 0o700 and uid == r["uid"], (path, oct(perm), uid)
    assert r["compiles"] >= 1 and r["kernels"], r
    command = r["command"]
    assert command.split()[0].startswith("/") and "-march=native" in command and "-fno-math-errno" in command
    assert "-std=c++17 -O3 -Wall -fPIC -shared" in command and r["folder"] in command
    assert all(p.startswith(str(roots[1])) for p in r["loaded_from_cache"])


def test_private_dir_makes_0700_folders_and_refuses_what_others_can_write(tmp_path):
    made = private_dir(tmp_path / "root", "a", "b")
    for p in (tmp_path / "root", made.parent, made):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
    assert private_dir(tmp_path / "root", "a", "b") == made  # again: the same, accepted
    (tmp_path / "root" / "a").chmod(0o777)
    with pytest.raises(UnsafeFolder, match=r"root/a is writable by group and others \(mode 0777\)"):
        private_dir(tmp_path / "root", "a", "b")
    (tmp_path / "root" / "a").chmod(0o700)
    (made / "lib.so").write_bytes(b"")
    (made / "lib.so").chmod(0o666)
    with pytest.raises(UnsafeFolder, match="lib.so is writable by group and others"):
        folders.check_file(made / "lib.so")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "root" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeFolder, match="symbolic link"):
        private_dir(tmp_path / "root", "link")


@as_root
def test_private_dir_refuses_a_folder_of_another_user(tmp_path):
    made = private_dir(tmp_path / "root", "a")
    os.chown(made, NOBODY, NOBODY)
    with pytest.raises(UnsafeFolder, match=f"owned by uid {NOBODY}, not by this user"):
        private_dir(tmp_path / "root", "a")


@linux
@pytest.mark.parametrize("how", ["mode 0777", "owned by nobody"])
def test_setup_refuses_folders_others_can_write_and_loads_nothing_from_them(tmp_path, how):
    if how == "owned by nobody" and os.getuid() != 0:
        pytest.skip("needs root to give a folder to another user")
    env, roots = _fresh(tmp_path)
    env.pop("OPENBLAS_CORETYPE", None)
    bad = [roots[1] / "jit", roots[1] / "sgemm"]
    roots[1].mkdir(mode=0o700)
    for folder in bad:
        folder.mkdir()
        if how == "mode 0777":
            folder.chmod(0o777)
        else:
            os.chown(folder, NOBODY, NOBODY)
    r, err = _child(SETUP, env)
    assert r["same"] and r["child_same"], r["changed"]
    warnings = [line for line in err.splitlines() if line.startswith("mlx_persona: warning")]
    assert len(warnings) == 2, err  # one for each folder, naming it and what is wrong
    why = "writable by group and others (mode 0777)" if how == "mode 0777" else f"owned by uid {NOBODY}"
    for folder in bad:
        assert any(str(folder) in w and why in w for w in warnings), (folder, warnings)
    # Built instead in a private folder of this run (never MLX's shared $TMPDIR/mlx), removed at exit.
    run = Path(r["folder"]).parents[1]  # TMPDIR/mlx_persona-run-XXXX/jit/<key>
    assert run.parent == roots[2] and run.name.startswith("mlx_persona-run-"), r["folder"]
    assert "for this run alone" in r["jit"] and str(run) in r["command"] and r["kernels"], r
    assert r["sgemm"] and r["blas"][1] == "loaded", r
    assert r["loaded_from_cache"] == [] and _files(*bad) == set()  # nothing built there, nothing loaded
    assert not run.exists() and not (roots[2] / "mlx").exists()


HOOK = """
import ctypes, json, shutil
from mlx_persona.backend import jit, native
lib = ctypes.CDLL(str(native.build("jit_hook.cpp", shutil.which("g++"), jit.hook_flags(), folder="jit-hook",
                                   name="libmlxp_jit.so", libs=("-ldl",))))
lib.mlxp_jit_install.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
lib.mlxp_jit_error.restype = ctypes.c_char_p
out = [lib.mlxp_jit_install(b"g++", b"/nonexistent"), lib.mlxp_jit_error().decode()]  # no libmlx.so yet
import mlx.core
out += [lib.mlxp_jit_install(b"g++", b"/nonexistent"), lib.mlxp_jit_error().decode()]
out += [lib.mlxp_jit_install(b"g++", b"/nonexistent"), lib.mlxp_jit_error().decode()]
print(json.dumps(out))
"""


@linux
@pytest.mark.skipif(shutil.which("g++") is None, reason="the hook is built with g++")
def test_the_hook_says_why_it_cannot_install_and_installs_once(tmp_path):
    env, _ = _fresh(tmp_path)
    (rc1, why1, rc2, why2, rc3, why3), _ = _child(HOOK, env)
    assert (rc1, why1) == (2, "libmlx.so is not loaded")
    assert rc2 == 0 and why2.startswith("installed in ") and why2.endswith("libmlx.so"), why2
    assert (rc3, why3) == (7, "installed already")
