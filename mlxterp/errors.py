"""Exceptions users see. Each message says what was wrong and what would be right."""


class MlxterpError(Exception):
    """Base class of every error mlxterp raises on purpose."""


class ModelLoadError(MlxterpError, ValueError):
    """A model name, path or file that cannot be loaded."""
