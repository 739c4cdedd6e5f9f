"""Training data: JSONL formats and validation (``formats``), chat-template rendering and loss masks
(``masks``), length statistics (``stats``), and the built-in models' tokenizer (``tokenizer``)."""

from mlx_persona.data.formats import (
           FORMATS,
           DataError,
           Example,
           load_jsonl,
           load_splits,
)
from mlx_persona.data.masks import (
           EncodedDataset,
           encode_example,
           prepare_dataset,
           render,
           template_supports_system,
)
from mlx_persona.data.stats import compute_stats, format_stats

__all__ = ["DataError", "Example", "EncodedDataset", "FORMATS", "load_jsonl", "load_splits",
           "template_supports_system", "render", "encode_example", "prepare_dataset", "compute_stats",
           "format_stats"]
