"""Every error and warning mlxterp raises on purpose, in one taxonomy.

Each message says what was wrong and what would be right. The classes also derive from the
built-in exception Python itself would raise, so code written against the built-ins catches
them:

- `MlxterpError`: the base of every error below.
- Bad values (`ValueError`): `InputError`, and beneath it `SiteError` (only for sites: a module,
  layer, head or position that cannot be patched or read), `MetricError`, `BaselineError`,
  `ModelLoadError`, `OutputPathError`, `InterventionError`, `RoutingError`, `InstalledInterventionError`,
  `AttentionCaptureError`, `SteeringVectorError`, `GenerationError`, `LensError`,
  `GraphError` (a model that is no plain sum of heads and MLPs, an edge not in its graph),
  `SAEError` (a sparse autoencoder that does not fit the site, model or file it meets),
  `ResultFormatError`.
- Bad types (`TypeError`): `InputTypeError`.
- Names (`KeyError`): `UnknownModuleError` (no module, or several, match a key),
  `NotRecordedError` (a module's activation that the trace did not record).
- Indices (`IndexError`): `LayerIndexError`.
- A run that went wrong (`RuntimeError`): `TraceError`, `NotReachedError` (a site whose module
  never ran: going on would measure nothing), `RankFailedError`.
- Arithmetic (`ArithmeticError`): `GradientError`.
- Warnings: `NoisyBaselineWarning`, `PairBaselineWarning`, `DisconnectedCircuitWarning`,
  `SlowBlasWarning`.

Example:
    >>> try:
    ...     model.patching_sweep(clean, corrupted, direction="sideways")
    ... except ValueError as err:   # an InputError
    ...     print(err)
"""


class MlxterpError(Exception):
    """Base class of every error mlxterp raises on purpose."""


class _Message(MlxterpError, KeyError):
    """A KeyError whose message prints as written (KeyError would print it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0])


# -- bad values -----------------------------------------------------------------------------------

class InputError(MlxterpError, ValueError):
    """A value that cannot work as given: an empty prompt, an option out of its range, prompts
    of different token lengths."""


class SiteError(InputError):
    """A site that cannot exist or cannot be patched: a layer, head or position out of range, an
    unknown component, a module called twice, a bad activation shape."""


class MetricError(InputError):
    """A metric that does not exist, or cannot be computed as asked."""


class BaselineError(InputError):
    """Clean and corrupted runs that the metric cannot tell apart: nothing to recover."""


class ModelLoadError(InputError):
    """A model name, path or file that cannot be loaded."""


class OutputPathError(InputError):
    """A path a result cannot be written to as asked."""


class InterventionError(InputError):
    """An intervention that cannot apply to the activation it was given."""


class RoutingError(InputError):
    """A routing intervention on a mixture-of-experts block that names an expert the block does
    not have, or leaves a token with more or fewer experts than the block takes."""


class InstalledInterventionError(InputError):
    """An intervention that failed on one call of the model while installed for many calls."""


class AttentionCaptureError(InputError):
    """Attention probabilities asked of a model whose attention mlxterp cannot rebuild."""


class SteeringVectorError(InputError):
    """A steering vector that does not fit: wrong shape or dtype, another model, a bad layer."""


class GenerationError(InputError):
    """A generation option with a value that cannot work."""


class LensError(InputError):
    """A lens that cannot be made or applied: no head found, a tuned lens of another model."""


class GraphError(InputError):
    """A model mlxterp cannot split into a graph of heads and MLPs, or an edge not in its graph."""


class SAEError(InputError):
    """A sparse autoencoder that does not fit: another width, dtype, model or site than the one
    it meets, an unknown architecture in its file, a feature out of range."""


class ResultFormatError(InputError):
    """A saved result this version of mlxterp cannot read."""


# -- bad types ------------------------------------------------------------------------------------

class InputTypeError(MlxterpError, TypeError):
    """An argument of the wrong type."""


# -- names and indices ----------------------------------------------------------------------------

class UnknownModuleError(_Message):
    """A key that names no module, or several."""


class NotRecordedError(_Message):
    """An activation that exists by name but was not recorded in this trace."""


class LayerIndexError(MlxterpError, IndexError):
    """A layer index past the model's blocks (an IndexError, so iterating `model.layers` stops)."""


# -- runs that went wrong -------------------------------------------------------------------------

class TraceError(MlxterpError, RuntimeError):
    """A trace used wrongly, or an intervention that did not do what it was asked to."""


class NotReachedError(MlxterpError, RuntimeError):
    """A site (an intervention or a patch) whose module never ran in the forward pass: going on
    would silently measure nothing."""


class RankFailedError(MlxterpError, RuntimeError):
    """Another rank of a sharded run failed; the message is its error."""


class GradientError(MlxterpError, ArithmeticError):
    """A backward pass that gives no usable gradient: non-finite, or zero everywhere."""


# -- warnings -------------------------------------------------------------------------------------

class NoisyBaselineWarning(UserWarning):
    """A baseline so small that float32 noise moves each recovery by more than a point."""


class PairBaselineWarning(UserWarning):
    """Pairs of a dataset whose baseline is within float32 noise, or of the sign opposite to the
    others': their own recoveries are not comparable (the normalised mean is not moved by them)."""


class DisconnectedCircuitWarning(UserWarning):
    """A circuit with no path from the embeddings to the logits: its faithfulness is the
    corrupted run's."""


class SlowBlasWarning(RuntimeWarning):
    """mlx is running on its reference BLAS although a faster one can be used."""
