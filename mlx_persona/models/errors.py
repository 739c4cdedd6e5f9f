"""The one error the models package raises."""


class ModelError(Exception):
    """A model spec that cannot be resolved or loaded; the message says what to do."""
