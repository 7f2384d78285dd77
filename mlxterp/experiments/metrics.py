"""The one registry of patching metrics.

A metric maps a batch of logit rows to one number per row, in float32 whatever the model's dtype.
Distances compare each row with the clean logits (0 means "as clean"); scores such as the logit
difference measure the behaviour directly. Recovery, for either kind, is the fraction of the
corrupted-to-clean gap that a patch closes:

    distance: (d(corrupted) - d(patched)) / d(corrupted) * 100
    score:    (s(patched) - s(corrupted)) / (s(clean) - s(corrupted)) * 100

Forms are chosen so nothing cancels: the cosine distance is |a/|a| - b/|b||^2 / 2, equal to
1 - cos(a, b) without subtracting two numbers close to 1; KL divergence comes from
`log_softmax`, never from `log(softmax)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from mlxterp.errors import MlxterpError

# fn(logits (N, V) float32, clean (V,) float32) -> (N,) float32
MetricFn = Callable[[mx.array, mx.array], mx.array]


class MetricError(MlxterpError, ValueError):
    """A metric that does not exist, or cannot be computed as asked."""


@dataclass(frozen=True)
class Metric:
    """A named metric: a distance to the clean logits (lower is cleaner) or a score."""

    name: str
    fn: MetricFn
    is_distance: bool = True


def _l2(logits: mx.array, clean: mx.array) -> mx.array:
    return mx.sqrt(mx.sum(mx.square(logits - clean), axis=-1))


def _mse(logits: mx.array, clean: mx.array) -> mx.array:
    return mx.mean(mx.square(logits - clean), axis=-1)


def _unit(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def _cosine(logits: mx.array, clean: mx.array) -> mx.array:
    return mx.sum(mx.square(_unit(logits) - _unit(clean)), axis=-1) / 2


def _kl(logits: mx.array, clean: mx.array) -> mx.array:
    """KL(clean || patched): how much the patched distribution departs from the clean one."""
    log_clean = clean - mx.logsumexp(clean, axis=-1, keepdims=True)
    log_patched = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # Tokens the clean run gives probability 0 (logit -inf) contribute nothing, not 0 * nan.
    terms = mx.exp(log_clean) * (log_clean - log_patched)
    return mx.sum(mx.where(log_clean > -mx.inf, terms, 0.0), axis=-1)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("l2", _l2),
        Metric("cosine", _cosine),
        Metric("mse", _mse),
        Metric("kl", _kl),
    )
}


def logit_diff(answer: int, wrong_answer: int) -> Metric:
    """The score logit[answer] - logit[wrong_answer].

    Example:
        >>> logit_diff(7042, 4528).fn(logits, clean)   # " Paris" vs " London"
    """
    def score(logits: mx.array, clean: mx.array) -> mx.array:
        return logits[:, answer] - logits[:, wrong_answer]

    return Metric("logit_diff", score, is_distance=False)


def get_metric(metric: str | MetricFn, answer: int | None = None,
               wrong_answer: int | None = None) -> Metric:
    """The metric named `metric`, `logit_diff` for given answer ids, or a user's batched callable.

    A callable is a distance: `fn(logits (N, V), clean_logits (V,)) -> (N,)`.
    """
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    if metric == "logit_diff":
        if answer is None or wrong_answer is None:
            raise MetricError(
                "metric='logit_diff' needs answer= and wrong_answer= (tokens as strings or ids), "
                "e.g. answer=' Paris', wrong_answer=' London'."
            )
        return logit_diff(answer, wrong_answer)
    if metric not in METRICS:
        raise MetricError(
            f"unknown metric {metric!r}; use one of {sorted([*METRICS, 'logit_diff'])} or a "
            "callable fn(logits (N, V), clean_logits (V,)) -> distances (N,)."
        )
    return METRICS[metric]


def evaluate(metric: Metric, logits: mx.array, clean: mx.array) -> mx.array:
    """The metric of each row of `logits` (N, V), in float32, checked for shape."""
    values = metric.fn(logits.astype(mx.float32), clean.astype(mx.float32))
    if values.shape != (logits.shape[0],):
        raise MetricError(
            f"metric {metric.name!r} returned shape {tuple(values.shape)}; it must return one "
            f"value per row, shape ({logits.shape[0]},)."
        )
    return values
