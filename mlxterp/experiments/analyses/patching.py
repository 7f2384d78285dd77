"""Activation patching: a sweep's prompts and options checked into plans, run exactly (by the
engine, or the naive reference), returned as a result.

Example:
    >>> result = patching_sweep(model, "Paris is the capital of France",
    ...                         "London is the capital of France", component="mlp",
    ...                         over=("layer", "position"), metric="kl")
    >>> result.top(3)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.data.corruption import Ablate, Noise
from mlxterp.experiments.data.pairs import PromptPair
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.plan import Plan, SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.experiments.pipeline.sweep import prepare_sweeps, sweep_result
from mlxterp.experiments.runners.engine import run_engine
from mlxterp.experiments.runners.naive import run_naive
from mlxterp.experiments.runners.sharding import run_sharded


def patching_sweep(
    model,
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | Noise | Ablate | None = None,
    options: SweepOptions | None = None,
    *,
    pairs: str | Path | Sequence[PromptPair] | None = None,
    naive: bool = False,
    **overrides,
) -> PatchingResult:
    """Patch every site of a sweep and measure how much of the clean behaviour each recovers.

    Args:
        model: an `InterpretableModel` with a tokenizer.
        clean, corrupted: a prompt each, or equal-length lists of prompt pairs; as text, or
            as token ids in any form a trace takes (a list, a list of lists, an array). The
            corrupted run may instead be made from one clean prompt: `Noise("The Eiffel
            Tower")` (Gaussian noise on the subject's embeddings, one pair per sample) or
            `Ablate(subject, kind="zero" | "mean")`.
        options: a `SweepOptions` (component, over, layers, positions, heads, sites, metric,
            answer, wrong_answer, position, direction, max_batch, memory_budget, progress,
            group); `overrides` set the same names as keywords.
        pairs: a dataset instead of `clean` and `corrupted`: `PromptPair`s (e.g. from
            `ioi_pairs`), dicts, or a .csv / .jsonl file with the columns clean, corrupted and
            optionally answer, wrong_answer (each pair's own answers). Pairs of different token
            lengths run in separate batches, never padded.
        naive: run the reference procedure (one forward per site) instead of the engine.

    Raises:
        InputTypeError: an argument of the wrong type, or an unknown option name.
        InputError: a value that cannot work (empty prompts, prompts of different token lengths,
            an option out of range).
        SiteError: a site that cannot be patched (an InputError).
        MetricError: an unknown metric, or answers it cannot take (an InputError).
        BaselineError: prompts the metric cannot tell apart (an InputError).
        NotReachedError: a site whose module never ran.

    Example:
        >>> r = patching_sweep(model, clean, corrupted, component="self_attn",
        ...                    over=("layer", "head"), metric="logit_diff",
        ...                    answer=" Mary", wrong_answer=" John")
        >>> r = patching_sweep(model, pairs=ioi_pairs(64), metric="logit_diff")
        >>> r.mean, r.standard_error
    """
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    options = SweepOptions.of(options, **overrides)
    sweeps = prepare_sweeps(model, clean, corrupted, options, pairs)
    group, progress = options.group, options.progress
    if group is not None and group.rank() != 0:
        progress = False  # rank 0 shows it

    def runner(plan: Plan) -> SweepValues:
        if naive:
            return run_naive(model, plan)
        return run_engine(model, plan, options.max_batch, options.memory_budget, progress)

    values, resources = run_sharded(runner, [sweep.plan for sweep in sweeps], group)
    return sweep_result(model, sweeps, values, resources=resources)


def activation_patching(
    model,
    clean_text: str,
    corrupted_text: str,
    component: str = SweepOptions.component,
    layers: Sequence[int] | None = SweepOptions.layers,
    metric: str = SweepOptions.metric,
    plot: bool = False,
    **overrides,
) -> dict[int, float]:
    """The guide's helper: `{layer: recovery %}` for patching `component` layer by layer.

    Options are those of `SweepOptions` (answer, wrong_answer, position, direction, max_batch,
    ...) and `naive`. With `plot=True` a bar chart is shown (notebook) or saved (script).

    Raises:
        InputError: `over=` or `sites=`, which this helper does not take, or the errors
            `patching_sweep` lists.
        InputTypeError: `plot` that is not a bool, or an argument of the wrong type.

    Example:
        >>> results = model.activation_patching("Paris is the capital of France",
        ...                                     "London is the capital of France")
        >>> max(results, key=results.get)
    """
    if not isinstance(plot, bool):
        raise InputTypeError(f"plot={plot!r}: give True or False.")
    for name in ("over", "sites"):
        if name in overrides:
            raise InputError(f"activation_patching sweeps whole layers, so it takes no {name}=; for "
                             f"that sweep call model.patching_sweep(clean, corrupted, {name}=...), "
                             "which returns a PatchingResult.")
    result = patching_sweep(model, clean_text, corrupted_text, component=component, layers=layers,
                            metric=metric, **overrides)
    if plot:
        result.plot()
    return result.to_dict()
