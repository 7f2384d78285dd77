"""Exceptions users see. Each message says what was wrong and what would be right."""


class MlxterpError(Exception):
    """Base class of every error mlxterp raises on purpose."""


class InputTypeError(MlxterpError, TypeError):
    """An argument of the wrong type. Also a TypeError, which is what Python raises for one, so
    code written against the built-in error still catches it."""


class ModelLoadError(MlxterpError, ValueError):
    """A model name, path or file that cannot be loaded."""
