"""Attribution patching: the estimated recovery of every site of a sweep, from gradients (the
gradient runner, `runners/gradient.py`), and the exact check of the top sites.

Example:
    >>> est = attribution_patching(model, clean, corrupted, component="input",
    ...                            over=("layer", "position"), metric="logit_diff",
    ...                            answer=" Mary", wrong_answer=" John")
    >>> exact = verify_top(model, est, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.analyses.patching import patching_sweep
from mlxterp.experiments.data.pairs import PromptPair
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.experiments.pipeline.sites import site_at
from mlxterp.experiments.pipeline.sweep import prepare_sweeps, sweep_result
from mlxterp.experiments.runners.gradient import run_gradient
from mlxterp.experiments.runners.sharding import run_sharded
from mlxterp.tracing.inputs import is_index


def attribution_patching(
    model,
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | None = None,
    options: SweepOptions | None = None,
    *,
    pairs: str | Path | Sequence[PromptPair] | None = None,
    method: str = "atp",
    steps: int = 16,
    **overrides,
) -> PatchingResult:
    """Estimate the recovery of every site of a patching sweep from gradients.

    Takes the prompts, pairs and options of `patching_sweep` (a `SweepOptions` or the same
    keywords: sites, metric, direction, process group, ...) and returns the same
    `PatchingResult`, with `method` recorded: an estimate, to be checked with the exact engine
    where it matters (`verify_top`, `mlxterp attribute --verify K`).

    Args:
        method: "atp" (the gradient at the receiving run) or "ig" (integrated gradients along
            the first block's input, `steps` points).
        steps: points of the integrated gradients (method "ig").

    Raises:
        InputTypeError: an argument of the wrong type, or an unknown option.
        InputError: a value that cannot work (as for `patching_sweep`), an engine option
            (max_batch, memory_budget, progress), which estimates do not use, or a bad `method` or
            `steps`.
        GradientError: a backward pass that overflows.
        MetricError: a metric with a zero gradient everywhere.

    Example:
        >>> est = attribution_patching(model, clean, corrupted, component="input",
        ...                            over=("layer", "position"), metric="logit_diff",
        ...                            answer=" Mary", wrong_answer=" John")
        >>> est.top(5)
    """
    options = SweepOptions.of(options, **overrides)
    options.refuse(("max_batch", "memory_budget", "progress"), "attribution_patching")
    sweeps = prepare_sweeps(model, clean, corrupted, options, pairs)
    values, resources = run_sharded(lambda plan: run_gradient(model, plan, method=method, steps=steps),
                                    [sweep.plan for sweep in sweeps], options.group)
    return sweep_result(model, sweeps, values, method=method, resources=resources)


def verify_top(model, estimate: PatchingResult, k: int, options: SweepOptions | None = None,
               **overrides) -> PatchingResult:
    """The exact recoveries of the `k` sites an estimate ranks highest, in that order, patched
    by the engine on the estimate's own prompt pairs, metric, direction and measured position.

    `options` (or keywords) give how to run: max_batch, memory_budget, group; and the metric
    where the estimate's was a callable (a result records only its name).

    Raises:
        InputTypeError: `k` that is no whole number.
        InputError: `k` below 1, options that would change what the estimate measured (sites,
            position, direction), or the errors `patching_sweep` lists.

    Example:
        >>> exact = verify_top(model, estimate, 10)
        >>> list(zip(estimate.top(10), exact.mean))
    """
    if not is_index(k):
        raise InputTypeError(f"k={k!r}: give how many sites to verify, a whole number.")
    if k < 1:
        raise InputError(f"k={k!r}: give how many sites to verify, at least 1.")
    options = SweepOptions.of(options, **overrides)
    options.refuse(("component", "over", "layers", "positions", "heads", "sites", "position", "direction",
                    "answer", "wrong_answer"), "verify_top (it checks the estimate's own sites)")
    if any("location" not in site for site in estimate.sites):
        raise InputError("this result records no site locations (written by an older mlxterp); "
                         "run the estimate again to verify it.")
    order = np.argsort(-estimate.mean, kind="stable")[:k]
    metric = options.metric if "metric" in options.changed() else estimate.metric
    return patching_sweep(model, options=options, pairs=estimate.prompt_pairs(), progress=False,
                          metric=metric,
                          sites=[site_at(estimate.sites[i]["location"]) for i in order],
                          position=estimate.position, direction=estimate.direction)
