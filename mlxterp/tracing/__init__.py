"""Layer 2: intercepting module calls, naming modules, recording and intervening."""

from mlxterp.tracing.names import (
    OUTPUT_KEY,
    ModuleTree,
    NotReachedError,
    Site,
    SiteError,
    SiteGroup,
    UnknownModuleError,
)
from mlxterp.tracing.trace import Activations, NotRecordedError, Trace, TraceError

__all__ = ["OUTPUT_KEY", "Activations", "ModuleTree", "NotReachedError", "NotRecordedError", "Site",
           "SiteError", "SiteGroup", "Trace", "TraceError", "UnknownModuleError"]
