"""Generation settings and logits processing with Hugging Face transformers' semantics.

Settings tuned with ``transformers``' ``generate`` must behave the same here. mlx-lm's own
``make_sampler`` / ``make_logits_processors`` change the output distribution: no
``min_new_tokens``, a repetition penalty over the last 20 tokens only, top-p and min-p computed
before temperature and before top-k, and bf16 arithmetic on Metal. This package re-implements the
part of transformers' chain we support, in transformers' order, as vectorised MLX ops:

1. ``RepetitionPenaltyLogitsProcessor``    -- logits processor
2. ``NoRepeatNGramLogitsProcessor``        -- logits processor
3. ``MinNewTokensLengthLogitsProcessor``   -- logits processor
4. ``TemperatureLogitsWarper``             -- sampler, sampling only
5. ``TopKLogitsWarper``                    -- sampler, sampling only
6. ``TopPLogitsWarper``                    -- sampler, sampling only
7. ``MinPLogitsWarper``                    -- sampler, sampling only
8. ``torch.multinomial(softmax)`` / ``torch.argmax`` -- sampler: categorical draw / argmax

(classes from ``transformers/generation/logits_process.py``). The order is the one
``GenerationMixin._get_logits_processor`` builds in transformers 5.x: processors first, then
the "warpers" only when ``do_sample``. Steps 1-3 commute anyway (each rescales a logit
monotonically or sets it to -inf, which the penalty keeps at -inf); the warpers do not.

Known, deliberate differences (all at float-rounding or tie level):

* A group of exactly tied logits straddling the top-p cut is kept whole; transformers keeps an
  arbitrary part of it (whatever ``torch.sort`` puts last). Ties at the top-k cut are exact
  (transformers keeps them all, so do we).
* The sampler sees mlx-lm's ``logits - logsumexp(logits)`` rather than the logits; every step is
  shift-invariant, so only rounding differs (e.g. two logits 1 ulp apart could become equal).

Two entry points share the same building blocks:

* :func:`process_logits` -- one step, stateless: the log-probabilities the sampler draws from.
  Used by tests and anywhere a whole history is at hand.
* :func:`make_sampler_and_processors` -- a ``(sampler, logits_processors)`` pair for
  ``mlx_lm.generate.generate_step`` / ``mlx_lm.stream_generate``. Build a fresh pair for every
  generation call (they keep per-generation state: where the prompt ends, and the PRNG key).

Where each setting is applied (the modules, in chain order):

* :mod:`~mlx_persona.sampling.config` -- :class:`GenerationConfig` (every setting, validated),
  :data:`PRESETS` / :func:`preset`, and the ``generation_config.json`` form.
* :mod:`~mlx_persona.sampling.processors` -- steps 1-3: ``repetition_penalty``,
  ``no_repeat_ngram_size``, ``min_new_tokens`` (``apply_repetition_penalty``,
  ``apply_no_repeat_ngram``, ``apply_min_new_tokens``; ``apply_processors`` runs them in order).
* :mod:`~mlx_persona.sampling.warpers` -- steps 4-7: ``temperature``, ``top_k``, ``top_p``,
  ``min_p`` (``warp``; ``sample_top_k`` draws from the same distribution without a vocabulary mask).
* :mod:`~mlx_persona.sampling.sampler` -- step 8 and ``seed`` (:class:`HFSampler`), the mlx-lm
  processor (:class:`HFLogitsProcessor`) and both entry points.
* :mod:`~mlx_persona.sampling.inputs` -- token and logits conversions they share.

``max_new_tokens`` and ``stop`` belong to the generation loop (:mod:`mlx_persona.generation`).
"""

from mlx_persona.sampling.config import PRESETS, GenerationConfig, preset
from mlx_persona.sampling.sampler import (
    HFLogitsProcessor,
    HFSampler,
    make_sampler_and_processors,
    process_logits,
)

__all__ = [
    "PRESETS",
    "GenerationConfig",
    "HFLogitsProcessor",
    "HFSampler",
    "make_sampler_and_processors",
    "preset",
    "process_logits",
]
