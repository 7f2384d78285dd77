"""Module names: every module of a model by its path, and short keys resolved to full names.

A module's full name is its path from the wrapper, whose attribute `model` is the wrapped module:
`model.model.layers.10.mlp` in an mlx-lm Llama. A key given by a user is a full name or any
suffix of one that starts at a dot (`layers.10.mlp`, `10.mlp`).

Two suffixes address more than a module's output:
- `name:input` is the first positional argument the module was called with (for `o_proj`, the
  concatenated head outputs),
- `name#k` is the k-th call (from 0) of a module called several times in one forward; `name`
  alone is its first call when read, and every call when intervened on.

An attention module's probabilities are read (never intervened on) as `name:pattern`, e.g.
`layers.3.self_attn:pattern` (see `attention.py`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxterp.errors import InputTypeError, SiteError, UnknownModuleError

ROOT = "model"
OUTPUT_KEY = "output"  # the key of the model's own output in `trace.activations`
PATTERN = ":pattern"  # the key suffix of an attention module's probabilities (read-only)

_SITE = re.compile(r"^(?P<module>[^#:]+)(?:#(?P<call>\d+))?(?::(?P<input>input))?$")


def _natural(name: str) -> list:
    """Sort key that orders `layers.2` before `layers.10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise InputTypeError(
            f"module keys are strings such as 'layers.3.mlp'; got {type(key).__name__} {key!r}."
        )


def positions_mask(positions: tuple[int, ...] | None, length: int, start: int = 0,
                   what: str = "positions") -> np.ndarray:
    """(length,) bool: which of an activation's positions are among `positions` (None: all),
    its first position being position `start` of the sequence. Negative positions count from
    the end, as in Python, where the activation is the whole sequence (`start` 0). The one place
    positions become a mask: sites, patches, corruptions and `iv.at_positions` all go through it.

    Example:
        >>> positions_mask((1, 3), 4)
        array([False,  True, False,  True])
    """
    if positions is None:
        return np.ones(length, dtype=bool)
    if start == 0:
        bad = [p for p in positions if not -length <= p < length]
        if bad:
            raise SiteError(f"{what}: positions {bad} are out of range for {length} tokens "
                            f"(valid: {-length} to {length - 1}).")
        local = [p % length for p in positions]
    else:
        local = [p - start for p in positions if start <= p < start + length]
    mask = np.zeros(length, dtype=bool)
    mask[local] = True
    return mask


def patch_rows(receiver: mx.array, donor: mx.array, sites: list[Site | None], start: int = 0) -> mx.array:
    """`receiver` (batch, positions, features) with, in each row r, the part `sites[r]` covers
    taken from `donor` (None: row r unchanged); `start` is the sequence position of the
    activations' first position. The one function that applies a patch: Site-keyed trace
    interventions, the engine's batched rows and the gradient runner all call it.

    Example:
        >>> patch_rows(corrupted_rows, clean_row, [None, Site("layers.3.mlp", positions=(5,))])
    """
    batch, length, width = receiver.shape
    rows = np.zeros((batch, length, 1), dtype=bool)
    columns = np.zeros((batch, 1, width), dtype=bool)
    for row, site in enumerate(sites):
        if site is not None:
            rows[row, :, 0], columns[row, 0] = site.selection(length, width, start)
    return mx.where(mx.array(rows) & mx.array(columns), donor, receiver)


@dataclass(frozen=True)
class Site:
    """Where an activation lives, and which part of it an intervention or a patch changes.

    An activation is a module's output (or its input), at one of its calls. A site may narrow
    it to some positions and to one head's slice of the features.

    Example:
        >>> Site("layers.3.self_attn.o_proj", is_input=True, positions=(5,), head=2, n_heads=9)
        >>> Site("layers.3.mlp").key
        'layers.3.mlp'
    """

    module: str  # a full name, or a short key until `ModuleTree.site` resolves it
    call: int | None = None  # None: the first call when read, every call when intervened on
    is_input: bool = False
    positions: tuple[int, ...] | None = None  # None: every position
    head: int | None = None  # None: all features; else one of `n_heads` equal feature slices
    n_heads: int | None = None

    def __post_init__(self):
        if self.positions is not None:
            if not self.positions:
                raise SiteError(f"site {self.key!r}: positions is empty; give at least one, or None for all.")
            object.__setattr__(self, "positions", tuple(self.positions))
        if (self.head is None) != (self.n_heads is None):
            raise SiteError(f"site {self.key!r}: give head and n_heads together.")
        if self.head is not None and not 0 <= self.head < self.n_heads:
            raise SiteError(f"site {self.key!r}: head {self.head} is not in 0..{self.n_heads - 1}.")

    @property
    def key(self) -> str:
        """The activation key: `module[#call][:input]`."""
        call = "" if self.call is None else f"#{self.call}"
        return f"{self.module}{call}{':input' if self.is_input else ''}"

    def selection(self, length: int, width: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks of the positions (length,) and features (width,) this site covers, in
        an activation whose first position is position `start` of the sequence."""
        rows = positions_mask(self.positions, length, start, self.key)
        columns = np.ones(width, dtype=bool)
        if self.head is not None:
            if width % self.n_heads:
                raise SiteError(f"{self.key}: width {width} does not split into {self.n_heads} heads.")
            size = width // self.n_heads
            columns[:] = False
            columns[self.head * size:(self.head + 1) * size] = True
        return rows, columns

    def patch(self, receiver: mx.array, donor: mx.array, start: int = 0) -> mx.array:
        """`receiver` with this site's part taken from `donor` (both (batch, seq, features), or
        donor broadcast to it); `start` as in `selection`."""
        return patch_rows(receiver, donor, [self] * receiver.shape[0], start)

    @property
    def parts(self) -> tuple[Site, ...]:
        """The sites patched together when this one is patched: itself (see `SiteGroup`)."""
        return (self,)


@dataclass(frozen=True)
class SiteGroup:
    """Several sites patched together in one run, as one site of a sweep: causal tracing's
    window, the MLP outputs of 10 consecutive layers at one token, is a group of 10 sites.

    Example:
        >>> SiteGroup(tuple(Site(f"layers.{l}.mlp", positions=(4,)) for l in range(3, 13)))
    """

    parts: tuple[Site, ...]

    def __post_init__(self):
        if not self.parts or not all(isinstance(p, Site) for p in self.parts):
            raise SiteError(f"a SiteGroup takes a non-empty tuple of Site; got {self.parts!r}.")
        keys = [p.key for p in self.parts]
        if len(set(keys)) != len(keys):
            raise SiteError(f"a SiteGroup patches each activation once; {keys} repeats one.")
        object.__setattr__(self, "parts", tuple(self.parts))

    @property
    def key(self) -> str:
        return "+".join(p.key for p in self.parts)


class ModuleTree:
    """All modules of a model by full name, with the one list of blocks the model runs through.

    Example:
        >>> tree = ModuleTree(mlx_lm_llama)
        >>> tree.resolve("layers.10.mlp")
        'model.model.layers.10.mlp'
    """

    def __init__(self, model: nn.Module):
        named = {f"{ROOT}.{path}" if path else ROOT: m for path, m in model.named_modules()}
        self.modules: dict[str, nn.Module] = {name: named[name] for name in sorted(named, key=_natural)}
        self.blocks_name = self._find_blocks()
        # Full names of the blocks, in order (empty when the model has no list of modules).
        self.blocks: list[str] = []
        if self.blocks_name is not None:
            owner, _, attr = self.blocks_name.rpartition(".")
            self.blocks = [f"{self.blocks_name}.{i}" for i in range(len(self.modules[owner][attr]))]

    def _find_blocks(self) -> str | None:
        """The module list holding the most parameters: the blocks a transformer iterates over.

        Every mlx-lm model keeps its blocks in one list (`layers`, `h`, `blocks`, ...); weighing
        lists by parameter count picks the language model's over, say, a list of two norms.
        """
        best, best_size = None, 0
        for name, module in self.modules.items():
            for attr, value in module.items():
                if isinstance(value, list) and value and all(isinstance(v, nn.Module) for v in value):
                    size = sum(p.size for m in value for _, p in tree_flatten(m.parameters()))
                    if size > best_size:
                        best, best_size = f"{name}.{attr}", size
        return best

    def resolve(self, key: str) -> str:
        """The full module name a key addresses; a clear error when it matches none or several."""
        _check_key(key)
        if key in self.modules:
            return key
        matches = [name for name in self.modules if name.endswith("." + key)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            close = difflib.get_close_matches(key, self._short_names(key), n=5, cutoff=0.5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise UnknownModuleError(f"no module matches {key!r}.{hint}")
        shown = ", ".join(matches[:8]) + (f", ... ({len(matches)} in all)" if len(matches) > 8 else "")
        raise UnknownModuleError(
            f"{key!r} matches several modules: {shown}. Use a longer key, e.g. {matches[0]!r}."
        )

    def _short_names(self, key: str) -> list[str]:
        """Each module name cut to as many dot-parts as the key has, for close-match hints."""
        parts = key.count(".") + 1
        return sorted({".".join(name.split(".")[-parts:]) for name in self.modules} | set(self.modules))

    def site(self, key: str) -> Site:
        """Parse and resolve an activation key such as `layers.3.self_attn.o_proj#0:input`."""
        _check_key(key)
        match = _SITE.match(key)
        if match is None:
            raise UnknownModuleError(
                f"{key!r} is not an activation key; use a module name, optionally followed by "
                "#k (its k-th call) and :input (its input), e.g. 'layers.3.self_attn.o_proj:input'."
            )
        call = match["call"]
        return Site(self.resolve(match["module"]), None if call is None else int(call),
                    match["input"] is not None)

    def block_of(self, module: str) -> int | None:
        """The index of the block that is or holds `module` (a full name), or None."""
        if self.blocks_name is None or not module.startswith(self.blocks_name + "."):
            return None
        index = module[len(self.blocks_name) + 1:].partition(".")[0]
        return int(index) if index.isdigit() and int(index) < len(self.blocks) else None

    def canonical_key(self, key: str) -> str:
        """The key a trace stores an activation under: full name, with `#k` only past call 0."""
        if key == OUTPUT_KEY:
            return key
        if isinstance(key, str) and key.endswith(PATTERN):
            site = self.site(key[:-len(PATTERN)])
            if site.is_input:
                raise UnknownModuleError(f"{key!r}: ':pattern' follows a module name, not ':input'.")
            return Site(site.module, site.call or None).key + PATTERN
        site = self.site(key)
        if site.module == ROOT and not site.is_input and not site.call:
            return OUTPUT_KEY  # the wrapped model's own output is the trace's output
        return Site(site.module, site.call or None, site.is_input).key
