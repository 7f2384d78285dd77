"""Layer 2: intercepting module calls, naming modules, recording and intervening."""

from mlxterp.tracing.names import OUTPUT_KEY, ModuleTree, Site, UnknownModuleError
from mlxterp.tracing.trace import Activations, NotRecordedError, Trace, TraceError

__all__ = ["OUTPUT_KEY", "Activations", "ModuleTree", "NotRecordedError", "Site", "Trace",
           "TraceError", "UnknownModuleError"]
