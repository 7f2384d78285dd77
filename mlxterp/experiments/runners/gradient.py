"""The gradient runner: every site's patching effect estimated from gradients, all at once.

Patching site s moves the metric m by m(a_r + (a_d - a_r)|s) - m(a_r). Attribution patching
(AtP; Nanda 2023, Kramar et al. 2024) takes the first-order term, (a_d - a_r)|s . dm/da at the
receiving run: one forward pass of each prompt and one backward pass per pair give the estimate
of every site of the plan. Integrated gradients (`method="ig"`, as EAP-IG does for edges) average
dm/da over `steps` points on the straight line from the receiver's to the donor's residual stream
entering the first block, which follows the metric where it curves; for a site at that input the
average is exact as the steps grow.

The runner takes the same `Plan` as the exact engine and returns the same `SweepValues`, whose
`patched` values are estimates: the receiver's value plus each site's estimated effect.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxterp.errors import GradientError, InputError, MetricError
from mlxterp.experiments.pipeline.metrics import evaluate, measure
from mlxterp.experiments.pipeline.plan import Plan, SweepValues
from mlxterp.experiments.runners.naive import second_call, site_activations, then
from mlxterp.tracing.inputs import is_index

METHODS = ("atp", "ig")


def check_gradients(gradients: dict[str, mx.array], plan: Plan, dtype: mx.Dtype) -> None:
    # one synchronisation for every activation: thousands of sites may sit on dozens of them
    finite, nonzero = (mx.stack([check(g) for g in gradients.values()]).tolist() for check in (
        lambda g: mx.all(mx.isfinite(g)), lambda g: mx.any(g != 0)))
    if not all(finite):
        raise GradientError(
            f"the backward pass of {plan.metric.name} overflowed in {dtype} (non-finite gradients); "
            "load the model in float32 (mlxterp.load(name, dtype='float32')) for gradients."
        )
    if not any(nonzero):
        raise MetricError(
            f"metric {plan.metric.name!r} has a zero gradient at every site, so attribution "
            "patching would estimate no effect anywhere. Use a differentiable metric computed "
            "with MLX (kl, logit_diff, l2, mse, cosine): argmax, .item() or numpy cut the gradient."
        )


def _estimates(plan: Plan, donor: dict[str, mx.array], receiver: dict[str, mx.array],
               gradients: dict[str, mx.array]) -> np.ndarray:
    """(sites,): each site's first-order effect, (patched - receiver) . dm/da: the sum of
    (donor - receiver) * dm/da over the positions and features the site covers, as
    `Site.selection` (which every patch applies) defines them.

    The products are reduced on the device, once per activation: per position over all its
    features, and per position and head slice where sites take slices. Thousands of sites on one
    activation (the experts of every block, the features of an SAE) then cost one pass over it
    and a few small arrays on the host, not a copy each."""
    layouts = {(part.key, part.n_heads) for site in plan.sites for part in site.parts}
    reduced = {}
    for key, heads in layouts:
        product = ((donor[key] - receiver[key]).astype(mx.float32) * gradients[key])[0]  # (positions, width)
        # a head is its equal slice of the features (Site.selection)
        reduced[key, heads] = product.sum(axis=-1) if heads is None else product.reshape(
            product.shape[0], heads, -1).sum(axis=-1)
    mx.eval(reduced)
    reduced = {layout: np.array(r).astype(np.float64) for layout, r in reduced.items()}
    by_positions = {}  # (key, heads, positions) -> the sums over those positions, per head
    estimates = np.zeros(len(plan.sites))
    for i, site in enumerate(plan.sites):
        for part in site.parts:  # first order: parts add up
            layout = (part.key, part.n_heads, part.positions)
            if layout not in by_positions:
                sums = reduced[part.key, part.n_heads]
                rows, _ = part.selection(len(sums), 1 if part.head is None else part.n_heads)
                by_positions[layout] = sums[rows].sum(axis=0)
            total = by_positions[layout]
            estimates[i] += total if part.head is None else total[part.head]
    return estimates


def _capture(model, tokens: mx.array, keys: list[str], position: int,
             interventions: dict) -> tuple[dict, mx.array]:
    """(activations at `keys`, logits at `position`) of one forward of `tokens` (1, seq), the run
    that `interventions` make (a corruption)."""
    with model.trace(tokens, interventions=interventions,
                     capture=[*keys, *map(second_call, keys)]) as trace:
        return site_activations(trace, keys), trace.output[0, position]


def _gradient_pass(model, plan: Plan, pair: int, tokens: mx.array, donor_logits: mx.array,
                   keys: list[str], like: dict[str, mx.array], start: tuple[str, mx.array] | None):
    """One forward and backward of `tokens` (pair `pair`'s receiver, once per row): (dm/da at
    every key, averaged over rows, as numpy; the rows' logits at the measured position; their
    activations).

    `start` = (key, values): that activation is replaced by `values` (one row per step) first.
    `like` gives each key's activation shape and dtype.
    """
    def metric_sum(deltas: dict[str, mx.array]):
        def shift(key: str):
            if start is not None and key == start[0]:
                return lambda x: start[1].astype(x.dtype) + deltas[key]
            return lambda x: x + deltas[key]

        interventions = {key: shift(key) for key in deltas}
        if start is not None and start[0] not in deltas:
            interventions[start[0]] = lambda x: start[1].astype(x.dtype)
        interventions = then(plan.interventions(pair, plan.receiver), interventions)
        with model.trace(tokens, interventions=interventions, capture=keys) as trace:
            logits = trace.output[:, plan.position]
            acts = site_activations(trace, keys)
        return mx.sum(evaluate(plan.metric_of(pair), logits, donor_logits)), (logits, acts)

    rows = tokens.shape[0]
    zeros = {key: mx.zeros((rows, *like[key].shape[1:]), dtype=like[key].dtype) for key in keys}
    (_, (logits, acts)), gradients = mx.value_and_grad(metric_sum)(zeros)
    check_gradients(gradients, plan, like[keys[0]].dtype)
    mean = {key: g.astype(mx.float32).mean(axis=0, keepdims=True) for key, g in gradients.items()}
    return mean, logits, acts


def run_gradient(model, plan: Plan, method: str = "atp", steps: int = 16) -> SweepValues:
    """Estimated metric values of every patched run of `plan`, from gradients.

    `method="atp"`: the gradient at the receiving run: one forward of the donor prompt, one
    forward and backward of the receiving prompt per pair. `method="ig"`: the mean gradient at
    `steps` midpoints between the receiver's and the donor's first-block input (one plain forward
    of each prompt, then one batch of `steps` rows forward and backward, per pair).

    Example:
        >>> run_gradient(model, plan).recovery(plan.direction)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"method={method!r}: use 'atp' or 'ig'.")
    if not is_index(steps) or steps < 1:
        raise InputError(f"steps={steps!r}: give a whole number of steps, at least 1.")
    keys = sorted({part.key for site in plan.sites for part in site.parts})
    start_key = f"{model.tree.blocks[0]}:input"  # where IG interpolates: the first block's input
    values = SweepValues.empty(plan.pairs, len(plan.sites))
    for pair in range(plan.pairs):
        tokens = plan.tokens(pair)
        donor_tokens, receiver_tokens = (tokens[run:run + 1] for run in (plan.donor, plan.receiver))
        donor, donor_logits = _capture(model, donor_tokens, [*keys, start_key], plan.position,
                                       plan.interventions(pair, plan.donor))
        if method == "atp":  # the gradient pass is the receiver's forward
            gradients, logits, receiver = _gradient_pass(model, plan, pair, receiver_tokens,
                                                         donor_logits, keys, donor, None)
            receiver_logits = logits[0]
        else:
            receiver, receiver_logits = _capture(model, receiver_tokens, [*keys, start_key], plan.position,
                                                 plan.interventions(pair, plan.receiver))
            alphas = ((mx.arange(steps) + 0.5) / steps)[:, None, None]
            start = receiver[start_key] + alphas * (donor[start_key] - receiver[start_key])
            gradients, _, _ = _gradient_pass(model, plan, pair, mx.repeat(receiver_tokens, steps, axis=0),
                                             donor_logits, keys, donor, (start_key, start))
        base = [donor_logits, receiver_logits] if plan.donor == 0 else [receiver_logits, donor_logits]
        values.set_base(pair, *measure(plan.metric_of(pair), mx.stack(base), donor_logits))
        values.check_baseline(plan, pair)
        receiver_values = (values.clean, values.corrupted)[plan.receiver]
        receiver_noise = (values.clean_noise, values.corrupted_noise)[plan.receiver]
        values.patched[pair] = receiver_values[pair] + _estimates(plan, donor, receiver, gradients)
        values.patched_noise[pair] = receiver_noise[pair]
    return values
