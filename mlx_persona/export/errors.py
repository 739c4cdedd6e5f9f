"""The export's error type, on its own so that every export module can raise it without importing the
package's ``__init__`` (which imports them back, lazily, for :func:`mlx_persona.export.fuse` and
:func:`mlx_persona.export.export_onnx`)."""


class ExportError(Exception):
    """An export that cannot be done as asked (existing output, unsupported model ...)."""
