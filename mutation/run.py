"""Mutation testing with cosmic-ray, one target of mutation/targets.toml at a time.

    python mutation/run.py                      # every target
    python mutation/run.py batching tuning-loss # some
    python mutation/run.py --survivors batching # re-test only the survivors of the last run
    python mutation/run.py --survivors batching --tests tests/test_x_mutants.py
                                                # ... with only the tests written since (the survivors
                                                # passed the others already): minutes instead of an hour
    python mutation/run.py --resume batching    # finish an interrupted run (with the current tests)
    python mutation/run.py --list

Each run works in a fresh copy of the repository (tracked and untracked, not ignored, files) under
build/mutate/NAME/src, because cosmic-ray writes each mutant into the source file itself: the
working tree is never touched, so tests run elsewhere meanwhile see the real code. Per target:
a clean run of its tests (must pass; its time sets the per-mutant timeout), `cosmic-ray init`,
the operator and function filters of targets.toml (and none inside annotations), `cosmic-ray exec`
(one subprocess per mutant), then a summary (build/mutate/NAME/summary.txt) listing every survivor with its diff.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import toml as tomllib  # cosmic-ray depends on it

REPO = Path(__file__).resolve().parents[1]
TARGETS = REPO / "mutation" / "targets.toml"
BUILD = REPO / "build" / "mutate"


def load_targets() -> dict:
    text = TARGETS.read_text()
    return tomllib.loads(text)


def copy_repo(dst: Path) -> None:
    """The repository's files as `git ls-files` sees them (tracked + untracked, not ignored)."""
    if dst.exists():
        shutil.rmtree(dst)
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def test_command(target: dict, src: Path) -> str:
    args = []
    for t in target["tests"]:
        path = t.split("::")[0]
        if t.startswith("tests/") and not (src / path).exists():
            continue
        args.append(t)
    return shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args])


