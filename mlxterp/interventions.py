"""Interventions: small functions from an activation to an activation.

Any callable `fn(activation) -> activation` is an intervention; these are the common ones. Each
binds its arguments when it is made, so an intervention built in a loop and run later still
uses the value of its own iteration (a bare `lambda x: clean_act` would read the variable when
it runs, not when it was made). Each checks its arguments when it is made, and the activation
when it runs: a bad one is an `InterventionError` saying which. Each returns an array of the
activation's shape and dtype. One that needs to know which token positions its activation holds
(as `at_positions` does during generation) subclasses `PositionAware`.

Example:
    >>> from mlxterp import interventions as iv
    >>> with model.trace(corrupted, interventions={"layers.10.mlp": iv.replace_with(clean_mlp)}):
    ...     patched = model.output.save()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxterp.errors import InterventionError, RoutingError
from mlxterp.tracing.names import positions_mask
from mlxterp.tracing.trace import Intervention, PositionAware, call_intervention

Positions = int | Sequence[int]
Value = mx.array | np.ndarray | float


# -- checks ---------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_real(value: object) -> bool:
    real = int | float | np.integer | np.floating
    return isinstance(value, real) and not isinstance(value, bool | np.bool_)


def _scalar(value: object, who: str, what: str, optional: bool = False) -> float | None:
    """A real number that is not NaN, as a Python float (so it keeps the activation's dtype)."""
    if value is None and optional:
        return None
    if not _is_real(value):
        raise InterventionError(f"{who}: {what} must be a real number; got {type(value).__name__} {value!r}.")
    if math.isnan(value):
        raise InterventionError(f"{who}: {what} is NaN; give a number.")
    return float(value)


def _value(value: object, who: str, what: str) -> float | mx.array:
    """A real number (as a Python float) or an array of real numbers (as an mx.array, a copy of
    a numpy array, so later changes to it do not reach the intervention)."""
    if _is_real(value):
        return _scalar(value, who, what)
    if isinstance(value, str | bytes) or value is None:
        raise InterventionError(
            f"{who}: {what} must be a number or an array; got {type(value).__name__} {value!r}."
        )
    try:
        array = value if isinstance(value, mx.array) else mx.array(value)
    except (TypeError, ValueError, RuntimeError) as err:  # what mx.array raises for non-numbers
        raise InterventionError(
            f"{who}: {what} must be a number or an array of numbers; {type(value).__name__} "
            f"{value!r} is neither ({err})."
        ) from None
    if not mx.issubdtype(array.dtype, mx.number) or mx.issubdtype(array.dtype, mx.complexfloating):
        raise InterventionError(f"{who}: {what} must hold real numbers; got dtype {array.dtype}.")
    return array


def _int(value: object, who: str, what: str) -> int:
    if not _is_int(value):
        raise InterventionError(f"{who}: {what} must be an int; got {type(value).__name__} {value!r}.")
    return int(value)


def _callable(fn: object, who: str) -> Intervention:
    if not callable(fn):
        raise InterventionError(
            f"{who}: {fn!r} ({type(fn).__name__}) is not an intervention; give a callable "
            "activation -> activation, e.g. iv.zero_out or iv.scale(0.5)."
        )
    return fn


def _activation(x: object, who: str) -> mx.array:
    if not isinstance(x, mx.array):
        raise InterventionError(f"{who}: the activation must be an mx.array; got {type(x).__name__}.")
    return x


def _combined(who: str, x: mx.array, combine, operand) -> mx.array:
    """`combine(x, operand)`, which must broadcast to x's shape and keep it."""
    try:
        y = combine(x, operand)
    except ValueError as err:  # MLX's broadcast error
        raise InterventionError(
            f"{who}: a value of shape {tuple(operand.shape)} does not broadcast to the activation's "
            f"shape {tuple(x.shape)}."
        ) from err
    if y.shape != x.shape:
        raise InterventionError(
            f"{who}: a value of shape {tuple(operand.shape)} would change the activation's shape "
            f"{tuple(x.shape)} to {tuple(y.shape)}; give one that broadcasts to the activation."
        )
    return _same_dtype(y, x)


def _same_dtype(y: mx.array, x: mx.array) -> mx.array:
    """`y` in the activation's dtype: a float32 value must not turn a bfloat16 activation float32,
    nor an integer value a float activation integer (where noise added next would be truncated)."""
    return y if y.dtype == x.dtype else y.astype(x.dtype)


# -- interventions --------------------------------------------------------------------------------


def replace_with(value: Value, positions: Positions | None = None, axis: int = 1) -> Intervention:
    """Replace the activation by `value` (broadcast to its shape, in its dtype), or only at
    `positions` of the sequence axis `axis`.

    Example:
        >>> iv.replace_with(clean_mlp)                  # the whole activation
        >>> iv.replace_with(clean_mlp, positions=[-1])  # the last token only
    """
    source = _value(value, "replace_with", "value")
    if positions is not None:
        return at_positions(positions, replace_with(source), axis=axis)
    source = mx.array(source) if not isinstance(source, mx.array) else source

    def replace(x: mx.array) -> mx.array:
        x = _activation(x, "replace_with")
        try:
            return _same_dtype(mx.broadcast_to(source, x.shape), x)
        except ValueError as err:
            raise InterventionError(
                f"replace_with: a value of shape {tuple(source.shape)} cannot replace an "
                f"activation of shape {tuple(x.shape)}; capture it from a run with the same "
                "batch size and token count."
            ) from err

    return replace


def zero_out(x: mx.array) -> mx.array:
    """Set the activation to zero (ablation)."""
    return mx.zeros_like(_activation(x, "zero_out"))


def scale(factor: Value) -> Intervention:
    """Multiply the activation by `factor` (a number, or an array broadcast to the activation).

    Example:
        >>> iv.scale(0.5)
    """
    factor = _value(factor, "scale", "factor")
    if isinstance(factor, float):
        return lambda x: _same_dtype(_activation(x, "scale") * factor, x)
    return lambda x: _combined("scale", _activation(x, "scale"), mx.multiply, factor)


def add_vector(vector: Value) -> Intervention:
    """Add `vector` (a steering vector, broadcast over batch and positions).

    Example:
        >>> iv.add_vector(2.0 * direction)
    """
    vector = _value(vector, "add_vector", "vector")
    if isinstance(vector, float):
        return lambda x: _same_dtype(_activation(x, "add_vector") + vector, x)
    return lambda x: _combined("add_vector", _activation(x, "add_vector"), mx.add, vector)


def clamp(lo: float | None = None, hi: float | None = None) -> Intervention:
    """Clip the activation into [lo, hi] (either bound may be None).

    Example:
        >>> iv.clamp(-5.0, 5.0)
    """
    lo, hi = _scalar(lo, "clamp", "lo", optional=True), _scalar(hi, "clamp", "hi", optional=True)
    if lo is None and hi is None:
        raise InterventionError("clamp needs at least one of lo and hi.")
    if lo is not None and hi is not None and lo > hi:
        raise InterventionError(f"clamp: lo={lo} is above hi={hi}; no value lies in between.")
    return lambda x: _same_dtype(mx.clip(_activation(x, "clamp"), lo, hi), x)


def noise(std: float, seed: int = 0) -> Intervention:
    """Add Gaussian noise of standard deviation `std`; the same seed gives the same noise.

    Example:
        >>> iv.noise(0.1, seed=1)
    """
    std = _scalar(std, "noise", "std")
    if not 0 <= std < math.inf:
        raise InterventionError(f"noise: std={std} must be finite and at least 0.")
    seed = _int(seed, "noise", "seed")
    if not 0 <= seed < 2**64:
        raise InterventionError(f"noise: seed={seed} must lie in [0, 2**64).")
    key = mx.random.key(seed)

    def add_noise(x: mx.array) -> mx.array:
        x = _activation(x, "noise")
        return x + (std * mx.random.normal(x.shape, key=key)).astype(x.dtype)

    return add_noise


def compose(*interventions: Intervention) -> Intervention:
    """Apply interventions in order, the output of each feeding the next.

    Example:
        >>> iv.compose(iv.zero_out, iv.add_vector(v))
    """
    if not interventions:
        raise InterventionError("compose needs at least one intervention.")
    for fn in interventions:
        _callable(fn, "compose")
    return _Composed(interventions)


class _Composed(PositionAware):
    """Interventions in order; a position-aware one among them is told where the activation starts."""

    def __init__(self, interventions: tuple[Intervention, ...]):
        self.interventions = interventions

    def __call__(self, x: mx.array, start: int | None = None) -> mx.array:
        for fn in self.interventions:
            x = call_intervention(fn, x, start)
        return x


def at_positions(positions: Positions, intervention: Intervention, axis: int = 1) -> Intervention:
    """Apply `intervention` only at the given token positions.

    The rest of the activation is left as it was. Positions index `axis`, the sequence axis of
    (batch, seq, ...) activations. In a trace, negative positions count from the end. When the
    model runs with installed interventions (`model.intervening`, `model.generate`), positions
    are absolute: position p is token p of the whole sequence, prompt and generated tokens alike,
    whichever forward pass processes it; a forward pass that holds none of them is unchanged.

    Example:
        >>> iv.at_positions(-1, iv.replace_with(clean_mlp))   # patch the last token only
    """
    if _is_int(positions):
        wanted = [int(positions)]
    elif isinstance(positions, Sequence) and not isinstance(positions, str | bytes):
        wanted = [_int(p, "at_positions", "each position") for p in positions]
    else:
        raise InterventionError(
            f"at_positions: positions must be an int or a list of ints; got "
            f"{type(positions).__name__} {positions!r}."
        )
    if not wanted:
        raise InterventionError("at_positions needs at least one position; none were given.")
    _callable(intervention, "at_positions")
    return _AtPositions(wanted, intervention, _int(axis, "at_positions", "axis"))


class _AtPositions(PositionAware):
    """`intervention` applied at some token positions of the sequence axis only."""

    def __init__(self, positions: list[int], intervention: Intervention, axis: int):
        self.positions, self.intervention, self.axis = positions, intervention, axis

    def _local(self, length: int, start: int | None) -> list[int]:
        """The wanted positions as indices into an activation of `length` positions."""
        if start is None:  # the activation is the whole sequence
            bad = [p for p in self.positions if not -length <= p < length]
            if bad:
                raise InterventionError(
                    f"positions {bad} are out of range for a sequence of {length} tokens "
                    f"(valid: {-length} to {length - 1})."
                )
            return [p % length for p in self.positions]
        negative = [p for p in self.positions if p < 0]
        if negative:
            raise InterventionError(
                f"at_positions: negative positions {negative} count from the end of the sequence, "
                "which has no fixed end while the model generates (it grows by one token per "
                "forward pass); give absolute positions, counted from the prompt's first token (0)."
            )
        return [p - start for p in self.positions if start <= p < start + length]

    def __call__(self, x: mx.array, start: int | None = None) -> mx.array:
        x = _activation(x, "at_positions")
        axis = self.axis
        if not -x.ndim <= axis < x.ndim:
            raise InterventionError(
                f"at_positions: axis {axis} does not exist in an activation of shape {tuple(x.shape)}."
            )
        length = x.shape[axis]
        local = self._local(length, start)
        if not local:
            return x
        changed = call_intervention(self.intervention, x, start)
        if not isinstance(changed, mx.array) or changed.shape != x.shape:
            got = tuple(changed.shape) if isinstance(changed, mx.array) else type(changed).__name__
            raise InterventionError(
                f"at_positions: the intervention returned {got}; it must return an mx.array of "
                f"the activation's shape {tuple(x.shape)}."
            )
        shape = [1] * x.ndim
        shape[axis] = length
        selected = mx.array(positions_mask(tuple(local), length).reshape(shape))
        return _same_dtype(mx.where(selected, changed, x), x)


# -- routing of mixture-of-experts blocks ---------------------------------------------------------


def _experts(experts: object, who: str) -> tuple[int, ...]:
    if _is_int(experts):
        experts = (experts,)
    if not isinstance(experts, Sequence) or isinstance(experts, str) or not experts or not all(
            _is_int(e) and e >= 0 for e in experts):
        raise RoutingError(f"{who}: give expert numbers (whole numbers from 0), e.g. [3, 17]; "
                           f"got {experts!r}.")
    return tuple(int(e) for e in experts)


def _check_experts(x: mx.array, experts: tuple[int, ...], who: str) -> mx.array:
    x = _activation(x, who)
    bad = [e for e in experts if e >= x.shape[-1]]
    if bad:
        raise RoutingError(f"{who}: experts {bad} do not exist; this block has {x.shape[-1]} "
                           f"(0 to {x.shape[-1] - 1}).")
    return x


def forbid_experts(experts: int | Sequence[int]) -> Intervention:
    """For a router's logits (`layers.L.mlp.gate`): these experts are never chosen; the block's own
    rule picks the best of the rest (their logits become -inf).

    Example:
        >>> model.trace(prompt, interventions={"layers.3.mlp.gate": iv.forbid_experts([5, 9])})
    """
    experts = _experts(experts, "forbid_experts")

    def forbid(x: mx.array) -> mx.array:
        x = _check_experts(x, experts, "forbid_experts")
        mask = mx.zeros((x.shape[-1],), dtype=mx.bool_)
        mask[mx.array(experts)] = True
        return mx.where(mask, mx.array(-mx.inf, dtype=x.dtype), x)

    return forbid


def force_expert(expert: int) -> Intervention:
    """For routing weights (`layers.L.mlp.routing`, in `model.with_experts()`): every token sends
    to `expert`; a token that did not takes it in place of its lowest-weighted expert, with that
    expert's weight.

    Example:
        >>> moe.trace(prompt, interventions={"layers.3.mlp.routing": iv.force_expert(7)})
    """
    (expert,) = _experts(expert, "force_expert")

    def force(x: mx.array) -> mx.array:
        x = _check_experts(x, (expert,), "force_expert")
        lowest = mx.argmin(mx.where(x > 0, x, mx.inf), axis=-1, keepdims=True)
        taken = x[..., expert:expert + 1] > 0
        smallest = mx.take_along_axis(x, lowest, axis=-1)
        columns = mx.arange(x.shape[-1])
        moved = mx.where(columns == expert, smallest, mx.where(columns == lowest, 0.0, x))
        return mx.where(taken, x, moved).astype(x.dtype)

    return force


def reweight_experts(factors: dict[int, float]) -> Intervention:
    """For routing weights (`layers.L.mlp.routing`, in `model.with_experts()`): each named
    expert's weight times its factor, where a token uses it; the experts chosen stay the same.

    Example:
        >>> moe.trace(prompt, interventions={"layers.3.mlp.routing": iv.reweight_experts({7: 2.0})})
    """
    if not isinstance(factors, dict) or not factors:
        raise RoutingError(f"reweight_experts: give {{expert: factor}}, e.g. {{7: 2.0}}; got {factors!r}.")
    experts = _experts(list(factors), "reweight_experts")
    values = [_scalar(v, "reweight_experts", f"the factor of expert {e}") for e, v in factors.items()]
    if any(v <= 0 for v in values):
        raise RoutingError("reweight_experts: factors must be above 0 (forbid an expert with "
                           "iv.forbid_experts on the router's logits).")

    def reweight(x: mx.array) -> mx.array:
        x = _check_experts(x, experts, "reweight_experts")
        scale_by = mx.ones((x.shape[-1],), dtype=x.dtype)
        scale_by[mx.array(experts)] = mx.array(values, dtype=x.dtype)
        return x * scale_by

    return reweight
