"""Generation settings (:class:`GenerationConfig`, with transformers' meaning), their validation,
their ``generation_config.json`` form, and the named presets (:data:`PRESETS`, :func:`preset`).

Where each setting is applied: ``repetition_penalty``, ``no_repeat_ngram_size`` and
``min_new_tokens`` in :mod:`mlx_persona.sampling.processors`; ``temperature``, ``top_k``, ``top_p``
and ``min_p`` in :mod:`mlx_persona.sampling.warpers`; ``seed`` in
:class:`mlx_persona.sampling.sampler.HFSampler`; ``max_new_tokens`` and ``stop`` in the
generation loop (:mod:`mlx_persona.generation`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class GenerationConfig:
    """Generation settings with transformers' meaning.

    Attributes:
        max_new_tokens: Upper bound on generated tokens (used by the generation loop).
        min_new_tokens: While fewer new tokens than this exist, every end-of-sequence id is banned
            (transformers' ``MinNewTokensLengthLogitsProcessor``). May exceed ``max_new_tokens``,
            as in transformers (generation then simply runs to ``max_new_tokens``).
        temperature: 0 means greedy decoding (transformers' ``do_sample=False``); otherwise logits
            are divided by it before top-k/top-p/min-p.
        top_k: Keep the ``top_k`` highest logits (ties at the k-th value are all kept); 0 = off.
        top_p: Nucleus sampling: in (0, 1]; 1 = off.
        min_p: Drop tokens whose probability is below ``min_p`` times the top token's; 0 = off.
        repetition_penalty: Sign-aware penalty over every token of prompt + generated; 1 = off.
        no_repeat_ngram_size: Ban tokens that would repeat an n-gram of this size; 0 = off.
        stop: Stop strings; used by the generation loop, not by the logits processing.
        seed: Seed of the sampler's private generator (an MLX key chain; on the CPU the draw kernel's
            counter-based one); None draws from MLX's global RNG.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        """True when tokens are drawn at random (temperature > 0), False for greedy decoding."""
        return self.temperature > 0

    def validate(self) -> GenerationConfig:
        """Check every field for impossible values.

        Returns:
            ``self``, so that ``cfg = GenerationConfig(...).validate()`` reads naturally.

        Raises:
            ValueError: naming the offending field, its value and what is allowed.
        """

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

        def is_num(v: Any) -> bool:
            return (is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"GenerationConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "an integer >= 1")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            fail("min_new_tokens", "an integer >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "a number in (0, 1] (1 = off)")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "a number in [0, 1] (0 = off)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "a finite number > 0 (1 = off)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "an integer >= 0 (0 = off)")
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            fail("stop", "a list of non-empty strings")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            fail("seed", "None or an integer in [0, 2**64)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain (JSON/YAML-serialisable) dict; inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """Build a validated config from a dict (e.g. a YAML section).

        Args:
            data: Field names to values; missing fields take their defaults.

        Returns:
            The validated :class:`GenerationConfig`.

        Raises:
            ValueError: for an unknown key (named in the message) or an invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown generation setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        if "stop" in values and isinstance(values["stop"], tuple):
            values["stop"] = list(values["stop"])
        return cls(**values).validate()

    def to_hf_generation_config(self) -> dict[str, Any]:
        """The keys of transformers' ``generation_config.json`` that reproduce these settings.

        Sampling-only keys are always written explicitly when sampling, because transformers fills
        missing ones with its own defaults (notably ``top_k=50``). For greedy decoding they are
        left out: transformers ignores them with ``do_sample=False`` and warns about them, and
        ``temperature=0.0`` is not a value transformers accepts. ``min_p`` is written only when set.
        ``stop`` and ``seed`` have no generation_config.json counterpart (transformers'
        ``stop_strings`` needs the tokenizer passed to ``generate``), and end-of-sequence ids come
        from the model, so neither appears here.

        Returns:
            A dict suitable for ``transformers.GenerationConfig(**d)`` or ``json.dump``.
        """
        self.validate()
        out: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            out["temperature"] = float(self.temperature)
            out["top_k"] = int(self.top_k)
            out["top_p"] = float(self.top_p)
            if self.min_p > 0:
                out["min_p"] = float(self.min_p)
        out["repetition_penalty"] = float(self.repetition_penalty)
        out["no_repeat_ngram_size"] = int(self.no_repeat_ngram_size)
        out["min_new_tokens"] = int(self.min_new_tokens)
        out["max_new_tokens"] = int(self.max_new_tokens)
        return out


PRESETS: dict[str, GenerationConfig] = {
    "persona": GenerationConfig(
        max_new_tokens=256,
        min_new_tokens=50,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        repetition_penalty=1.1,
    ),
    "greedy": GenerationConfig(temperature=0.0),
}


def preset(name: str) -> GenerationConfig:
    """A copy of a named preset (safe to modify).

    Args:
        name: A key of :data:`PRESETS`.

    Returns:
        A deep copy of the preset.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(
            f"unknown generation preset {name!r}; known: {', '.join(sorted(PRESETS))}"
        ) from None

