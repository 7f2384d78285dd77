"""Interventions: small functions from an activation to an activation.

Any callable `fn(activation) -> activation` is an intervention; these are the common ones. Each
binds its arguments when it is made, so an intervention built in a loop and run later still
uses the value of its own iteration (a bare `lambda x: clean_act` would read the variable when
it runs, not when it was made).

Example:
    >>> from mlxterp import interventions as iv
    >>> with model.trace(corrupted, interventions={"layers.10.mlp": iv.replace_with(clean_mlp)}):
    ...     patched = model.output.save()
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxterp.errors import MlxterpError
from mlxterp.tracing.trace import Intervention

Positions = int | Sequence[int]


class InterventionError(MlxterpError, ValueError):
    """An intervention that cannot apply to the activation it was given."""


def replace_with(value: mx.array | float, positions: Positions | None = None,
                 axis: int = 1) -> Intervention:
    """Replace the activation by `value` (broadcast to its shape), or only at `positions` of
    the sequence axis `axis`.

    Example:
        >>> iv.replace_with(clean_mlp)                  # the whole activation
        >>> iv.replace_with(clean_mlp, positions=[-1])  # the last token only
    """
    if positions is not None:
        return at_positions(positions, replace_with(value), axis=axis)

    def replace(x: mx.array) -> mx.array:
        source = mx.array(value) if not isinstance(value, mx.array) else value
        try:
            return mx.broadcast_to(source, x.shape)
        except ValueError as err:
            raise InterventionError(
                f"replace_with: a value of shape {tuple(source.shape)} cannot replace an "
                f"activation of shape {tuple(x.shape)}; capture it from a run with the same "
                "batch size and token count."
            ) from err

    return replace


def zero_out(x: mx.array) -> mx.array:
    """Set the activation to zero (ablation)."""
    return mx.zeros_like(x)


def scale(factor: float) -> Intervention:
    """Multiply the activation by `factor`.

    Example:
        >>> iv.scale(0.5)
    """
    return lambda x: x * factor


def add_vector(vector: mx.array) -> Intervention:
    """Add `vector` (a steering vector, broadcast over batch and positions).

    Example:
        >>> iv.add_vector(2.0 * direction)
    """
    return lambda x: x + vector


def clamp(lo: float | None = None, hi: float | None = None) -> Intervention:
    """Clip the activation into [lo, hi] (either bound may be None).

    Example:
        >>> iv.clamp(-5.0, 5.0)
    """
    if lo is None and hi is None:
        raise InterventionError("clamp needs at least one of lo and hi.")
    return lambda x: mx.clip(x, lo, hi)


def noise(std: float, seed: int = 0) -> Intervention:
    """Add Gaussian noise of standard deviation `std`; the same seed gives the same noise.

    Example:
        >>> iv.noise(0.1, seed=1)
    """
    key = mx.random.key(seed)
    return lambda x: x + (std * mx.random.normal(x.shape, key=key)).astype(x.dtype)


def compose(*interventions: Intervention) -> Intervention:
    """Apply interventions in order, the output of each feeding the next.

    Example:
        >>> iv.compose(iv.zero_out, iv.add_vector(v))
    """
    if not interventions:
        raise InterventionError("compose needs at least one intervention.")

    def composed(x: mx.array) -> mx.array:
        for fn in interventions:
            x = fn(x)
        return x

    return composed


def at_positions(positions: Positions, intervention: Intervention, axis: int = 1) -> Intervention:
    """Apply `intervention` only at the given token positions (negative counts from the end).

    The rest of the activation is left as it was. Positions index `axis`, the sequence axis of
    (batch, seq, ...) activations.

    Example:
        >>> iv.at_positions(-1, iv.replace_with(clean_mlp))   # patch the last token only
    """
    wanted = [positions] if isinstance(positions, int) else list(positions)
    if not wanted:
        raise InterventionError("at_positions needs at least one position; none were given.")

    def patch(x: mx.array) -> mx.array:
        length = x.shape[axis]
        bad = [p for p in wanted if not -length <= p < length]
        if bad:
            raise InterventionError(
                f"positions {bad} are out of range for a sequence of {length} tokens "
                f"(valid: {-length} to {length - 1})."
            )
        selected = mx.zeros(length, dtype=mx.bool_)
        selected[mx.array([p % length for p in wanted])] = True
        shape = [1] * x.ndim
        shape[axis] = length
        return mx.where(selected.reshape(shape), intervention(x), x)

    return patch
