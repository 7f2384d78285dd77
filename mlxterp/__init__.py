"""mlxterp: mechanistic interpretability on MLX.

Example:
    >>> import mlxterp
    >>> from mlxterp import InterpretableModel, interventions as iv
    >>> model = InterpretableModel(*mlxterp.load("smollm2-135m"))
"""

import os

__version__ = "0.1.0"

# First, before anything imports mlx: on Linux, arms the OpenBLAS preload (see mlxterp/blas.py).
from mlxterp import blas as _blas

# transformers warns at import that torch is missing; mlxterp only uses its tokenizers.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Float32 means float32: MLX otherwise runs float32 matrix products on tensor cores as TF32, but
# not matrix-vector ones, so one row alone and the same row in a batch differ by ~1e-3 (an H200:
# KL values of a patching sweep moved 230x past their float32 noise floor; docs/performance.md).
# MLX reads this once, at its first such product; set MLX_ENABLE_TF32=1 yourself to opt in.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from mlxterp import interventions  # noqa: E402
from mlxterp.model import InterpretableModel  # noqa: E402
from mlxterp.models import load  # noqa: E402

__all__ = ["InterpretableModel", "interventions", "load"]

_blas.warn_if_slow()