def write_config(path: Path, module: str, command: str, timeout: float) -> None:
    path.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout:.0f}.0\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n"
        "\n[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions, as (line, column), of every annotation in `source`.

    With ``from __future__ import annotations`` (the package's modules have it) annotations are never
    evaluated, so a mutant inside one (``str | Path`` -> ``str & Path``) cannot change behaviour; without
    it the module fails to import. Either way it tells nothing, so such mutants are skipped.
    """
    import ast

    spans = []
    for node in ast.walk(ast.parse(source)):
        found = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            found = [x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg)
                     if x is not None and x.annotation is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            found = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in found if n is not None]
    return spans


def apply_filters(session: Path, src: Path, exclude_operators: list[str], functions: list[str]) -> int:
    """Marks as skipped the mutations of excluded operators, those outside `functions` and in annotations."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    pattern = re.compile("|".join(f"(?:{e})" for e in exclude_operators)) if exclude_operators else None
    wanted = set(functions)
    spans: dict[str, list] = {}

    def in_annotation(m) -> bool:
        path = str(m.module_path)
        if path not in spans:
            spans[path] = annotation_spans((src / path).read_text())
        return any(a <= tuple(m.start_pos) and tuple(m.end_pos) <= b for a, b in spans[path])

    with use_db(str(session), WorkDB.Mode.open) as db:
        skip = []
        for item in db.pending_work_items:
            for m in item.mutations:
                if (pattern and pattern.match(m.operator_name)) or (wanted and m.definition_name not in wanted) \
                        or in_annotation(m):
                    skip.append(item.job_id)
                    break
        if skip:
            db.set_multiple_results(skip, WorkResult(output="filtered by mutation/run.py",
                                                     worker_outcome=WorkerOutcome.SKIPPED))
        return db.num_work_items - len(skip)


def reset_survivors(session: Path) -> int:
    """Forgets the results of surviving mutants so that `cosmic-ray exec` runs them again."""
    import sqlite3

    con = sqlite3.connect(session)
    with con:
        n = con.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'").rowcount
    con.close()
    return n


def _killer(output: str | None) -> str | None:
    """The first failing test in pytest's output (-x stops there), as path::name."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+::[^\s]+|\S+\.py)", output or "", re.MULTILINE)
    return found.group(1) if found else None


def summarise(name: str, module: str, session: Path, wall: float) -> str:
    """Counts, every survivor with its diff, and the mutants that only the *_mutants.py tests kill.

    The target's tests run in the order listed, the *_mutants.py file last and -x: a mutant that fails
    there passed every other test first.
    """
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    counts = {"total": 0, "killed": 0, "timeout": 0, "survived": 0, "incompetent": 0, "pending": 0}
    survivors, late = [], []
    with use_db(str(session), WorkDB.Mode.open) as db:
        results = dict(db.results)
        for item in db.work_items:
            r = results.get(item.job_id)
            if r is not None and r.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            m = item.mutations[0]
            where = f"{m.module_path}:{m.start_pos[0]} {m.operator_name} in {m.definition_name}"
            counts["total"] += 1
            if r is None:
                counts["pending"] += 1
            elif r.test_outcome == TestOutcome.SURVIVED:
                counts["survived"] += 1
                survivors.append(f"--- {where}\n{r.diff}")
            elif r.test_outcome == TestOutcome.KILLED and r.output == "timeout":
                counts["timeout"] += 1
            elif r.test_outcome == TestOutcome.KILLED:
                counts["killed"] += 1
                killer = _killer(r.output)
                if killer and "_mutants.py" in killer:
                    late.append(f"{where}: killed by {killer}\n" + "\n".join(
                        line for line in (r.diff or "").splitlines()
                        if line[:1] in "+-" and not line.startswith(("+++", "---"))))
            else:
                counts["incompetent"] += 1
    head = (f"{name} ({module}): {counts['total']} mutants, {counts['killed']} killed, {counts['timeout']} timeouts, "
            f"{counts['survived']} survived, {counts['incompetent']} incompetent, {counts['pending']} pending; "
            f"{wall:.0f} s")
    parts = [head, f"\n{len(late)} killed only by the *_mutants.py tests:", *late,
             f"\n{len(survivors)} survived:", *survivors]
    return "\n".join(parts) + "\n"


def run_target(name: str, cfg: dict, mode: str) -> int:
    target = cfg["targets"][name]
    settings = cfg.get("settings", {})
    module = cfg["paths"][target["module"]]
    work = BUILD / name
    src, session, config = work / "src", work / "session.sqlite", work / "config.toml"
    env = dict(os.environ, PYTHONPATH=str(src), MLX_PERSONA_TEST_CACHE=str(BUILD / "cache"), HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    (BUILD / "cache").mkdir(parents=True, exist_ok=True)
    start = time.time()
    if mode != "fresh":
        if not session.exists():
            sys.exit(f"{name}: no previous session in {work}")
        copy_repo(src)  # the tests may have changed since
        if mode == "survivors":
            print(f"{name}: re-testing {reset_survivors(session)} survivors", flush=True)
    else:
        work.mkdir(parents=True, exist_ok=True)
        session.unlink(missing_ok=True)
        copy_repo(src)
    command = test_command(target, src)
    t0 = time.time()
    clean = subprocess.run(shlex.split(command), check=False, cwd=src, env=env, capture_output=True, text=True)
    took = time.time() - t0
    if clean.returncode != 0:
        print(clean.stdout[-3000:], clean.stderr[-3000:])
        sys.exit(f"{name}: the tests fail without any mutation; fix them first ({command})")
    timeout = max(float(settings.get("min-timeout", 60)), float(settings.get("timeout-factor", 4)) * took)
    write_config(config, module, command, timeout)
    print(f"{name}: clean run {took:.1f} s, timeout {timeout:.0f} s per mutant\n  {command}", flush=True)
    if mode == "fresh":
        subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(session)], cwd=src, env=env,
                       check=True)
        n = apply_filters(session, src, settings.get("exclude-operators", []), target.get("functions", []))
        print(f"{name}: {n} mutants to run", flush=True)
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "exec", str(config), str(session)], cwd=src, env=env,
                   check=True)
    summary = summarise(name, module, session, time.time() - start)
    (work / "summary.txt").write_text(summary)
    print(summary, flush=True)
    return 0


def main() -> int:
    cfg = load_targets()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help=f"some of: {', '.join(cfg['targets'])} (default: all)")
    p.add_argument("--survivors", action="store_true", help="re-run only the previous run's survivors")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run")
    p.add_argument("--tests", nargs="+", metavar="TEST",
                   help="with --survivors: re-test with these tests only (the survivors passed the target's others)")
    p.add_argument("--list", action="store_true", help="list the targets and their modules")
    a = p.parse_args()
    if a.list:
        for name, t in cfg["targets"].items():
            print(f"{name:18s} {cfg['paths'][t['module']]}")
        return 0
    for name in a.targets or list(cfg["targets"]):
        if name not in cfg["targets"]:
            sys.exit(f"unknown target {name!r}; see --list")
        if a.tests:
            if not a.survivors:
                sys.exit("--tests goes with --survivors")
            cfg["targets"][name] = {**cfg["targets"][name], "tests": a.tests}
        run_target(name, cfg, "survivors" if a.survivors else "resume" if a.resume else "fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
