"""Test-only: hold a process at a named point, so that a test can kill it (or let it go on) exactly there.

Nothing here runs unless ``MLX_PERSONA_TEST_HOLD`` is set; production code only calls :func:`hold`
(a dictionary look-up when unset). The tests of crashes, resume and the output-folder lock use it
instead of racing on timing.

``MLX_PERSONA_TEST_HOLD=POINT[,POINT...]`` names the points; those that exist:

- ``start``: ``train`` has taken the output folder's lock and done nothing else yet (the folder is
  as it found it);
- ``step:N``: optimizer step N is done and its ``metrics.jsonl`` row written; its validation and
  checkpoint are not;
- ``save:N:FILE``: inside the checkpoint save of step N, once ``FILE`` (``weights.safetensors``,
  ``optimizer.safetensors``, ``state.json``, ``manifest.json``) is written to the temporary folder;
  ``save:N:renamed``: the checkpoint is in place, old ones not yet pruned;
- ``results``: the loop is over (its last checkpoint saved), no result file written yet;
- ``serve:token:N``: a generation of ``mlx-persona serve`` has handed back its N-th piece of text
  (:mod:`mlx_persona.serve.worker`).

At a point, the process writes ``held POINT pid PID`` to the file ``MLX_PERSONA_TEST_HOLD_FILE`` (one
rename, so it is never seen half-written) and waits until the test deletes that file, then goes on; a
later point writes it again. Without ``MLX_PERSONA_TEST_HOLD_FILE`` the line goes to stderr and the
process waits until it is killed.
"""

from __future__ import annotations

import os
import sys
import time

HOLD = "MLX_PERSONA_TEST_HOLD"
HOLD_FILE = "MLX_PERSONA_TEST_HOLD_FILE"


def requested() -> bool:
    """Whether any hold point is set (callers may skip installing their hook otherwise)."""
    return bool(os.environ.get(HOLD))


def hold(point: str) -> None:
    """Test-only: waits at `point` if ``MLX_PERSONA_TEST_HOLD`` names it (see the module docstring)."""
    points = os.environ.get(HOLD)
    if not points or point not in points.split(","):
        return
    line = f"held {point} pid {os.getpid()}\n"
    path = os.environ.get(HOLD_FILE)
    if not path:
        sys.stderr.write(line)
        sys.stderr.flush()
        while True:
            time.sleep(1)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(line)
    os.replace(tmp, path)
    while os.path.exists(path):
        time.sleep(0.01)
