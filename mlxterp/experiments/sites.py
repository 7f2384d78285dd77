"""Patch sites: where one patch goes, as data.

A site names an activation (a module's output, or its input), the block it belongs to, and which
part of it is patched: all positions or some, all features or one head's slice. Sweeps are lists
of sites; the engine and the naive reference both read them, so they patch the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputTypeError, MlxterpError

ALIASES = {"attn": "self_attn", "self_attn": "attn"}  # names of attention in mlx-lm families
SWEEP_AXES = (("layer",), ("layer", "position"), ("layer", "head"), ("layer", "head", "position"))


class SiteError(MlxterpError, ValueError):
    """A sweep that asks for a site that does not exist."""


@dataclass(frozen=True)
class PatchSite:
    """One patch: replace part of the activation `key` (block `layer`) with the donor's."""

    key: str  # full activation key, e.g. 'model.model.layers.3.mlp' or '...o_proj:input'
    layer: int
    positions: tuple[int, ...] | None = None  # None: every position
    head: int | None = None  # None: all features; else one of `n_heads` equal feature slices
    n_heads: int | None = None
    labels: dict = field(default_factory=dict, compare=False)  # e.g. {"layer": 3, "head": 2}

    def __post_init__(self):
        if self.positions is not None and not self.positions:
            raise SiteError(f"site {self.key!r}: positions is empty; give at least one, or None for all.")
        if (self.head is None) != (self.n_heads is None):
            raise SiteError(f"site {self.key!r}: give head and n_heads together.")
        if self.head is not None and not 0 <= self.head < self.n_heads:
            raise SiteError(f"site {self.key!r}: head {self.head} is not in 0..{self.n_heads - 1}.")

    def selection(self, length: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks of the positions (length,) and features (width,) this site patches."""
        rows = np.zeros(length, dtype=bool)
        rows[slice(None) if self.positions is None else list(self.positions)] = True
        columns = np.ones(width, dtype=bool)
        if self.head is not None:
            if width % self.n_heads:
                raise SiteError(f"{self.key}: width {width} does not split into {self.n_heads} heads.")
            size = width // self.n_heads
            columns[:] = False
            columns[self.head * size:(self.head + 1) * size] = True
        return rows, columns

    def patch(self, receiver: mx.array, donor: mx.array) -> mx.array:
        """`receiver` with this site's part taken from `donor` (both (batch, seq, features))."""
        rows, columns = self.selection(receiver.shape[-2], receiver.shape[-1])
        return mx.where(mx.array(rows[:, None] & columns[None]), donor, receiver)


def check_sites(model, sites: Sequence[PatchSite]) -> list[PatchSite]:
    """Explicit sites, with keys resolved to full names and checked against their layers.

    Example:
        >>> check_sites(model, [PatchSite("layers.3.mlp", 3)])[0].key
        'model.model.layers.3.mlp'
    """
    if not isinstance(sites, Sequence) or not all(isinstance(site, PatchSite) for site in sites):
        raise InputTypeError(f"sites= takes a list of PatchSite; got {type(sites).__name__}.")
    if not sites:
        raise SiteError("the list of sites is empty.")
    blocks = model.tree.blocks
    checked = []
    for site in sites:
        where = model.tree.site(site.key)
        if where.call is not None:
            raise SiteError(f"site {site.key!r}: patch sites patch every call; drop the #k.")
        if not 0 <= site.layer < len(blocks):
            raise SiteError(f"site {site.key!r}: layer {site.layer} is not in 0..{len(blocks) - 1}.")
        block = blocks[site.layer]
        if where.module != block and not where.module.startswith(block + "."):
            raise SiteError(
                f"site {site.key!r} is not inside block {site.layer} ({block}); patch sites must "
                "be a block, its input, or a module inside it."
            )
        checked.append(replace(site, key=where.key, labels=dict(site.labels) or {"layer": site.layer}))
    labels = [tuple(sorted(site.labels.items())) for site in checked]
    if len(set(labels)) != len(labels):
        raise SiteError("two sites have the same labels; give each site labels of its own "
                        "(e.g. {'layer': 3, 'position': 5}) so results can tell them apart.")
    return checked


def component_key(model, layer: int, component: str) -> str:
    """The activation key of `component` in block `layer` (`input` is the block's input)."""
    block = model.tree.blocks[layer]
    if component == "input":
        return f"{block}:input"
    if component == "output":
        return block
    key = f"{block}.{component}"
    if key not in model.tree.modules:
        children = _sub_modules(model, layer)
        raise SiteError(
            f"block {layer} has no component {component!r}. Valid components: 'input', 'output' "
            f"and its sub-modules {children}."
        )
    return key


def _sub_modules(model, layer: int) -> list[str]:
    """Names of the modules inside block `layer`, relative to it (`mlp`, `mlp.down_proj`, ...)."""
    block = model.tree.blocks[layer]
    return sorted(n[len(block) + 1:] for n in model.tree.modules if n.startswith(block + "."))


def _check_component(model, component: str) -> str:
    """The component as the model names it: its own sub-module names first, then aliases
    ('attn' for 'self_attn' and back), else an error listing the valid ones."""
    children = _sub_modules(model, 0)
    if component in ("input", "output") or component in children:
        return component
    head, dot, rest = component.partition(".")
    if head in ALIASES and ALIASES[head] + dot + rest in children:
        return ALIASES[head] + dot + rest
    raise SiteError(
        f"unknown component {component!r}; valid components: 'input', 'output' and the "
        f"sub-modules of a block: {children}. ('attn' and 'self_attn' stand for each other.)"
    )


def _head_layout(model, layer: int, component: str) -> tuple[str, int]:
    """(activation key, number of heads) whose per-head slices a head sweep patches.

    Heads are query heads: slices of the o_proj input (the concatenated head outputs). For
    k_proj / v_proj they are key/value heads (grouped-query attention has fewer).
    """
    block = model.tree.blocks[layer]
    attention = model.tree.modules.get(f"{block}.self_attn")
    if attention is None or not hasattr(attention, "n_heads"):
        raise SiteError(f"head sweeps need block {layer} to have a self_attn module with n_heads.")
    if component in ("self_attn", "self_attn.o_proj"):
        return f"{block}.self_attn.o_proj:input", attention.n_heads
    if component == "self_attn.q_proj":
        return f"{block}.self_attn.q_proj", attention.n_heads
    if component in ("self_attn.k_proj", "self_attn.v_proj"):
        return f"{block}.{component}", attention.n_kv_heads
    raise SiteError(
        f"heads apply to attention components ('self_attn', 'self_attn.q_proj', "
        f"'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj'), not {component!r}."
    )


def is_index(value: object) -> bool:
    """A whole number given as an int (a bool or a float is not an index)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _checked_indices(values: Sequence[int] | None, count: int, what: str) -> list[int]:
    if values is None:
        return list(range(count))
    if not isinstance(values, Sequence | np.ndarray) or isinstance(values, str) or not all(
            is_index(v) for v in values):
        raise InputTypeError(
            f"{what}s={values!r}: give a list of whole numbers, e.g. {what}s=[0, 3], or None for all."
        )
    values = [int(v) for v in values]
    if not values:
        raise SiteError(f"no {what}s given; give at least one, or None for all {count}.")
    bad = [v for v in values if not -count <= v < count]
    if bad:
        raise SiteError(f"{what} {bad} out of range: valid {what}s are 0 to {count - 1}.")
    normalised = [v % count for v in values]
    if len(set(normalised)) != len(normalised):
        raise SiteError(f"{what}s {values} name the same {what} twice.")
    return normalised


def sweep_sites(
    model,
    component: str,
    over: Sequence[str],
    seq_len: int,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[PatchSite]:
    """The sites of a sweep over `over` (a subset of layer, position, head; layer required).

    Example:
        >>> sweep_sites(model, "mlp", ("layer", "position"), seq_len=6, layers=[3, 4])
    """
    if not isinstance(component, str):
        raise InputTypeError(f"component={component!r}: give a name such as 'mlp', 'self_attn' or "
                             "'input'.")
    if not isinstance(over, Sequence) or not all(isinstance(axis, str) for axis in over):
        raise InputTypeError(f"over={over!r}: give a tuple of axis names, e.g. ('layer', 'position').")
    over = (over,) if isinstance(over, str) else tuple(over)
    if over not in SWEEP_AXES:
        raise SiteError(
            f"over={over!r}: sweep over one of {', '.join(map(repr, SWEEP_AXES))}."
        )
    for name, values in (("position", positions), ("head", heads)):
        if values is not None and name not in over:
            raise SiteError(f"{name}s= was given but over={over!r} does not sweep over {name}s; "
                            f"add '{name}' to over.")
    n_layers = len(model.tree.blocks)
    if n_layers == 0:
        raise SiteError("this model has no list of blocks to sweep over.")
    component = _check_component(model, component)
    layer_list = _checked_indices(layers, n_layers, "layer")
    position_list = _checked_indices(positions, seq_len, "position") if "position" in over else [None]
    sites = []
    for layer in layer_list:
        if "head" in over:
            key, n_heads = _head_layout(model, layer, component)
            head_list = _checked_indices(heads, n_heads, "head")
        else:
            key, head_list = component_key(model, layer, component), [None]
        for head in head_list:
            for position in position_list:
                labels = {"layer": layer}
                if head is not None:
                    labels["head"] = head
                if position is not None:
                    labels["position"] = position
                sites.append(PatchSite(
                    key, layer,
                    positions=None if position is None else (position,),
                    head=head,
                    n_heads=None if head is None else n_heads,
                    labels=labels,
                ))
    return sites

