"""The one registry of patching metrics.

A metric maps a batch of logit rows to one number per row, in float32 whatever the model's dtype.
Distances compare each row with the donor run's logits (the clean run when denoising, the
corrupted run when noising; 0 means "as the donor"); scores such as the logit difference measure
the behaviour directly. Recovery, in either direction and for either kind, is the fraction of the
receiver-to-donor gap that a patch closes, i.e. how far it moves the receiving run toward the
donor run's output:

    distance: (d(receiver) - d(patched)) / d(receiver) * 100
    score:    (s(patched) - s(receiver)) / (s(donor) - s(receiver)) * 100

Forms are chosen so nothing cancels: the cosine distance is |a/|a| - b/|b||^2 / 2, equal to
1 - cos(a, b) without subtracting two numbers close to 1; KL divergence comes from
`log_softmax`, never from `log(softmax)`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxterp.errors import MetricError

# fn(logits (N, V) float32, reference (V,) float32) -> (N,) float32; the reference is the donor's
MetricFn = Callable[[mx.array, mx.array], mx.array]

# Float32 logits differ between batch layouts and BLAS kernels: SmolLM2's move by a relative rms
# of 3.4e-7 to 5.5e-7 of max |logit| (max 1.6e-6) across OpenBLAS's SkylakeX, Haswell and Zen
# kernels, 0 on Sandybridge and the reference BLAS (scripts/measure_noise_floor.py). The noise
# model below is 2e-6 per element, about 4x the largest rms measured.
LOGIT_NOISE = 2e-6


@dataclass(frozen=True)
class Metric:
    """A named metric: a distance to the reference (donor) logits, lower is closer, or a score.

    `with_noise(rows, reference) -> (values, noise)`, where given, bounds the float32 noise from
    the metric's derivatives in one evaluation; otherwise `measure` evaluates the metric on
    perturbed logits (four more evaluations per row).
    """

    name: str
    fn: MetricFn
    is_distance: bool = True
    with_noise: Callable[[mx.array, mx.array], tuple[mx.array, mx.array]] | None = None


def _l2(logits: mx.array, reference: mx.array) -> mx.array:
    return mx.sqrt(mx.sum(mx.square(logits - reference), axis=-1))


def _mse(logits: mx.array, reference: mx.array) -> mx.array:
    return mx.mean(mx.square(logits - reference), axis=-1)


def _unit(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def _cosine(logits: mx.array, reference: mx.array) -> mx.array:
    return mx.sum(mx.square(_unit(logits) - _unit(reference)), axis=-1) / 2


def _log_softmax(x: mx.array) -> tuple[mx.array, mx.array]:
    """(log_softmax(x), softmax(x)) along the last axis from one `exp` pass (MLX's CPU `exp` is
    the cost of measuring: 11.5 ns an element here)."""
    shifted = x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
    exps = mx.exp(shifted)
    total = mx.sum(exps, axis=-1, keepdims=True)
    return shifted - mx.log(total), exps / total


def _noise_scale(reference: mx.array) -> mx.array:
    """`LOGIT_NOISE` of the largest finite reference logit (a -inf logit is a masked token)."""
    return mx.max(mx.where(mx.isfinite(reference), mx.abs(reference), 0.0)) * LOGIT_NOISE


def _kl_terms(logits: mx.array, reference: mx.array):
    log_reference, reference_probabilities = _log_softmax(reference)
    log_rows, row_probabilities = _log_softmax(logits)
    # Tokens the reference gives probability 0 (logit -inf) contribute nothing, not 0 * nan.
    log_ratio = mx.where(log_reference > -mx.inf, log_reference - log_rows, 0.0)
    return reference_probabilities, log_reference, row_probabilities, log_rows, log_ratio


def _kl(logits: mx.array, reference: mx.array) -> mx.array:
    """KL(reference || logits): how much each row's distribution departs from the reference."""
    reference_probabilities, *_, log_ratio = _kl_terms(logits, reference)
    return mx.sum(reference_probabilities * log_ratio, axis=-1)


# Independent noise is bounded at this many standard deviations of its first- and second-order
# change (the perturbation draws it replaces gave the largest of two draws, about 1.1 on average).
INDEPENDENT_DEVIATIONS = 2.0


