"""The sites of a sweep: which activations a patching experiment patches, and their labels.

A sweep over layers, positions and heads of one component becomes a list of `Site`s (the one
site type, from the tracing layer) and, beside each, its labels ({"layer": 3, "position": 5}),
which results use to name and arrange it. Explicit sites get labels from where they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from mlxterp.errors import InputTypeError, SiteError
from mlxterp.tracing.inputs import is_index
from mlxterp.tracing.names import Site, SiteGroup

ALIASES = {"attn": "self_attn", "self_attn": "attn"}  # names of attention in mlx-lm families
SWEEP_AXES = (("layer",), ("layer", "position"), ("layer", "head"), ("layer", "head", "position"))

Labels = dict  # e.g. {"layer": 3, "head": 2, "position": 5}


def check_sites(model, sites: Sequence[Site | str]) -> tuple[list[Site], list[Labels]]:
    """Explicit sites (or activation keys), resolved to full names, each inside a block, with
    labels from where they are: layer, component (the module inside the block), head, position.

    Example:
        >>> sites, labels = check_sites(model, ["layers.3.mlp", Site("layers.3.mlp", positions=(5,))])
        >>> labels
        [{'layer': 3, 'component': 'mlp'}, {'layer': 3, 'component': 'mlp', 'position': 5}]
    """
    if (not isinstance(sites, Sequence) or isinstance(sites, str)
            or not all(isinstance(site, Site | str) for site in sites)):
        raise InputTypeError(f"sites= takes a list of Site or activation keys; got {sites!r}.")
    if not sites:
        raise SiteError("the list of sites is empty.")
    resolved = {}  # key -> (full module name, label without head and position): once per key
    checked, labels, seen = [], [], set()
    for site in sites:
        site = site if isinstance(site, Site) else Site(site)
        if site.key not in resolved:
            resolved[site.key] = _where(model, site.key)
        module, where = resolved[site.key]
        label = dict(where)
        if site.head is not None:
            # A module whose slices are not heads (an SAE's features, a block's experts) says so.
            label[getattr(model.tree.modules[module], "slice_name", "head")] = site.head
        if site.positions is not None:
            label["position"] = site.positions[0] if len(site.positions) == 1 else list(site.positions)
        identity = (module, site.is_input, site.head, site.positions)
        if identity in seen:
            raise SiteError("two sites patch the same thing; give each site once.")
        seen.add(identity)
        checked.append(site if site.module == module else replace(site, module=module))
        labels.append(label)
    return checked, labels


def _where(model, key: str) -> tuple[str, Labels]:
    """The full module name of a site's key, and its layer and component labels."""
    where = model.tree.site(key)
    if where.call is not None:
        raise SiteError(f"site {key!r}: patch sites patch every call; drop the #k.")
    layer = model.tree.block_of(where.module)
    if layer is None:
        raise SiteError(
            f"site {key!r} is not inside a block; patch sites must be a block, its "
            "input, or a module inside it."
        )
    block = model.tree.blocks[layer]
    component = where.module[len(block) + 1:] or "output"
    if where.is_input:
        component = "input" if component == "output" else f"{component}:input"
    return where.module, {"layer": layer, "component": component}


def block_component_key(block: str, component: str) -> str:
    """The activation key of `component` in the block named `block` (`input` is its input,
    `output` its output), whether or not that module exists."""
    if component == "input":
        return f"{block}:input"
    if component == "output":
        return block
    return f"{block}.{component}"


def component_key(model, layer: int, component: str) -> str:
    """The activation key of `component` in block `layer` (`input` is the block's input)."""
    key = block_component_key(model.tree.blocks[layer], component)
    if component not in ("input", "output") and key not in model.tree.modules:
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


def check_component(model, component: str) -> str:
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



def check_layer(model, layer: object) -> int:
    """`layer` as an index into the model's blocks (negative counts from the end), or an error
    giving the valid range.

    Example:
        >>> check_layer(model, -1)
        29
    """
    if not is_index(layer):
        raise InputTypeError(f"layer={layer!r}: give a block index, a whole number such as 6.")
    return checked_indices([layer], len(model.tree.blocks), "layer")[0]


def checked_indices(values: Sequence[int] | None, count: int, what: str) -> list[int]:
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
) -> tuple[list[Site], list[Labels]]:
    """The sites of a sweep over `over` (one of `SWEEP_AXES`, checked by `SweepOptions`), and
    their labels.

    Example:
        >>> sweep_sites(model, "mlp", ("layer", "position"), seq_len=6, layers=[3, 4])
    """
    n_layers = len(model.tree.blocks)
    if n_layers == 0:
        raise SiteError("this model has no list of blocks to sweep over.")
    component = check_component(model, component)
    layer_list = checked_indices(layers, n_layers, "layer")
    position_list = checked_indices(positions, seq_len, "position") if "position" in over else [None]
    sites, labels = [], []
    for layer in layer_list:
        if "head" in over:
            key, n_heads = _head_layout(model, layer, component)
            head_list = checked_indices(heads, n_heads, "head")
        else:
            key, head_list = component_key(model, layer, component), [None]
        where = model.tree.site(key)
        for head in head_list:
            for position in position_list:
                label = {"layer": layer}
                if head is not None:
                    label["head"] = head
                if position is not None:
                    label["position"] = position
                sites.append(replace(where, positions=None if position is None else (position,),
                                     head=head, n_heads=None if head is None else n_heads))
                labels.append(label)
    return sites, labels


def location(site: Site | SiteGroup) -> dict:
    """Where a site is, as JSON: `Site(**location)` takes it; a group is {"parts": [...]}.

    Example:
        >>> location(Site("model.model.layers.3.mlp"))["module"]
        'model.model.layers.3.mlp'
    """
    if isinstance(site, SiteGroup):
        return {"parts": [location(part) for part in site.parts]}
    return {"module": site.module, "is_input": site.is_input,
            "positions": None if site.positions is None else list(site.positions),
            "head": site.head, "n_heads": site.n_heads}


def site_at(location: dict) -> Site | SiteGroup:
    """The site a `location` describes.

    Example:
        >>> site_at(result.sites[0]["location"])
    """
    if "parts" in location:
        return SiteGroup(tuple(site_at(part) for part in location["parts"]))
    return Site(**location)
