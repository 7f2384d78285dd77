"""mlxterp: mechanistic interpretability on MLX.

Example:
    >>> import mlxterp
    >>> from mlxterp import InterpretableModel, interventions as iv
    >>> model = InterpretableModel(*mlxterp.load("smollm2-135m"))
"""

from mlxterp import interventions
from mlxterp.model import InterpretableModel
from mlxterp.models import load

__all__ = ["InterpretableModel", "interventions", "load"]
