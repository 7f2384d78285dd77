"""Model surgery as values (as equinox does it): a copy of a model with some modules replaced,
sharing every other module and every weight, the original untouched.

Two pieces, used by the SAE splice (`splice.py`) and by exposed experts (`experts.py`):
- `replaced(root, tree, {name: module})`: copies only the containers on the paths from the root
  to the replaced modules;
- `with_call(module, around)`: a copy of `module` of a subclass of its class whose call is
  `around(module, own_call, args, kwargs)`, keeping its children (so their names stay) and its
  call signature (runners read it to find a block's input).

Example:
    >>> new_root = replaced(model.model, model.tree, {"model.model.layers.8": with_call(block, around)})
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping

import mlx.nn as nn

from mlxterp.tracing.names import ModuleTree

Around = Callable[[nn.Module, Callable, tuple, dict], object]


@functools.cache
def _subclass(host_class: type, around: Around) -> type:
    @functools.wraps(host_class.__call__)
    def __call__(self, *args, **kwargs):
        return around(self, host_class.__call__, args, kwargs)

    return type(f"Wrapped{host_class.__name__}", (host_class,), {"__call__": __call__})


def with_call(module: nn.Module, around: Around) -> nn.Module:
    """A shallow copy of `module` (same children, same weights) whose calls go through `around`.

    Example:
        >>> with_call(block, lambda m, call, args, kwargs: call(m, *args, **kwargs) * 2)
    """
    copied = _copy(module)
    copied.__class__ = _subclass(type(module), around)
    return copied


def _copy(module: nn.Module) -> nn.Module:
    """A shallow copy whose set of frozen parameters is its own (freezing it leaves the original)."""
    copied = copy.copy(module)
    if "_no_grad" in module.__dict__:
        copied._no_grad = set(module._no_grad)
    return copied


def replaced(root: nn.Module, tree: ModuleTree, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of `root` with the modules named in `replacements` (full names in `tree`) swapped
    for the given ones; only the containers on the paths to them are copied.

    Example:
        >>> new_root = replaced(model.model, model.tree, {"model.model.layers.8": new_block})
        >>> new_root.model.layers[8] is new_block and new_root.model.layers[7] is model.model.model.layers[7]
        True
    """
    copies: dict[str, nn.Module | list] = {}

    def copied(name: str):
        """The copy of container `name` (a module, or a list named `owner.attribute`)."""
        if name not in copies:
            original = tree.modules.get(name)
            if original is None:  # a list of modules held by the module `owner`
                owner, _, attribute = name.rpartition(".")
                copies[name] = list(copied(owner)[attribute])
                copied(owner)[attribute] = copies[name]
            else:
                copies[name] = _copy(original)
                if "." in name:
                    attach(name, copies[name])
        return copies[name]

    def attach(name: str, module) -> None:
        parent, _, attribute = name.rpartition(".")
        container = copied(parent)
        if isinstance(container, list):
            container[int(attribute)] = module
        else:
            container[attribute] = module

    for name, module in replacements.items():
        attach(name, module)
    return copied(next(iter(tree.modules)))
