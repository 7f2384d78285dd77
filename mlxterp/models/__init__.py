"""Layer 1: getting a real model and its tokenizer."""

from mlxterp.models.bundled import BUNDLED
from mlxterp.models.load import cache_dir, load

__all__ = ["BUNDLED", "cache_dir", "load"]
