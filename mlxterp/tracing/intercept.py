"""The one interception mechanism: probes that stand in for modules while a trace runs.

MLX modules have no forward hooks. A probe is a plain callable set as an *instance attribute*
of the module that owns the intercepted child (or of a shadow copy of the list that holds it).
The owner's dict entries - its parameter tree - are never touched, so `parameters()`,
`update()` and `nn.value_and_grad` see the model as it is, and removing the instance
attributes restores it exactly. Python looks instance attributes up before `Module.__getattr__`
reads the dict, so the model's own `self.mlp(x)` or `for layer in self.layers` calls the probe.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import mlx.nn as nn

from mlxterp.errors import MlxterpError
from mlxterp.tracing.names import ModuleTree

CallHandler = Callable[[str, nn.Module, tuple, dict], Any]


class Probe:
    """Stands in for the module `name`: every call goes through `handler`."""

    __slots__ = ("name", "module", "handler")

    def __init__(self, name: str, module: nn.Module, handler: CallHandler):
        self.name, self.module, self.handler = name, module, handler

    def __call__(self, *args, **kwargs):
        return self.handler(self.name, self.module, args, kwargs)

    def __getattr__(self, attr: str):
        # Other uses of the module (`embed_tokens.as_linear`, `self.mlp.some_attr`) pass through.
        return getattr(self.module, attr)

    def __repr__(self) -> str:
        return f"Probe({self.name!r})"


@contextmanager
def intercepted(tree: ModuleTree, names: Iterable[str], handler: CallHandler) -> Iterator[None]:
    """Route every call of the named modules through `handler` inside the `with` block.

    The model is restored on exit, whether the block finished or raised.
    """
    installed: list[tuple[nn.Module, str]] = []
    shadow_lists: dict[tuple[int, str], list] = {}
    try:
        for name in names:
            parent, _, attr = name.rpartition(".")
            probe = Probe(name, tree.modules[name], handler)
            if parent in tree.modules:
                owner = tree.modules[parent]
                _check_current(owner.get(attr), name, tree)
                object.__setattr__(owner, attr, probe)
                installed.append((owner, attr))
                continue
            owner_name, _, list_attr = parent.rpartition(".")
            owner = tree.modules.get(owner_name)
            if owner is None or not isinstance(owner.get(list_attr), list):
                raise MlxterpError(
                    f"cannot intercept {name!r}: mlxterp intercepts modules held as attributes "
                    "or in lists of modules, not in other containers."
                )
            shadow = shadow_lists.get((id(owner), list_attr))
            if shadow is None:
                shadow = list(owner[list_attr])
                shadow_lists[(id(owner), list_attr)] = shadow
                object.__setattr__(owner, list_attr, shadow)
                installed.append((owner, list_attr))
            _check_current(owner[list_attr][int(attr)], name, tree)
            shadow[int(attr)] = probe
        yield
    finally:
        for owner, attr in reversed(installed):
            object.__delattr__(owner, attr)


def _check_current(child: object, name: str, tree: ModuleTree) -> None:
    if child is not tree.modules[name]:
        raise MlxterpError(
            f"{name!r} was replaced after the model was wrapped (for example by nn.quantize or "
            "LoRA); wrap it again with InterpretableModel(model, tokenizer) to name its modules."
        )


@cache
def call_parameters(module_type: type) -> tuple[str, ...]:
    """Names of the parameters of `module_type.__call__`, without `self`."""
    return tuple(inspect.signature(module_type.__call__).parameters)[1:]


def call_input(module: nn.Module, args: tuple, kwargs: dict):
    """The activation a module was called with: its first argument, by position or by name."""
    if args:
        return args[0]
    names = call_parameters(type(module))
    return kwargs.get(names[0]) if names else None


def with_call_input(module: nn.Module, args: tuple, kwargs: dict, value) -> tuple[tuple, dict]:
    """`(args, kwargs)` with the module's first argument replaced by `value`."""
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, call_parameters(type(module))[0]: value}


def call_patched(module: nn.Module, args: tuple, kwargs: dict,
                 patch_input: Callable[[Any], Any] | None = None,
                 patch_output: Callable[[Any], Any] | None = None):
    """Call `module` with its input passed through `patch_input` and return its output passed
    through `patch_output` (either may be None): the one way traces and the engine change a call.
    A module called with no arguments has no input, and `patch_input` is not called.

    Example:
        >>> call_patched(mlp, (x,), {}, patch_output=lambda y: y * 0)
    """
    x = call_input(module, args, kwargs)
    if patch_input is not None and x is not None:
        args, kwargs = with_call_input(module, args, kwargs, patch_input(x))
    out = module(*args, **kwargs)
    return out if patch_output is None else patch_output(out)