def _kl_with_noise(logits: mx.array, reference: mx.array) -> tuple[mx.array, mx.array]:
    """KL values and their float32 noise, from the derivatives of KL(p || softmax(x)) with
    respect to the row x (gradient q - p, Hessian diag(q) - q q^T) and the reference r (gradient
    p (log p/q - KL)), for the perturbations `_values_and_noise` applies otherwise (`LOGIT_NOISE` of the
    largest reference logit per element, independent on row and reference, and of norm
    `LOGIT_NOISE * max|r| * sqrt(V)` along the row's difference from the reference) to second
    order, plus the rounding of the sum itself. The same bound in one `exp` pass instead of five:
    at float32 noise scale the third-order terms are far below the second.
    """
    p, log_p, q, log_q, log_ratio = _kl_terms(logits, reference)
    values = mx.sum(p * log_ratio, axis=-1)
    width = logits.shape[-1]
    scale = _noise_scale(reference)
    gradient = q - p
    difference = logits - reference
    difference = mx.where(mx.isfinite(difference), difference, 0.0)  # masked tokens do not move
    direction = difference / mx.maximum(mx.linalg.norm(difference, axis=-1, keepdims=True), 1e-30)
    along = mx.sum(gradient * direction, axis=-1)
    mean = mx.sum(q * direction, axis=-1)
    variance = mx.maximum(mx.sum(q * mx.square(direction), axis=-1) - mean ** 2, 0)
    step = scale * width ** 0.5
    aligned = step * mx.abs(along) + step ** 2 * variance / 2
    reference_gradient = p * (log_ratio - values[:, None])
    first = scale * mx.sqrt(mx.sum(mx.square(gradient), axis=-1)
                            + mx.sum(mx.square(reference_gradient), axis=-1))
    second = scale ** 2 * mx.sum(q * (1 - q), axis=-1)
    independent = INDEPENDENT_DEVIATIONS * (first + second)
    # Rounding: each log-probability's (relative 2^-23, doubled), and each log-normaliser's sum of
    # V exponentials (at most log2(V) roundings in a pairwise sum), which shifts every log q alike.
    logs = mx.sum(mx.where(p > 0, p * (mx.abs(log_p) + mx.abs(log_q)), 0.0), axis=-1)
    rounding = 2.0 ** -23 * (2 * logs + math.log2(width))
    return values, mx.maximum(aligned, independent) + rounding


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("l2", _l2),
        Metric("cosine", _cosine),
        Metric("mse", _mse),
        Metric("kl", _kl, with_noise=_kl_with_noise),
    )
}


def logit_diff(answer: int, wrong_answer: int) -> Metric:
    """The score logit[answer] - logit[wrong_answer].

    Example:
        >>> logit_diff(7042, 4528).fn(logits, reference)   # " Paris" vs " London"
    """
    def score(logits: mx.array, reference: mx.array) -> mx.array:
        return logits[:, answer] - logits[:, wrong_answer]

    return Metric("logit_diff", score, is_distance=False)


def probability(answer: int) -> Metric:
    """The score P(answer): the softmax probability of token `answer` (causal tracing's metric).

    Example:
        >>> probability(7042).fn(logits, reference)   # P(" Paris")
    """
    def score(logits: mx.array, reference: mx.array) -> mx.array:
        return mx.exp(logits[:, answer] - mx.logsumexp(logits, axis=-1))

    return Metric("prob", score, is_distance=False)


ANSWER_METRICS = {"logit_diff": "answer= and wrong_answer=", "prob": "answer="}  # what each needs


def get_metric(metric: str | MetricFn, answer: int | None = None,
               wrong_answer: int | None = None) -> Metric:
    """The metric named `metric`, `logit_diff` for given answer ids, or a user's batched callable.

    A callable is a distance: `fn(logits (N, V), reference_logits (V,)) -> (N,)`, where the
    reference is the donor run's logits (the clean run's when denoising).
    """
    if isinstance(metric, str) and metric in ANSWER_METRICS:
        given = (answer is not None, wrong_answer is not None)
        if given != ((True, True) if metric == "logit_diff" else (True, False)):
            raise MetricError(
                f"metric={metric!r} takes {ANSWER_METRICS[metric]} (tokens as strings or ids), "
                "e.g. answer=' Paris'" + (", wrong_answer=' London'." if metric == "logit_diff" else ".")
            )
        return logit_diff(answer, wrong_answer) if metric == "logit_diff" else probability(answer)
    if answer is not None or wrong_answer is not None:
        raise MetricError(f"answer= and wrong_answer= apply to metrics {sorted(ANSWER_METRICS)}, "
                          f"not {metric!r}.")
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    if metric not in METRICS:
        raise MetricError(
            f"unknown metric {metric!r}; use one of {sorted([*METRICS, *ANSWER_METRICS])} or a "
            "callable fn(logits (N, V), reference_logits (V,)) -> distances (N,)."
        )
    return METRICS[metric]


