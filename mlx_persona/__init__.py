"""mlx_persona: teach small chat models a personality on Apple's MLX.

    import mlx_persona
    mlx_persona.backend.setup()  # Linux: the CPU speed layer, before mlx is imported (no-op on a Mac)
    result = mlx_persona.generate("builtin:tiny", "Hi Bluey!", "persona", seed=0)
    print(result.text, result.stop_reason, result.decode_tps)

Importing the package changes nothing (no environment variable, file or compiler); see
:mod:`mlx_persona.backend`.
"""

# For mlx_persona.backend.setup(); importing the backend does nothing.
from mlx_persona import backend
from mlx_persona.version import __version__

__all__ = ["__version__", "backend", "generate", "stream_generate"]

_LOADED: dict = {}


def _resolve(model, tokenizer, adapter):
    if tokenizer is not None:
        return model, tokenizer
    from mlx_persona.runs import resolve_run

    spec, adapter = resolve_run(str(model), str(adapter) if adapter else None, model_flag="model")
    key = (spec, adapter)
    if key not in _LOADED:
        from mlx_persona.models import load_model

        _LOADED.clear()  # keep at most one model alive
        _LOADED[key] = load_model(spec, adapter_path=adapter)
    return _LOADED[key]


def generate(model, prompt, config=None, *, tokenizer=None, adapter=None, **kwargs):
    """Generates a reply; returns a :class:`mlx_persona.generation.GenerationResult`.

    Args:
        model: a model spec (folder, hub id, ``builtin:NAME``; loaded and kept) or a loaded model.
        prompt: a user message, a list of ``{"role", "content"}`` messages, or token ids.
        config: a :class:`mlx_persona.sampling.GenerationConfig` or a preset name (``"persona"``,
            ``"greedy"``, ``"default"``); default settings if None.
        tokenizer: required when `model` is an already loaded model.
        adapter: an output folder of ``mlx-persona train`` (a LoRA/DoRA run or a full fine-tune); `model`
            may also be a run folder, as on the command line.
        **kwargs: see :func:`mlx_persona.generation.stream_generate` (system, end_ids, ...), and any
            :class:`~mlx_persona.sampling.GenerationConfig` field replacing the config's (``seed=3``,
            ``max_new_tokens=64``, ...).
    """
    from mlx_persona import generation

    m, tok = _resolve(model, tokenizer, adapter)
    return generation.generate(m, tok, prompt, config, **kwargs)


def stream_generate(model, prompt, config=None, *, tokenizer=None, adapter=None, **kwargs):
    """Like :func:`generate`, yielding :class:`mlx_persona.generation.Chunk` as text arrives."""
    from mlx_persona import generation

    m, tok = _resolve(model, tokenizer, adapter)
    return generation.stream_generate(m, tok, prompt, config, **kwargs)
