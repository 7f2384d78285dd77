"""Attribution patching: every site's patching effect estimated from gradients, all at once.

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

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputTypeError, MlxterpError
from mlxterp.experiments.datasets import PromptPair
from mlxterp.experiments.engine import second_call, site_activations, then
from mlxterp.experiments.metrics import MetricError, MetricFn, evaluate, measure
from mlxterp.experiments.patching import patching_sweep, prepare_sweeps, run_sweeps, site_at, sweep_result
from mlxterp.experiments.plan import Plan, SweepValues
from mlxterp.experiments.results import PatchingResult
from mlxterp.experiments.sites import is_index
from mlxterp.tracing.names import Site

METHODS = ("atp", "ig")


class GradientError(MlxterpError, ArithmeticError):
    """A backward pass that gives no usable gradient: non-finite, or zero everywhere."""


def _check_gradients(gradients: dict[str, mx.array], plan: Plan, dtype: mx.Dtype) -> None:
    finite = all(mx.all(mx.isfinite(g)).item() for g in gradients.values())
    if not finite:
        raise GradientError(
            f"the backward pass of {plan.metric.name} overflowed in {dtype} (non-finite gradients); "
            "load the model in float32 (mlxterp.load(name, dtype='float32')) for gradients."
        )
    if not any(mx.any(g != 0).item() for g in gradients.values()):
        raise MetricError(
            f"metric {plan.metric.name!r} has a zero gradient at every site, so attribution "
            "patching would estimate no effect anywhere. Use a differentiable metric computed "
            "with MLX (kl, logit_diff, l2, mse, cosine): argmax, .item() or numpy cut the gradient."
        )


def _estimates(plan: Plan, differences: dict[str, np.ndarray],
               gradients: dict[str, np.ndarray]) -> np.ndarray:
    """(sites,): each site's first-order effect, (a_d - a_r) . dm/da over its selection."""
    products = {key: (differences[key] * gradients[key])[0] for key in gradients}
    estimates = np.zeros(len(plan.sites))
    for i, site in enumerate(plan.sites):
        for part in site.parts:  # first order: a group's effect is the sum of its parts'
            product = products[part.key]
            rows, columns = part.selection(*product.shape)
            estimates[i] += product[rows][:, columns].sum(dtype=np.float64)
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
    _check_gradients(gradients, plan, like[keys[0]].dtype)
    mean = {key: np.array(g.astype(mx.float32).mean(axis=0, keepdims=True)) for key, g in gradients.items()}
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
    if method not in METHODS:
        raise InputTypeError(f"method={method!r}: use 'atp' or 'ig'.")
    if not is_index(steps) or steps < 1:
        raise InputTypeError(f"steps={steps!r}: give a whole number of steps, at least 1.")
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
        differences = {key: np.array((donor[key] - receiver[key]).astype(mx.float32)) for key in keys}
        receiver_values = (values.clean, values.corrupted)[plan.receiver]
        receiver_noise = (values.clean_noise, values.corrupted_noise)[plan.receiver]
        values.patched[pair] = receiver_values[pair] + _estimates(plan, differences, gradients)
        values.patched_noise[pair] = receiver_noise[pair]
    return values


def attribution_patching(
    model,
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | None = None,
    component: str = "mlp",
    over: Sequence[str] = ("layer",),
    metric: str | MetricFn = "kl",
    method: str = "atp",
    steps: int = 16,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sites: Sequence[Site | str] | None = None,
    answer: str | int | None = None,
    wrong_answer: str | int | None = None,
    position: int = -1,
    direction: str = "denoise",
    pairs: str | Path | Sequence[PromptPair] | None = None,
    group: mx.distributed.Group | None = None,
) -> PatchingResult:
    """Estimate the recovery of every site of a patching sweep from gradients.

    Takes the arguments of `patching_sweep` (the same sites, metrics, pairs or dataset,
    directions and process group) and returns the same `PatchingResult`, with `method` "atp" or
    "ig" recorded: an estimate, to be checked with the exact engine where it matters
    (`mlxterp attribute --verify K`).

    Example:
        >>> est = attribution_patching(model, clean, corrupted, component="input",
        ...                            over=("layer", "position"), metric="logit_diff",
        ...                            answer=" Mary", wrong_answer=" John")
        >>> est.top(5)
    """
    sweeps = prepare_sweeps(model, clean, corrupted, pairs, answer, wrong_answer, component=component,
                            over=over, layers=layers, positions=positions, heads=heads, sites=sites,
                            metric=metric, position=position, direction=direction)
    values, resources = run_sweeps(sweeps, lambda plan: run_gradient(model, plan, method=method, steps=steps),
                                   group)
    return sweep_result(model, sweeps, values, method=method, resources=resources)


def verify_top(model, estimate: PatchingResult, k: int, metric: str | MetricFn | None = None,
               max_batch: int | None = None, group: mx.distributed.Group | None = None) -> PatchingResult:
    """The exact recoveries of the `k` sites an estimate ranks highest, in that order, patched
    by the engine on the estimate's own prompt pairs, metric, direction and measured position.

    `metric` is needed only for a callable metric (a result records only its name).

    Example:
        >>> exact = verify_top(model, estimate, 10)
        >>> list(zip(estimate.top(10), exact.mean))
    """
    if not is_index(k) or k < 1:
        raise InputTypeError(f"k={k!r}: give how many sites to verify, at least 1.")
    if not estimate.locations:
        raise MlxterpError("this result records no site locations (written by an older mlxterp); "
                           "run the estimate again to verify it.")
    order = np.argsort(-estimate.mean, kind="stable")[:k]
    sites = [site_at(estimate.locations[i]) for i in order]
    return patching_sweep(model, pairs=estimate.prompt_pairs(), sites=sites, metric=metric or estimate.metric,
                          position=estimate.position, direction=estimate.direction, max_batch=max_batch,
                          progress=False, group=group)
