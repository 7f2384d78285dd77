"""The reference procedure every fast runner is checked against, and the trace helpers runners
share: one clean and one corrupted forward per pair, then one patched forward per site, each an
ordinary trace with the patch applied as a `Site`-keyed intervention.

Example:
    >>> run_naive(model, plan).recovery(plan.direction)
"""

from __future__ import annotations

import mlx.core as mx

from mlxterp.errors import NotReachedError, SiteError
from mlxterp.experiments.pipeline.metrics import measure
from mlxterp.experiments.pipeline.plan import Plan, SweepValues


def second_call(key: str) -> str:
    """The key of a site's second call (`name#1`, `name#1:input`): a trace that records it shows
    the module ran twice, which a patch site must not."""
    module, colon, rest = key.partition(":")
    return f"{module}#1{colon}{rest}"


def site_activations(trace, keys: list[str]) -> dict[str, mx.array]:
    """The activations of a trace at the given site keys; each must have run exactly once (a
    trace with a `capture` list must capture their `second_call` keys to tell)."""
    missing = [key for key in keys if key not in trace.activations]
    if missing:
        raise NotReachedError(f"patch sites {missing} were never reached in the forward pass: their "
                              "modules were not called. Patch a module the model runs.")
    called_twice = [key for key in keys if second_call(key) in trace.activations]
    if called_twice:
        raise SiteError(f"{called_twice[0]!r} is called more than once per forward pass; patch "
                        "sites must be modules called once.")
    return {key: trace.activations[key] for key in keys}


def then(first: dict, second: dict) -> dict:
    """Trace interventions: those of `first`, then those of `second` (composed at shared keys)."""
    both = {**first, **second}
    for key in first.keys() & second.keys():
        both[key] = lambda x, f=first[key], g=second[key]: g(f(x))
    return both


def run_naive(model, plan: Plan) -> SweepValues:
    """The reference: one clean and one corrupted forward, then one patched forward per site,
    each with every activation captured.

    Example:
        >>> run_naive(model, plan).recovery(plan.direction)
    """
    values = SweepValues.empty(plan.pairs, len(plan.sites))
    keys = sorted({part.key for site in plan.sites for part in site.parts})
    for pair in range(plan.pairs):
        acts, logits = [], []
        for run, tokens in enumerate((plan.clean[pair:pair + 1], plan.corrupted[pair:pair + 1])):
            with model.trace(tokens, interventions=plan.interventions(pair, run)) as trace:
                acts.append(site_activations(trace, keys))
                logits.append(trace.output[0, plan.position])
        values.set_base(pair, *measure(plan.metric_of(pair), mx.stack(logits), logits[plan.donor]))
        values.check_baseline(plan, pair)
        receiver_tokens = plan.tokens(pair)[plan.receiver:plan.receiver + 1]
        for i, site in enumerate(plan.sites):
            donor = acts[plan.donor]
            # A Site key narrows the intervention to the site's part, through `Site.patch`.
            patch = {part: lambda x, d=donor[part.key]: d for part in site.parts}
            with model.trace(receiver_tokens,
                             interventions=then(plan.interventions(pair, plan.receiver), patch)) as trace:
                patched = trace.output[0, plan.position]
            (values.patched[pair, i],), (values.patched_noise[pair, i],) = measure(
                plan.metric_of(pair), patched[None], logits[plan.donor])
    return values
