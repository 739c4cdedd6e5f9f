"""Models: resolve a model spec, load it with mlx-lm, and build the built-in models in code.

- :mod:`.load`: ``resolve_model`` (local folder, hub id, ``builtin:NAME``) and ``load_model``;
- :mod:`.builtin`: the built-in Gemma 3 shapes with random weights (``init_model``, ``gemma3_config``);
- :mod:`.errors`: ``ModelError``.

The CPU rewrites ``load_model`` applies on Linux live with the rest of the Linux speed code, in
:mod:`mlx_persona.backend.cpu_ops`.
"""

from mlx_persona.models.builtin import builtin_names, gemma3_config, init_model
from mlx_persona.models.errors import ModelError
from mlx_persona.models.load import load_model, resolve_model

__all__ = ["ModelError", "builtin_names", "gemma3_config", "init_model", "load_model", "resolve_model"]
