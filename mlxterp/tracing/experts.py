"""Experts and routers of mixture-of-experts blocks, as modules with names.

`exposed(root, tree)` returns a copy of the model (`surgery.replaced`: every weight shared, the
original untouched) in which every MoE block routes through two new child modules:

- `layers.L.mlp.routing`: the routing weights (batch, positions, experts), zero for the experts
  a token is not sent to. Read it to see which experts a token uses; change it to force,
  forbid or re-weight experts, and the block runs the experts the new weights name (each token
  must still name exactly as many experts as the block takes: `RoutingError` otherwise).
- `layers.L.mlp.experts`: every expert's contribution (batch, positions, experts * width): its
  output times its routing weight, zero where the token is not routed to it. Expert e's slice
  is a site (`Site(..., head=e, n_heads=experts)`) for patching, attribution and ablation: a
  change adds exactly its difference to the block's output.

The router's logits stay where the model has them (`layers.L.mlp.gate`). The block's output is
computed as the family computes it, so with nothing changed the exposed model gives bit for
bit the model's output, and the per-expert contributions (a dense tensor, experts times the
block's width) are only computed when something reads or changes them (MLX is lazy).

The routing rule is each family's own, from `ROUTING`: an MoE block of another class is refused
with the list of known ones.

Example:
    >>> moe = InterpretableModel(exposed(model.model, model.tree), tokenizer)
    >>> with moe.trace(prompt) as trace:
    ...     chosen = trace.activations["layers.3.mlp.routing"] > 0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxterp.errors import RoutingError, SiteError
from mlxterp.tracing.intercept import call_input
from mlxterp.tracing.names import ModuleTree
from mlxterp.tracing.surgery import replaced, with_call


class Routing(nn.Identity):
    """The hook of an MoE block's routing weights (batch, positions, experts)."""


class ExpertContributions(nn.Identity):
    """The hook of an MoE block's per-expert contributions (batch, positions, experts * width)."""

    slice_name = "expert"  # what a site's slice of it is called in results (`head` elsewhere)


@dataclass(frozen=True)
class Rule:
    """How a family routes: `route(block, logits) -> (indices, scores)` as the family's own code
    computes them; `flat`: the block works on (tokens, width); `cast`: the sum is cast to the
    experts' dtype."""

    route: Callable
    flat: bool = False
    cast: bool = False


