"""The replies to rate, into the database: read from an eval folder's ``results.jsonl``, or generated
from models and a prompt file (the persona preset, one reply per prompt and model, decoded in batches).

A prompt's key is its index in the prompt file, which is also the ``prompt_id`` ``eval`` writes, so the
two sources agree. From ``results.jsonl`` the reply of the lowest seed is taken for each prompt and
model; the system prompt the eval used (its ``summary.json``), if any, goes into the chat messages.
Replies the database holds already are neither read again nor generated again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mlx_persona.rate.store import RateError, add_items, messages_json, stored_keys
from mlx_persona.safe_io import InputError


def _messages(system: str | None, prompt: str) -> str | None:
    if not system:
        return None
    return messages_json([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


def _result_row(path: Path, number: int, line: bytes) -> dict:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RateError(f"{path}:{number}: not valid UTF-8 (byte {e.start} of the line)") from None
    except ValueError as e:
        raise RateError(f"{path}:{number}: invalid JSON: {e}") from None
    except RecursionError:
        raise RateError(f"{path}:{number}: invalid JSON: nested too deep") from None
    if not isinstance(row, dict):
        raise RateError(f"{path}:{number}: expected an object, as `mlx-persona eval` writes")
    for key, kind in (("model", str), ("prompt", str), ("text", str), ("prompt_id", int)):
        if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
            raise RateError(f"{path}:{number}: {key}: expected {'a string' if kind is str else 'an integer'}, "
                            "as `mlx-persona eval` writes")
    seed = row.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise RateError(f"{path}:{number}: seed: expected an integer")
    return row


def read_results(path: str | Path) -> list[dict]:
    """The items of an eval's ``results.jsonl`` (or its folder): the lowest seed's reply per prompt and model."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise RateError(f"{path}: no such results file (an `mlx-persona eval` folder's results.jsonl)")
    from mlx_persona.data.pair_sources import eval_system

    try:
        system = eval_system(path)
        data = path.read_bytes()
    except (InputError, OSError) as e:
        raise RateError(str(e) if isinstance(e, InputError) else f"{path}: cannot be read ({e.strerror})") from None
    best: dict[tuple[int, str], tuple[int, dict]] = {}
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        row = _result_row(path, number, line)
        key, seed = (row["prompt_id"], row["model"]), row.get("seed", 0)
        if key not in best or seed < best[key][0]:
            best[key] = (seed, row)
    if len({m for _, m in best}) < 2:
        raise RateError(f"{path}: replies of fewer than two models; rating compares two or more")
    return [{"prompt_key": str(pid), "prompt": row["prompt"], "messages": _messages(system, row["prompt"]),
             "model": model, "reply": row["text"]} for (pid, model), (_, row) in sorted(best.items())]


def generate_items(conn, entries, prompts: list[str], *, seed: int = 0, batch_size: int = 0,
                   system: str | None = None, log=print) -> int:
    """Generates (and stores, one model at a time) the replies the database lacks; how many were new."""
    from mlx_persona.batch_generation import batch_generate, default_batch_size
    from mlx_persona.eval.entries import load_entry, release
    from mlx_persona.generation import build_prompt
    from mlx_persona.sampling import preset

    config = dataclasses.replace(preset("persona"), seed=seed)
    stored, added = stored_keys(conn), 0
    for entry in entries:
        missing = [i for i in range(len(prompts)) if (str(i), entry.name) not in stored]
        if not missing:
            log(f"{entry.name}: all {len(prompts)} replies stored already")
            continue
        model, tok, end_ids = load_entry(entry, log)
        ids = [build_prompt(tok, prompts[i], system=system) for i in missing]
        batch = batch_size or default_batch_size(model, max(map(len, ids)) + config.max_new_tokens)
        log(f"  {entry.name}: {len(missing)} replies, {min(batch, len(missing))} at a time")
        results = batch_generate(model, tok, ids, config, batch_size=batch, end_ids=end_ids)
        added += add_items(conn, [{"prompt_key": str(i), "prompt": prompts[i], "messages": _messages(system, prompts[i]),
                                   "model": entry.name, "reply": r.text} for i, r in zip(missing, results)])
        del model, tok
        release()
    return added
