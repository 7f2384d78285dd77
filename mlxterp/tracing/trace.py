"""A traced forward pass: what every intercepted module was called with and returned, and the
interventions applied on the way.

Nothing here evaluates: activations are MLX's lazy arrays, computed when the user evaluates
them (or anything that depends on them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn

from mlxterp.errors import (
    AttentionCaptureError,
    InputTypeError,
    NotReachedError,
    NotRecordedError,
    TraceError,
    UnknownModuleError,
)
from mlxterp.tracing.attention import AttentionLayout, attention_layouts, mixing_tolerance
from mlxterp.tracing.intercept import call_patched, intercepted
from mlxterp.tracing.names import OUTPUT_KEY, PATTERN, ROOT, ModuleTree, Site

Intervention = Callable[[mx.array], mx.array]


class PositionAware(ABC):
    """An intervention that needs to know which token positions its activation holds.

    `start` is None when the activation holds the whole sequence (a trace: one forward pass),
    else the absolute position of its first token in a sequence that may go on (the model
    running with `InterpretableModel.intervening`, as in generation: the prompt first, then one
    token per call).

    Example:
        >>> class FirstToken(PositionAware):
        ...     def __call__(self, x, start=None):
        ...         return x * 0 if start in (None, 0) else x
    """

    @abstractmethod
    def __call__(self, x: mx.array, start: int | None = None) -> mx.array: ...


def call_intervention(fn: Intervention, x, start: int | None = None):
    """`fn(x)`, telling a position-aware intervention where `x` starts in the sequence.

    Example:
        >>> call_intervention(iv.at_positions(3, iv.zero_out), x, start=2)  # x[:, 1] is token 3
    """
    return fn(x, start) if isinstance(fn, PositionAware) else fn(x)


@dataclass
class _Planned:
    site: Site
    fn: Intervention
    ran: int = 0


class Interventions:
    """The interventions of a run, `{key: fn}`, checked once, by the module they change.

    A key is an activation key (`"layers.3.mlp"`, `"layers.3.self_attn.o_proj:input"`) or a
    `Site`, whose positions and head narrow the intervention to that part of the activation
    (applied with `Site.patch`, as every patch is).

    One set serves whatever intercepts the calls: a `Trace` (one forward pass) or
    `Intervening` (any calls, such as generation's). Both apply it with `apply` inside
    `call_patched`.

    Example:
        >>> plan = Interventions(model.tree, {"layers.3.mlp": iv.zero_out})
        >>> plan.modules
        {'model.model.layers.3.mlp'}
    """

    def __init__(self, tree: ModuleTree, interventions: Mapping[str, Intervention] | None):
        if interventions is None:
            interventions = {}
        if not isinstance(interventions, Mapping):
            raise InputTypeError(
                f"interventions must be a dict {{key: fn}}; got {type(interventions).__name__}. "
                "E.g. interventions={'layers.3.mlp': iv.zero_out}."
            )
        self.planned = [_Planned(_site(tree, key), _check_callable(key, fn))
                        for key, fn in interventions.items()]
        self._by_module: dict[str, list[_Planned]] = {}
        for plan in self.planned:
            self._by_module.setdefault(plan.site.module, []).append(plan)

    @property
    def modules(self) -> set[str]:
        """Full names of the modules that have an intervention."""
        return set(self._by_module)

    def at_call(self, name: str, call: int) -> list[_Planned]:
        """The interventions on call `call` (from 0) of the module `name`, in order."""
        return [p for p in self._by_module.get(name, ()) if p.site.call in (None, call)]

    def apply(self, plans: list[_Planned], x, is_input: bool, start: int | None = None):
        """`x` passed through those of `plans` that change an input (or an output)."""
        for plan in plans:
            if plan.site.is_input == is_input:
                x = _apply(plan, x, start)
        return x

    def check_ran(self, calls: Mapping[str, int], where: str) -> None:
        """A NotReachedError for an intervention that never ran: it would silently change nothing."""
        for plan in self.planned:
            if plan.ran == 0:
                raise NotReachedError(
                    f"the intervention on {plan.site.key!r} never ran: the module was called "
                    f"{calls.get(plan.site.module, 0)} time(s) in {where}."
                    + (" A module's calls are numbered from #0." if plan.site.call else "")
                )


class Activations(Mapping):
    """Recorded activations by key; short keys (`layers.3.mlp`) resolve like intervention keys."""

    def __init__(self, tree: ModuleTree, store: dict[str, object]):
        self._tree, self._store = tree, store

    def __getitem__(self, key: str):
        canonical = self._tree.canonical_key(key)
        if canonical not in self._store:
            if canonical.endswith(PATTERN):
                raise NotRecordedError(
                    f"{canonical!r} was not recorded in this trace: attention probabilities are "
                    "recorded with `model.trace(..., capture_attention=True)`, or by naming the "
                    "key in `capture`."
                )
            raise NotRecordedError(
                f"{canonical!r} was not recorded in this trace: the module was not called that "
                "often in the forward pass, or the trace's `capture` list left it out."
            )
        return self._store[canonical]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        try:
            return self._tree.canonical_key(key) in self._store
        except UnknownModuleError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)


class Trace:
    """One forward pass with recording and interventions; made by `InterpretableModel.trace`.

    The forward pass runs when the `with` block is entered. Inside the block, `activations`
    holds every recorded activation by full name (and `"output"`, the model's output); after
    the block the trace lets go of them, keeping only what was `.save()`d.

    With `capture_attention=True` (or keys such as `"layers.3.self_attn:pattern"` in `capture`)
    it also holds each attention module's probabilities (batch, heads, queries, keys), rebuilt
    as `tracing.attention` describes.

    Example:
        >>> with model.trace("The capital of France is") as trace:
        ...     mlp = trace.activations["layers.10.mlp"]
    """

    def __init__(
        self,
        model: nn.Module,
        tree: ModuleTree,
        inputs: mx.array,
        interventions: Mapping[str, Intervention] | None = None,
        capture: Iterable[str] | None = None,
        capture_attention: bool = False,
        on_enter: Callable[[Trace], None] = lambda trace: None,
        on_exit: Callable[[], None] = lambda: None,
    ):
        self._model, self._tree, self._inputs = model, tree, inputs
        self._on_enter, self._on_exit = on_enter, on_exit
        self._interventions = Interventions(tree, interventions)
        self._capture = None if capture is None else {
            tree.canonical_key(key) for key in _capture_keys(capture)
        }
        self._attention = _wanted_attention(tree, self._capture, capture_attention)
        # During a call of an attention module: what its rope returned (queries, keys), its
        # v_proj returned and its o_proj was given, by key; after it, each layer's check.
        self._watched: dict[str, list[mx.array]] = {}
        self._mixing_errors: list[tuple[str, mx.array, float]] = []  # (module, error, bound)
        self._store: dict[str, object] = {}
        self._calls: Counter[str] = Counter()
        self._open = False
        self._done = False

    # -- running -------------------------------------------------------------------------------

    def _probed_modules(self) -> list[str]:
        if self._capture is None:
            modules = set(self._tree.modules) - {ROOT}
        else:
            modules = {self._tree.site(key).module for key in self._capture
                       if key != OUTPUT_KEY and not key.endswith(PATTERN)}
        modules |= self._interventions.modules
        for layout in self._attention.values():
            modules |= {layout.module, layout.rope, layout.values, layout.output}
        return sorted(modules)

    def _wants(self, key: str) -> bool:
        return self._capture is None or key in self._capture

    def _handle_call(self, name: str, module: nn.Module, args: tuple, kwargs: dict):
        call = self._calls[name]
        self._calls[name] += 1
        key = name if call == 0 else f"{name}#{call}"
        plans = self._interventions.at_call(name, call)

        def patch(x, is_input: bool):
            # What the attention computed: o_proj's input before an intervention (a head
            # ablation) changes it; the rope's and v_proj's outputs as the attention used them.
            if is_input and self._watched:
                self._watch(f"{name}:input", x)
            x = self._interventions.apply(plans, x, is_input)
            if not is_input and self._watched:
                self._watch(name, x)
            stored = f"{key}:input" if is_input else key
            if self._wants(stored):
                self._store[stored] = x
            return x

        layout = self._attention.get(name)
        if layout is None:
            return call_patched(module, args, kwargs, lambda x: patch(x, True), lambda y: patch(y, False))
        mask = layout.call_mask(module, args, kwargs)
        self._watched.update({layout.rope: [], layout.values: [], layout.mixed: []})
        output = call_patched(module, args, kwargs, lambda x: patch(x, True), lambda y: patch(y, False))
        rotated, values, mixed = (self._watched.pop(k) for k in (layout.rope, layout.values, layout.mixed))
        if (len(rotated), len(values), len(mixed)) != (2, 1, 1):
            raise AttentionCaptureError(
                f"in one call of {name}, its rope ran {len(rotated)} times, v_proj "
                f"{len(values)} and o_proj {len(mixed)}; mlxterp rebuilds attention from a rope "
                "that rotates the queries, then the keys, and one v_proj and o_proj call."
            )
        pattern = layout.pattern(*rotated, mask)
        self._store[key + PATTERN] = pattern
        self._mixing_errors.append((name, layout.mixing_error(pattern, values[0], mixed[0]),
                                    mixing_tolerance(mixed[0].dtype)))
        return output

    def _watch(self, key: str, x) -> None:
        watched = self._watched.get(key)
        if watched is not None:  # every call, whatever its number
            watched.append(x)

    def __enter__(self) -> Trace:
        if self._done:
            raise TraceError("this trace has already run; start a new `with model.trace(...)`.")
        self._on_enter(self)
        self._open = True
        try:
            with intercepted(self._tree, self._probed_modules(), self._handle_call):
                output = self._model(self._inputs)
            self._interventions.check_ran(self._calls, "this forward pass")
            self._check_attention()
        except BaseException:
            self._close()
            raise
        self._store[OUTPUT_KEY] = output
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        self._open, self._done = False, True
        self._store.clear()  # also empties any Activations view kept past the block
        self._on_exit()

    def _check_attention(self) -> None:
        """Every recorded pattern must reproduce its module's output (see `tracing.attention`)."""
        if not self._mixing_errors:
            return
        errors = mx.stack([error for _, error, _ in self._mixing_errors]).tolist()  # one evaluation
        for (name, _, tolerance), error in zip(self._mixing_errors, errors, strict=True):
            if not error <= tolerance:  # also refuses NaN
                raise AttentionCaptureError(
                    f"the attention probabilities rebuilt for {name} do not reproduce its output "
                    f"(relative error {error:.2g}, allowed {tolerance:.2g}): this family's attention "
                    "is not softmax(scale * q @ k^T + mask), so mlxterp does not report "
                    "probabilities for it."
                )

    # -- reading -------------------------------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if not self._open:
            raise TraceError(
                f"{what} is only available inside the `with model.trace(...)` block; "
                "inside it, keep what you need with `.save()` or by assigning the array."
            )

    @property
    def activations(self) -> Activations:
        """Recorded activations by key (full or short module name, `#k`, `:input`, `"output"`)."""
        self._require_open("trace.activations")
        return Activations(self._tree, self._store)

    @property
    def output(self) -> mx.array:
        """The model's output (logits for a language model)."""
        self._require_open("trace.output")
        return self._store[OUTPUT_KEY]


def _wanted_attention(tree: ModuleTree, capture: set[str] | None,
                      every_layer: bool) -> dict[str, AttentionLayout]:
    """The attention modules whose probabilities a trace records, by full name."""
    asked = set() if capture is None else {key for key in capture if key.endswith(PATTERN)}
    if not every_layer and not asked:
        return {}  # capture costs nothing when not asked for: nothing extra is intercepted
    layouts = {layout.key: layout for layout in attention_layouts(tree)}
    unknown = sorted(asked - set(layouts))
    if unknown:
        raise AttentionCaptureError(
            f"{', '.join(map(repr, unknown))}: ':pattern' is read from attention modules, such as "
            f"{next(iter(layouts))!r}, at their first call."
        )
    return {layout.module: layout for key, layout in layouts.items() if every_layer or key in asked}


def _capture_keys(capture: object) -> list:
    # A string is iterable too, but its characters are no keys: `capture="layers.3.mlp"` is a slip
    # for `capture=["layers.3.mlp"]`.
    if isinstance(capture, str | bytes) or not isinstance(capture, Iterable):
        raise InputTypeError(
            f"capture must be a list of keys; got {type(capture).__name__} {capture!r}. "
            "E.g. capture=['layers.3.mlp', 'output']."
        )
    return list(capture)


def _site(tree: ModuleTree, key: object) -> Site:
    """The site an intervention key names, its module resolved to a full name."""
    if isinstance(key, Site):
        return replace(key, module=tree.site(key.key).module)
    return tree.site(key)


def _check_callable(key: str, fn: object) -> Intervention:
    if not callable(fn):
        raise InputTypeError(
            f"the intervention for {key!r} is a {type(fn).__name__}, not a function. Use a "
            "callable activation -> activation, e.g. iv.replace_with(array) or iv.scale(0.5)."
        )
    return fn


def _apply(plan: _Planned, x, start: int | None):
    """Run one intervention, checking that it kept the activation's shape and dtype."""
    y = call_intervention(plan.fn, x, start)
    plan.ran += 1
    if isinstance(x, mx.array):
        if not isinstance(y, mx.array):
            raise TraceError(
                f"the intervention on {plan.site.key!r} returned {type(y).__name__}; "
                f"it must return an mx.array of shape {tuple(x.shape)}."
            )
        if y.shape != x.shape:
            raise TraceError(
                f"the intervention on {plan.site.key!r} returned shape {tuple(y.shape)}; "
                f"the activation has shape {tuple(x.shape)}."
            )
        if y.dtype != x.dtype:
            # A float32 vector added to a bfloat16 model must not turn every later layer float32.
            y = y.astype(x.dtype)
        if plan.site.positions is not None or plan.site.head is not None:
            y = plan.site.patch(x, y, start or 0)
    return y
