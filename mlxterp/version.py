"""The one version of mlxterp: packaging reads it (pyproject.toml), and so do results' provenance."""

__version__ = "0.1.0"
