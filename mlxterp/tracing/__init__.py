"""Layer 2: intercepting module calls, naming modules, recording and intervening."""

from mlxterp.tracing.intervening import InstalledInterventionError, Intervening
from mlxterp.tracing.names import (
    OUTPUT_KEY,
    ModuleTree,
    NotReachedError,
    Site,
    SiteError,
    SiteGroup,
    UnknownModuleError,
)
from mlxterp.tracing.trace import (
    Activations,
    Interventions,
    NotRecordedError,
    PositionAware,
    Trace,
    TraceError,
    call_intervention,
)

__all__ = ["OUTPUT_KEY", "Activations", "InstalledInterventionError", "Intervening", "Interventions",
           "ModuleTree", "NotReachedError", "NotRecordedError", "PositionAware", "Site", "SiteError",
           "SiteGroup", "Trace", "TraceError", "UnknownModuleError", "call_intervention"]
