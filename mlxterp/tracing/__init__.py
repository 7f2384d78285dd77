"""Layer 2: intercepting module calls, naming modules, recording and intervening."""

from mlxterp.errors import (
           InstalledInterventionError,
           NotReachedError,
           NotRecordedError,
           SiteError,
           TraceError,
           UnknownModuleError,
)
from mlxterp.tracing.intervening import Intervening
from mlxterp.tracing.names import OUTPUT_KEY, ModuleTree, Site, SiteGroup
from mlxterp.tracing.trace import Activations, Interventions, PositionAware, Trace, call_intervention

__all__ = ["OUTPUT_KEY", "Activations", "InstalledInterventionError", "Intervening", "Interventions",
           "ModuleTree", "NotReachedError", "NotRecordedError", "PositionAware", "Site", "SiteError",
           "SiteGroup", "Trace", "TraceError", "UnknownModuleError", "call_intervention"]