def _softmax_then_top_k(block, logits):
    """qwen3_moe: softmax over every expert, the k largest, renormalised if the block says so."""
    gates = mx.softmax(logits, axis=-1, precise=True)
    k = block.top_k
    indices = mx.stop_gradient(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(gates, indices, axis=-1)
    if block.norm_topk_prob:
        scores /= mx.sum(scores, axis=-1, keepdims=True)
    return indices, scores


def _olmoe(block, logits):
    """olmoe: as qwen3_moe, its k largest taken from the negated weights."""
    weights = mx.softmax(logits, axis=1, precise=True)
    k = block.top_k
    indices = mx.stop_gradient(mx.argpartition(-weights, kth=k - 1, axis=-1)[..., :k])
    scores = mx.take_along_axis(weights, indices, axis=-1)
    if block.norm_topk_prob:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return indices, scores


def _top_k_then_softmax(block, logits):
    """mixtral: the k largest logits, a softmax over those k."""
    k = block.num_experts_per_tok
    indices = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
    scores = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
    return indices, scores


ROUTING = {
    "Qwen3MoeSparseMoeBlock": Rule(_softmax_then_top_k, cast=True),
    "OlmoeSparseMoeBlock": Rule(_olmoe, flat=True),
    "MixtralSparseMoeBlock": Rule(_top_k_then_softmax),
}


def is_moe_block(module: nn.Module) -> bool:
    """A module with a router (`gate`) and experts (`switch_mlp`): what mlx-lm's MoE blocks have."""
    return isinstance(module, nn.Module) and "gate" in module and "switch_mlp" in module


def _exposed_call(block, own_call, args, kwargs):
    rule = block.routing_rule
    x = call_input(block, args, kwargs)
    batch_shape, width = x.shape[:-1], x.shape[-1]
    tokens = x.reshape(-1, width) if rule.flat else x
    logits = block.gate(tokens)
    indices, scores = rule.route(block, logits)
    n_experts, k = block.num_experts, indices.shape[-1]
    weights = _dense(indices, scores, n_experts).reshape(*batch_shape, n_experts)
    new_weights = block.routing(weights)
    if new_weights is not weights:
        indices, scores = _chosen(new_weights.reshape(*indices.shape[:-1], n_experts), k)
    outputs = block.switch_mlp(tokens, indices)
    weighted = outputs * scores[..., None]
    output = weighted.sum(axis=-2)
    if rule.cast:
        output = output.astype(outputs.dtype)
    contributions = mx.swapaxes(_one_hot(indices, n_experts), -1, -2) @ weighted  # (..., experts, width)
    contributions = contributions.reshape(*batch_shape, n_experts * width)
    new_contributions = block.experts(contributions)
    if new_contributions is not contributions:
        change = (new_contributions - contributions).reshape(*batch_shape, n_experts, width).sum(axis=-2)
        output = output.reshape(*batch_shape, width) + change.astype(output.dtype)
    return output.reshape(*batch_shape, width)


def _one_hot(indices: mx.array, n: int) -> mx.array:
    return (indices[..., None] == mx.arange(n)).astype(mx.float32)


def _dense(indices: mx.array, scores: mx.array, n: int) -> mx.array:
    """(..., n) weights: `scores` at `indices`, zero elsewhere."""
    return (_one_hot(indices, n) * scores[..., None].astype(mx.float32)).sum(axis=-2)


def _chosen(weights: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(indices, scores) of the experts with non-zero weight, exactly k per token."""
    counts = (weights != 0).sum(axis=-1)
    if not mx.all(counts == k).item():
        bad = sorted({int(c) for c in counts.reshape(-1).tolist() if c != k})
        raise RoutingError(
            f"a routing intervention left tokens with {bad} experts; this block runs exactly {k} "
            "per token. Give every token k non-zero weights (iv.force_expert and iv.reweight_experts do)."
        )
    indices = mx.stop_gradient(
        mx.argpartition(-(weights != 0).astype(mx.float32), kth=k - 1, axis=-1)[..., :k]
    )
    return indices, mx.take_along_axis(weights, indices, axis=-1)


def moe_blocks(tree: ModuleTree) -> list[str]:
    """Full names of the model's MoE blocks, in order.

    Raises:
        SiteError: a model without MoE blocks, or one whose MoE class has no known routing rule.

    Example:
        >>> moe_blocks(model.tree)[:2]
        ['model.model.layers.0.mlp', 'model.model.layers.1.mlp']
    """
    names = [name for name, module in tree.modules.items() if is_moe_block(module)]
    if not names:
        raise SiteError(
            "this model has no mixture-of-experts blocks (a module with `gate` and "
            "`switch_mlp`); experts and routers exist only in MoE models."
        )
    unknown = sorted({type(tree.modules[n]).__name__ for n in names} - set(ROUTING))
    if unknown:
        raise SiteError(
            f"mlxterp does not know how {', '.join(unknown)} routes; it knows {', '.join(sorted(ROUTING))}."
        )
    return names


def exposed(root: nn.Module, tree: ModuleTree) -> nn.Module:
    """A copy of `root` whose MoE blocks expose `routing` and `experts` (see the module docstring).

    Raises:
        SiteError: a model without MoE blocks, or with an MoE block of an unknown family.

    Example:
        >>> root = exposed(model.model, model.tree)
    """
    blocks = {}
    for name in moe_blocks(tree):
        block = with_call(tree.modules[name], _exposed_call)
        block.routing_rule = ROUTING[type(tree.modules[name]).__name__]
        block.routing = Routing()
        block.experts = ExpertContributions()
        blocks[name] = block
    return replaced(root, tree, blocks)