def evaluate(metric: Metric, logits: mx.array, reference: mx.array) -> mx.array:
    """The metric of each row of `logits` (N, V) against `reference` (V,), in float32, checked
    for shape."""
    values = metric.fn(logits.astype(mx.float32), reference.astype(mx.float32))
    if not isinstance(values, mx.array):
        raise MetricError(
            f"metric {metric.name!r} returned a {type(values).__name__}; it must return an "
            f"mx.array with one value per row, shape ({logits.shape[0]},)."
        )
    if values.shape != (logits.shape[0],):
        raise MetricError(
            f"metric {metric.name!r} returned shape {tuple(values.shape)}; it must return one "
            f"value per row, shape ({logits.shape[0]},)."
        )
    return values


def measure(metric: Metric, logits: mx.array, reference: mx.array,
            samples: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The metric of each row of `logits` (N, V) against `reference` (V,), and how far float32
    noise can move it: (values, noise), each (N,) float64.

    The noise is the largest change over perturbations of `LOGIT_NOISE` per element: `samples`
    draws of independent noise on the rows and on the reference, and the same norm along +- the
    row's difference from the reference. Batch-layout noise is not independent per logit (it
    enters through the hidden state and the unembedding), so the aligned draw bounds what a
    distance can move, where independent draws alone underestimate it about 4-fold (measured).
    A metric with `with_noise` (KL) bounds the same perturbations from its derivatives in one
    evaluation; the others are evaluated on the perturbed logits.

    On a CPU the rows are measured in parts, one per core, each on a stream of its own: MLX runs
    a CPU stream's elementwise work (the metric's `exp`) on one thread. A row's values and noise
    do not depend on the parts (each is computed from its own row, the reference and the same
    draws).

    Example:
        >>> values, noise = measure(METRICS["kl"], patched_logits, clean_logits)
    """
    rows, reference = logits.astype(mx.float32), reference.astype(mx.float32)
    parts = _parts(rows.shape[0])
    measured = []
    for stream, (start, end) in zip(_streams(len(parts)), parts, strict=True):
        with mx.stream(stream):
            measured.append(_values_and_noise(metric, rows[start:end], reference, samples))
    values, noise = (mx.concatenate([part[k] for part in measured]) for k in (0, 1))
    mx.eval(values, noise)
    return np.array(values, dtype=np.float64), np.array(noise, dtype=np.float64)


def _values_and_noise(metric: Metric, rows: mx.array, reference: mx.array,
                      samples: int) -> tuple[mx.array, mx.array]:
    if metric.with_noise is not None:
        return metric.with_noise(rows, reference)
    values = evaluate(metric, rows, reference)
    width = rows.shape[-1]
    scale = _noise_scale(reference)
    row_key, reference_key = mx.random.split(mx.random.key(0))
    row_noise = scale * mx.random.normal((samples, width), key=row_key)
    reference_noise = scale * mx.random.normal((samples, width), key=reference_key)
    difference = rows - reference
    length = mx.linalg.norm(difference, axis=-1, keepdims=True)
    aligned = scale * width ** 0.5 * difference / mx.maximum(length, 1e-30)
    moved = [evaluate(metric, rows + row_noise[k], reference + reference_noise[k])
             for k in range(samples)]
    moved += [evaluate(metric, rows + sign * aligned, reference) for sign in (1, -1)]
    return values, mx.max(mx.abs(mx.stack(moved) - values), axis=0)


def _parts(rows: int) -> list[tuple[int, int]]:
    """(start, end) of each part of the rows: one per core on a CPU, one on a GPU."""
    count = min(rows, available_cores()) if mx.default_device() == mx.cpu else 1
    bounds = [rows * k // count for k in range(count + 1)]
    return list(zip(bounds, bounds[1:], strict=False))


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system says, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_cpu_streams: list[mx.Stream] = []  # made once: each CPU stream is a thread of MLX's


def _streams(count: int) -> list[mx.Stream]:
    """The default stream for one part; else `count` CPU streams of their own."""
    if count == 1:
        return [mx.default_stream(mx.default_device())]
    while len(_cpu_streams) < count:
        _cpu_streams.append(mx.new_stream(mx.cpu))
    return _cpu_streams[:count]
