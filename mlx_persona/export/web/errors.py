"""The page's error type, on its own so that :mod:`.manifest` can raise it without importing the package's
``__init__`` (which imports the manifest)."""


class WebError(Exception):
    """The page cannot be installed (not an export folder, JavaScript packages missing ...)."""
