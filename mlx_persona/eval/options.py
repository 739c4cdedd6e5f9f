"""What an evaluation runs on, besides the models and the generation settings: the prompt set, the persona
card, the style and validation data, the seeds -- and the error a user can fix in any of them.

Everything here only reads and checks files; nothing loads a model. :func:`check_inputs` runs before any
model is built or trained, so a typo in a path fails in a second, not after an hour of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mlx_persona.eval.metrics import DEFAULT_EARLY_TOKENS
from mlx_persona.paths import SHIPPED_NAME, data_path

# The shipped Bluey files (see mlx_persona.paths.data_path), named as a user would name them.
DEFAULT_PROMPTS = str(SHIPPED_NAME / "eval_prompts.jsonl")
DEFAULT_PERSONA = str(SHIPPED_NAME / "persona.yaml")
DEFAULT_TRAIN = str(SHIPPED_NAME / "train.jsonl")
DEFAULT_VALID = str(SHIPPED_NAME / "valid.jsonl")


class EvalError(ValueError):
    """A problem the user can fix (a model argument, prompt file, grid or recipe); the message says where."""


@dataclass
class EvalOptions:
    """What an evaluation runs on, besides the models and the generation settings."""

    prompts: str = DEFAULT_PROMPTS
    persona: str = DEFAULT_PERSONA
    train: str = DEFAULT_TRAIN  # style reference: its assistant replies
    valid: str | None = DEFAULT_VALID  # validation loss (None: skip) and the reference row
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    limit: int = 0  # first N prompts; 0 = all
    persona_system: bool = False  # the training data has no system turn: off unless asked
    early_tokens: int = DEFAULT_EARLY_TOKENS
    max_seq_len: int = 1024  # validation examples are truncated to this, as in training
    batch_size: int = 0  # replies decoded together; 0 = from memory (batch_generation.default_batch_size)
    ratings: str | None = None  # a `mlx-persona rate` database whose summary the report shows

    def validate(self) -> "EvalOptions":
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise EvalError(f"seeds: must be a non-empty list of integers >= 0, got {self.seeds!r}")
        if self.limit < 0:
            raise EvalError(f"limit: must be >= 0, got {self.limit}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 0:
            raise EvalError(f"batch_size: must be an integer >= 0 (0 = chosen from memory), got {self.batch_size!r}")
        if self.early_tokens < 1:
            raise EvalError(f"early_tokens: must be >= 1, got {self.early_tokens}")
        return self


def load_prompts(path: str | Path, limit: int = 0) -> list[str]:
    """The ``{"prompt": "..."}`` lines of a JSONL file (first `limit` only when > 0).

    Every bad line is reported (``path:line: why``), not just the first, so one run fixes the file.
    """
    path = data_path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such prompt file")
    prompts, problems = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{i}: invalid JSON: {e}")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            problems.append(f'{path}:{i}: expected {{"prompt": "a non-empty string"}}')
            continue
        prompts.append(row["prompt"])
    if problems:
        raise EvalError("\n".join(problems))
    if not prompts:
        raise EvalError(f"{path}: no prompts")
    return prompts[:limit] if limit > 0 else prompts


def assistant_replies(path: str | Path) -> list[str]:
    """Every assistant message of a training-data JSONL (or a data folder's ``train.jsonl``)."""
    from mlx_persona.data import load_jsonl

    path = data_path(path)
    if path.is_dir():
        path = path / "train.jsonl"
    return [m["content"] for ex in load_jsonl(path) for m in ex.messages if m["role"] == "assistant"]


def check_inputs(options: EvalOptions) -> None:
    """Checks the prompts, persona card and data files of `options` without building anything."""
    from mlx_persona.eval.persona import PersonaError, load_persona

    options.validate()
    load_prompts(options.prompts, options.limit)
    try:
        load_persona(options.persona)
    except PersonaError as e:
        raise EvalError(str(e)) from None
    for key in ("train", "valid"):
        path = getattr(options, key)
        if path is not None and not data_path(path).exists():
            raise EvalError(f"eval.{key}: {path}: no such file")
