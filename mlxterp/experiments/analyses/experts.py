"""Experts and routers of mixture-of-experts models: which experts a behaviour uses, and what
changes when routing does.

- `with_experts(model)`: the model with every MoE block's routing weights and per-expert
  contributions exposed as modules (`layers.L.mlp.routing`, `layers.L.mlp.experts`; see
  `tracing/experts.py`), a new model value sharing every weight.
- `expert_site(moe, layer, expert)`: expert e's contribution at block L as a `Site`, for
  interventions, `patching_sweep(sites=...)` and `attribution_patching(sites=...)`.
- `expert_attribution`: every (layer, expert) site estimated from one backward pass, the top ones
  patched exactly (`verify_top`).
- `routing_statistics`: how often each expert is used at each layer over a set of prompts,
  clean against corrupted.

Example:
    >>> moe = model.with_experts()
    >>> estimate, exact = expert_attribution(moe, clean, corrupted, verify=10, metric="logit_diff", ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxterp.errors import InputTypeError, SiteError
from mlxterp.experiments.analyses.attribution import attribution_patching, verify_top
from mlxterp.experiments.pipeline.results import VIEWS, PatchingResult
from mlxterp.experiments.pipeline.sites import check_layer
from mlxterp.models.identity import model_name
from mlxterp.tracing.experts import ExpertContributions, exposed
from mlxterp.tracing.names import Site


def with_experts(model):
    """`model` with its MoE blocks' routing and experts exposed (a new model sharing every
    weight; its output is bit for bit the model's until routing or an expert is changed).

    Raises:
        SiteError: a model without MoE blocks, or with blocks of a family mlxterp cannot route.

    Example:
        >>> moe = model.with_experts()
        >>> with moe.trace(prompt) as trace:
        ...     used = trace.activations["layers.3.mlp.routing"] > 0
    """
    if any(isinstance(m, ExpertContributions) for m in model.tree.modules.values()):
        raise SiteError("this model's experts are already exposed.")
    return type(model)(exposed(model.model, model.tree), model.tokenizer)


def _expert_modules(moe) -> dict[int, tuple[str, int]]:
    """{layer: (name of its experts hook, number of experts)} of a model `with_experts` made."""
    found = {}
    for name, module in moe.tree.modules.items():
        if isinstance(module, ExpertContributions):
            block = name.rpartition(".")[0]
            found[moe.tree.block_of(name)] = (name, moe.tree.modules[block].num_experts)
    if not found:
        raise SiteError("experts are sites only in a model with them exposed: moe = model.with_experts().")
    return found


def expert_site(moe, layer: int, expert: int, positions: tuple[int, ...] | None = None) -> Site:
    """Expert `expert`'s contribution (its output times its routing weight) at block `layer`,
    at `positions` (None: all), in a model `with_experts` made.

    Raises:
        SiteError: a model without exposed experts, a layer without an MoE block, an expert
            beyond the block's.

    Example:
        >>> moe.patching_sweep(clean, corrupted, sites=[expert_site(moe, 12, e) for e in range(128)])
    """
    return _expert_site(_expert_modules(moe), check_layer(moe, layer), expert, positions)


def _expert_site(hooks: dict[int, tuple[str, int]], layer: int, expert: int,
                 positions: tuple[int, ...] | None = None) -> Site:
    if layer not in hooks:
        raise SiteError(f"block {layer} has no MoE block; these do: {sorted(hooks)}.")
    name, n_experts = hooks[layer]
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < n_experts:
        raise SiteError(f"expert {expert!r} does not exist: block {layer} has experts 0 to {n_experts - 1}.")
    return Site(name, positions=positions, head=expert, n_heads=n_experts)


def expert_attribution(
    moe, clean=None, corrupted=None, layers: Sequence[int] | None = None, verify: int = 10, **options
) -> tuple[PatchingResult, PatchingResult | None]:
    """Every (layer, expert) of `layers` (None: every MoE block) estimated by attribution
    patching (one backward pass), and the `verify` highest-ranked patched exactly (0: none).
    `options` are `attribution_patching`'s (metric, answer, pairs, ...).

    Raises:
        SiteError: a model without exposed experts, or a layer without an MoE block.
        InputTypeError: `verify` that is no whole number from 0.

    Example:
        >>> estimate, exact = expert_attribution(moe, clean, corrupted, metric="logit_diff",
        ...                                      answer=" Paris", wrong_answer=" Rome")
    """
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise InputTypeError(f"verify={verify!r}: give how many top sites to patch exactly, a whole number.")
    hooks = _expert_modules(moe)
    chosen = sorted(hooks) if layers is None else [check_layer(moe, layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in hooks]
    if missing:
        raise SiteError(f"blocks {missing} have no MoE block; these do: {sorted(hooks)}.")
    sites = [_expert_site(hooks, layer, e) for layer in chosen for e in range(hooks[layer][1])]
    estimate = attribution_patching(moe, clean, corrupted, sites=sites, **options)
    exact = verify_top(moe, estimate, min(verify, len(sites))) if verify else None
    return estimate, exact


@dataclass
class RoutingStatistics:
    """How often each expert is used, per layer, over the tokens of some prompts: `clean[l, e]`
    and `corrupted[l, e]` are the fractions of tokens whose block l sends to expert e (`corrupted`
    None for one set of prompts).

    Example:
        >>> stats = routing_statistics(moe, pairs=pairs)
        >>> stats.table(5)
    """

    layers: list[int]
    clean: np.ndarray
    corrupted: np.ndarray | None
    tokens: int
    model: str

    def difference(self) -> np.ndarray:
        """clean minus corrupted, (layers, experts)."""
        if self.corrupted is None:
            raise InputTypeError(
                "these statistics come from one set of prompts; there is nothing to compare."
            )
        return self.clean - self.corrupted

    def table(self, top: int = 10) -> str:
        """The `top` (layer, expert) pairs whose use differs most between clean and corrupted (or
        the most used, for one set), as text.

        Raises:
            InputTypeError: `top` that is no whole number from 1.

        Example:
            >>> print(stats.table(5))
        """
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise InputTypeError(f"top={top!r}: give a whole number from 1.")
        values = self.clean if self.corrupted is None else self.difference()
        order = np.argsort(-np.abs(values), axis=None, kind="stable")[:top]
        lines = ["layer  expert   clean" + ("  corrupted  difference" if self.corrupted is not None else "")]
        for flat in order:
            row, expert = divmod(int(flat), values.shape[1])
            line = f"{self.layers[row]:>5}  {expert:>6}  {self.clean[row, expert]:6.1%}"
            if self.corrupted is not None:
                line += f"  {self.corrupted[row, expert]:9.1%}  {values[row, expert]:+10.1%}"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """A heatmap, layers by experts: the difference clean minus corrupted (or the use).

        Example:
            >>> stats.plot("routing.png")
        """
        return VIEWS["routing"](self, path, overwrite=overwrite)


def routing_statistics(moe, prompts: Sequence[str] | None = None, pairs=None) -> RoutingStatistics:
    """Per layer and expert, the fraction of tokens routed to it over `prompts`, or over the
    clean and the corrupted prompts of `pairs` (each a PromptPair or a (clean, corrupted) tuple).

    Raises:
        InputTypeError: neither or both of prompts and pairs.
        SiteError: a model without exposed experts.

    Example:
        >>> routing_statistics(moe, pairs=ioi_pairs(32)).table(10)
    """
    if (prompts is None) == (pairs is None):
        raise InputTypeError("give prompts=[...] or pairs=[...], one of them.")
    hooks = _expert_modules(moe)
    layers = sorted(hooks)
    keys = [f"{hooks[layer][0].rpartition('.')[0]}.routing" for layer in layers]

    def frequencies(texts) -> tuple[np.ndarray, int]:
        counts = np.zeros((len(layers), max(n for _, n in hooks.values())))
        tokens = 0
        for text in texts:
            with moe.trace(text, capture=keys) as trace:
                used = [
                    np.array(trace.activations[key] > 0).reshape(-1, trace.activations[key].shape[-1])
                    for key in keys
                ]
            for row, u in enumerate(used):
                counts[row, : u.shape[1]] += u.sum(axis=0)
            tokens += used[0].shape[0]
        return counts / tokens, tokens

    if prompts is not None:
        clean, tokens = frequencies(prompts)
        return RoutingStatistics(layers, clean, None, tokens, model_name(moe.model))
    cleans = [p.clean if hasattr(p, "clean") else p[0] for p in pairs]
    corrupteds = [p.corrupted if hasattr(p, "corrupted") else p[1] for p in pairs]
    clean, tokens = frequencies(cleans)
    corrupted, _ = frequencies(corrupteds)
    return RoutingStatistics(layers, clean, corrupted, tokens, model_name(moe.model))
