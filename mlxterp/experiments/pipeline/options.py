"""The options every experiment over prompt pairs shares: one value, one default each.

`patching_sweep`, `attribution_patching` and `causal_trace` take a `SweepOptions` (build it once,
pass it to each) or the same names as keyword arguments, which override the value's fields.

Example:
    >>> options = SweepOptions(component="self_attn", over=("layer", "head"), metric="logit_diff",
    ...                        answer=" Mary", wrong_answer=" John")
    >>> exact = model.patching_sweep(clean, corrupted, options)
    >>> estimate = model.attribution_patching(clean, corrupted, options)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import mlx.core as mx

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.pipeline.metrics import MetricFn
from mlxterp.experiments.pipeline.sites import SWEEP_AXES
from mlxterp.tracing.inputs import is_index

DIRECTIONS = ("denoise", "noise")  # denoise: clean is the donor; noise: corrupted is
DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of activations one forward may hold (an estimate)


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep patches, how it measures, and how it runs. Making one checks every field
    that can be checked without a model; the rest (layers in range, a component that exists)
    is checked when a sweep is prepared on a model.

    Attributes:
        component: 'mlp', 'self_attn' ('attn'), a sub-module ('mlp.down_proj', ...), 'input'
            (the residual stream entering the block) or 'output' (leaving it).
        over: ('layer',), ('layer', 'position'), ('layer', 'head') or ('layer', 'head',
            'position'). Heads are query heads (slices of o_proj's input); for k_proj / v_proj,
            key/value heads.
        layers, positions, heads: restrict the sweep (None: all). Negative indices count from
            the end, as in Python.
        sites: explicit `Site`s (or activation keys such as 'layers.3.mlp') instead of a sweep.
        metric: 'l2', 'cosine', 'mse', 'kl', 'logit_diff' (with answer / wrong_answer), 'prob'
            (the probability of answer), or a batched callable fn(logits (N, V), reference (V,))
            -> distances (N,), the reference being the donor run's logits.
        answer, wrong_answer: the tokens of 'logit_diff' and 'prob', as text (' Paris') or ids.
        position: the token position whose logits are measured (default: the last).
        direction: 'denoise' (clean activations into the corrupted run) or 'noise'.
        max_batch: patched rows per forward (None: as many as `memory_budget` allows).
        memory_budget: bytes of activations a forward may hold (default 2 GiB), by the engine's
            estimate; the model's weights come on top.
        progress: a progress bar (None: when the sweep has several forwards and stderr is a
            terminal).
        group: an `mx.distributed` group (`mx.distributed.init()` under `mlx.launch`): its ranks
            share the pairs (and sites) and every rank returns the whole result.

    Example:
        >>> SweepOptions(component="input", over=("layer", "position"), metric="kl")
        >>> SweepOptions.of(None, direction="noise").direction
        'noise'
    """

    component: str = "mlp"
    over: tuple[str, ...] = ("layer",)
    layers: Sequence[int] | None = None
    positions: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    sites: Sequence | None = None
    metric: str | MetricFn = "l2"
    answer: str | int | None = None
    wrong_answer: str | int | None = None
    position: int = -1
    direction: str = "denoise"
    max_batch: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    progress: bool | None = None
    group: mx.distributed.Group | None = None

    def __post_init__(self):
        if not isinstance(self.component, str):
            raise InputTypeError(f"component={self.component!r}: give a name such as 'mlp', 'self_attn' "
                                 "or 'input'.")
        over = (self.over,) if isinstance(self.over, str) else self.over
        if not isinstance(over, Sequence) or not all(isinstance(axis, str) for axis in over):
            raise InputTypeError(f"over={self.over!r}: give a tuple of axis names, e.g. ('layer', "
                                 "'position').")
        if tuple(over) not in SWEEP_AXES:
            raise InputError(f"over={self.over!r}: sweep over one of {', '.join(map(repr, SWEEP_AXES))}.")
        object.__setattr__(self, "over", tuple(over))
        for name in ("positions", "heads"):
            if getattr(self, name) is not None and name[:-1] not in self.over:
                raise InputError(f"{name}= was given but over={self.over!r} does not sweep over {name}; "
                                 f"add '{name[:-1]}' to over.")
        if not isinstance(self.metric, str) and not callable(self.metric):
            raise InputTypeError(f"metric={self.metric!r}: give a name such as 'kl' or a callable.")
        if not is_index(self.position):
            raise InputTypeError(f"position={self.position!r}: give a token position as a whole number.")
        if not isinstance(self.direction, str) or self.direction not in DIRECTIONS:
            raise InputError(f"direction={self.direction!r}: use 'denoise' or 'noise'.")
        if self.max_batch is not None and (not is_index(self.max_batch) or self.max_batch < 1):
            raise InputError(f"max_batch={self.max_batch!r}: give a whole number of rows, at least 1.")
        if not is_index(self.memory_budget) or self.memory_budget < 1:
            raise InputError(f"memory_budget={self.memory_budget!r}: give a number of bytes, e.g. 2 << 30 "
                             "for 2 GiB.")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise InputTypeError(f"progress={self.progress!r}: give True, False or None (automatic).")

    @classmethod
    def of(cls, options: SweepOptions | None, **overrides) -> SweepOptions:
        """`options` (default: every field's default) with `overrides` in place of its fields;
        a name that is no field is refused, naming the closest.

        Example:
            >>> SweepOptions.of(SweepOptions(metric="kl"), component="self_attn").metric
            'kl'
        """
        if options is not None and not isinstance(options, SweepOptions):
            raise InputTypeError(f"options={options!r}: give a SweepOptions, or the options as keywords.")
        check_names(overrides, option_names())
        return replace(options or cls(), **overrides)

    def changed(self) -> dict:
        """The fields that differ from their defaults, by name."""
        default = SweepOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not getattr(default, f.name)
                and getattr(self, f.name) != getattr(default, f.name)}

    def refuse(self, names: Sequence[str], analysis: str) -> None:
        """An error for any of `names` set to other than its default: options `analysis` has
        no use for would otherwise be ignored silently."""
        unused = sorted(set(self.changed()) & set(names))
        if unused:
            raise InputError(f"{analysis} does not use {', '.join(unused)}; leave "
                             f"{'it' if len(unused) == 1 else 'them'} out.")


def option_names() -> set[str]:
    """The names of the shared options."""
    return {f.name for f in fields(SweepOptions)}


def check_names(given: Mapping, known: set[str]) -> None:
    """Refuse names not in `known`, naming the closest: a misspelled option (`layer=` for
    `layers=`) would otherwise be Python's bare TypeError from deep inside."""
    unknown = sorted(set(given) - known)
    if unknown:
        hints = [f"{u!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(u, known, n=1))
                 else repr(u) for u in unknown]
        raise InputTypeError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; the options are "
            f"{', '.join(sorted(known))}."
        )
