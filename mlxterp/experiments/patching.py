"""Activation patching: a sweep's arguments checked into a plan, run exactly (by the engine or
the naive reference), returned as a result.

Example:
    >>> result = patching_sweep(model, "Paris is the capital of France",
    ...                         "London is the capital of France", component="mlp",
    ...                         over=("layer", "position"), metric="kl")
    >>> result.top(3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

import mlxterp
from mlxterp.errors import InputTypeError
from mlxterp.experiments.corruption import Ablate, Noise, describe, make_corruption
from mlxterp.experiments.engine import run_engine, run_naive
from mlxterp.experiments.metrics import ANSWER_METRICS, MetricFn, get_metric
from mlxterp.experiments.plan import Plan, SweepValues
from mlxterp.experiments.results import PatchingResult
from mlxterp.experiments.sites import Labels, check_sites, is_index, sweep_sites
from mlxterp.models.identity import fingerprint, model_name
from mlxterp.tracing.inputs import InputError, check_text, equal_length_rows
from mlxterp.tracing.names import Site, SiteError, SiteGroup


def _prompts(model, prompts, which: str) -> tuple[list[str], list[list[int]]]:
    """(texts, token rows) of the prompts of one side: a string, a list of strings (one per
    pair), or token ids in any form a trace takes (a list, a list of lists, an array)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) for p in prompts):
        if not all(prompts):
            raise InputError(f"a {which} prompt is empty; give non-empty prompts.")
        rows = [model.encode(text) for text in prompts]
        if not all(rows):
            raise InputError(f"a {which} prompt gives no tokens; give non-empty prompts.")
        return list(prompts), rows
    rows = model._tokens(prompts).tolist()  # token ids, checked as traces check them
    return [model.decode(row) for row in rows], rows


def _prompt_tokens(model, clean, corrupted) -> tuple[list[str], list[str], mx.array, mx.array]:
    """Both sides' texts and (pairs, seq) token arrays, of one length."""
    (clean_texts, clean_rows), (corrupted_texts, corrupted_rows) = (
        _prompts(model, clean, "clean"), _prompts(model, corrupted, "corrupted"))
    if len(clean_rows) != len(corrupted_rows):
        raise InputError(f"{len(clean_rows)} clean prompts but {len(corrupted_rows)} corrupted ones; "
                         "give them in pairs.")
    texts = clean_texts + corrupted_texts
    try:
        tokens = equal_length_rows(clean_rows + corrupted_rows, texts, model.tokenizer)
    except InputError as err:
        raise InputError(
            f"{err}\nPatching compares position by position, so clean and corrupted prompts "
            "must tokenise to the same length (mlxterp does not align them silently)."
        ) from None
    pairs = len(clean_rows)
    return clean_texts, corrupted_texts, tokens[:pairs], tokens[pairs:]


def _corrupted_run(model, clean, spec: Noise | Ablate):
    """(clean texts, clean tokens, the Corruption, corrupted texts), one pair per noise sample,
    for a corrupted run made from one clean prompt."""
    texts, rows = _prompts(model, clean, "clean")
    if len(rows) != 1:
        raise InputError(f"a {type(spec).__name__} corruption applies to one clean prompt; got {len(rows)}.")
    corruption = make_corruption(model, texts[0], len(rows[0]), spec)
    tokens = mx.repeat(mx.array(rows), corruption.pairs, axis=0)
    described = describe(corruption, model.to_str_tokens(rows[0]))
    return texts * corruption.pairs, tokens, corruption, [described] * corruption.pairs


def _check_option_types(metric, position) -> None:
    if not isinstance(metric, str) and not callable(metric):
        raise InputTypeError(f"metric={metric!r}: give a name such as 'kl' or a callable.")
    if not is_index(position):
        raise InputTypeError(f"position={position!r}: give a token position as a whole number.")


def token_id(model, token: str | int, what: str) -> int:
    """The id of one token given as text (' Paris') or an id, checked; `what` names it in errors."""
    if not isinstance(token, str) and not is_index(token):
        raise InputTypeError(f"{what}={token!r}: give one token as a string (' Paris') or an id.")
    if is_index(token):
        token = int(token)
        if not 0 <= token < model.vocab_size:
            raise InputError(f"{what} id {token} is outside the vocabulary [0, {model.vocab_size}).")
        return token
    ids = list(model.tokenizer.encode(check_text(token), add_special_tokens=False))
    if len(ids) != 1:
        raise InputError(
            f"{what} {token!r} is {len(ids)} tokens {model.to_str_tokens(ids)}; it must be one "
            "token (mind the leading space: ' Paris' and 'Paris' differ)."
        )
    return ids[0]


@dataclass(frozen=True)
class Sweep:
    """A plan, and what a result says about it beyond the runner's numbers."""

    plan: Plan
    labels: list[Labels]  # of each site, e.g. {"layer": 3, "position": 5}
    clean: list[str]
    corrupted: list[str]
    component: str
    over: tuple[str, ...]
    answers: list


def prepare_sweep(model, clean, corrupted, component="mlp", over=("layer",), layers=None,
                  positions=None, heads=None, sites=None, metric="l2", answer=None,
                  wrong_answer=None, position=-1, direction="denoise") -> Sweep:
    """Check a sweep's arguments and make its plan; `patching_sweep` documents them.

    Every experiment over prompt pairs starts here, so all of them accept and refuse the same.
    """
    if model.tokenizer is None:
        raise InputError("patching prompts needs a tokenizer: InterpretableModel(m, tokenizer).")
    _check_option_types(metric=metric, position=position)
    corruption = None
    if isinstance(corrupted, Noise | Ablate):
        clean_list, clean_ids, corruption, corrupted_list = _corrupted_run(model, clean, corrupted)
        corrupted_ids = clean_ids
    else:
        clean_list, corrupted_list, clean_ids, corrupted_ids = _prompt_tokens(model, clean, corrupted)
    answers = [None if answer is None else token_id(model, answer, "answer"),
               None if wrong_answer is None else token_id(model, wrong_answer, "wrong_answer")]
    chosen = get_metric(metric, *answers)
    if sites is not None:
        sites, labels = check_sites(model, sites)
        component, over = "sites", tuple(dict.fromkeys(axis for label in labels for axis in label))
    else:
        sites, labels = sweep_sites(model, component, over, clean_ids.shape[1], layers, positions, heads)
        over = (over,) if isinstance(over, str) else tuple(over)
    plan = Plan(clean_ids, corrupted_ids, tuple(sites), chosen, direction, position, corruption)
    return Sweep(plan, labels, clean_list, corrupted_list, component, over,
                 answers if metric in ANSWER_METRICS else [])


def provenance(module) -> dict:
    """What made a result: the model (name, sha256 of its weights, dtype), mlxterp and MLX."""
    sha256, dtype = fingerprint(module)
    return {"model": model_name(module), "model_sha256": sha256, "dtype": dtype,
            "mlxterp": mlxterp.__version__, "mlx": mx.__version__}


def sweep_result(model, sweep: Sweep, values: SweepValues, method: str = "exact") -> PatchingResult:
    """The `PatchingResult` of a sweep's values."""
    plan, direction = sweep.plan, sweep.plan.direction
    # The baseline is reported as a positive gap for distances: d(receiver, donor).
    gap = values.gap(direction)  # above the noise floor: the runners check each pair first
    return PatchingResult(
        recovery=values.recovery(direction),
        sites=[dict(label) for label in sweep.labels],
        over=sweep.over,
        component=sweep.component, metric=plan.metric.name, direction=direction,
        baseline=-gap if plan.metric.is_distance else gap,
        clean=sweep.clean, corrupted=sweep.corrupted,
        tokens=[model.to_str_tokens(row) for row in plan.clean.tolist()],
        corrupted_tokens=[model.to_str_tokens(row) for row in plan.corrupted.tolist()],
        provenance=provenance(model.model),
        is_distance=plan.metric.is_distance, position=plan.position, answers=sweep.answers,
        answer_tokens=[model.decode([a]) for a in sweep.answers if a is not None],
        metric_values=values, noise=values.recovery_noise(direction), method=method,
        locations=[location(s) for s in plan.sites],
        corruption={} if plan.corruption is None else plan.corruption.description,
    )


def location(site: Site | SiteGroup) -> dict:
    """Where a site is, as JSON: `Site(**location)` takes it; a group is {"parts": [...]}."""
    if isinstance(site, SiteGroup):
        return {"parts": [location(part) for part in site.parts]}
    return {"module": site.module, "is_input": site.is_input,
            "positions": None if site.positions is None else list(site.positions),
            "head": site.head, "n_heads": site.n_heads}


def site_at(location: dict) -> Site | SiteGroup:
    """The site a `location` describes."""
    if "parts" in location:
        return SiteGroup(tuple(site_at(part) for part in location["parts"]))
    return Site(**location)


def patching_sweep(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str] | Noise | Ablate,
    component: str = "mlp",
    over: Sequence[str] = ("layer",),
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sites: Sequence[Site | str] | None = None,
    metric: str | MetricFn = "l2",
    answer: str | int | None = None,
    wrong_answer: str | int | None = None,
    position: int = -1,
    direction: str = "denoise",
    naive: bool = False,
    max_batch: int | None = None,
    progress: bool | None = None,
) -> PatchingResult:
    """Patch every site of a sweep and measure how much of the clean behaviour each recovers.

    Args:
        model: an `InterpretableModel` with a tokenizer.
        clean, corrupted: a prompt each, or equal-length lists of prompt pairs; as text, or
            as token ids in any form a trace takes (a list, a list of lists, an array). The
            corrupted run may instead be made from one clean prompt: `Noise("The Eiffel
            Tower")` (Gaussian noise on the subject's embeddings, one pair per sample) or
            `Ablate(subject, kind="zero" | "mean")` (mlxterp.experiments.corruption).
        component: 'mlp', 'self_attn' ('attn'), a sub-module ('mlp.down_proj', ...), 'input'
            (residual stream entering the block) or 'output' (leaving it).
        over: ('layer',), ('layer', 'position'), ('layer', 'head') or ('layer', 'head',
            'position'). Heads are query heads (slices of o_proj's input); for k_proj / v_proj,
            key/value heads.
        layers, positions, heads: restrict the sweep (None: all).
        sites: explicit `Site`s (or activation keys such as 'layers.3.mlp') instead of a sweep.
        metric: 'l2', 'cosine', 'mse', 'kl', 'logit_diff' (with answer / wrong_answer), 'prob'
            (the probability of answer), or a
            batched callable fn(logits (N, V), reference (V,)) -> distances (N,), the reference
            being the donor run's logits.
        position: the token position whose logits are measured (default: the last).
        direction: 'denoise' (clean activations into the corrupted run) or 'noise'.
        naive: run the reference procedure (one forward per site) instead of the engine.
        max_batch: patched rows per forward (default: from an estimate of a 2 GiB activation
            budget).

    Example:
        >>> r = patching_sweep(model, clean, corrupted, component="self_attn",
        ...                    over=("layer", "head"), metric="logit_diff",
        ...                    answer=" Mary", wrong_answer=" John")
    """
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    if progress is not None and not isinstance(progress, bool):
        raise InputTypeError(f"progress={progress!r}: give True, False or None (automatic).")
    sweep = prepare_sweep(model, clean, corrupted, component, over, layers, positions, heads, sites,
                          metric, answer, wrong_answer, position, direction)
    if naive:
        values = run_naive(model, sweep.plan)
    else:
        values = run_engine(model, sweep.plan, max_batch=max_batch, progress=progress)
    return sweep_result(model, sweep, values)


def activation_patching(
    model,
    clean_text: str,
    corrupted_text: str,
    component: str = "mlp",
    layers: Sequence[int] | None = None,
    metric: str | MetricFn = "l2",
    plot: bool = False,
    **options,
) -> dict[int, float]:
    """The guide's helper: `{layer: recovery %}` for patching `component` layer by layer.

    Options are those of `patching_sweep` (answer, wrong_answer, position, direction, naive,
    max_batch, progress). With `plot=True` a bar chart is shown (notebook) or saved (script).

    Example:
        >>> results = model.activation_patching("Paris is the capital of France",
        ...                                     "London is the capital of France")
        >>> max(results, key=results.get)
    """
    if not isinstance(plot, bool):
        raise InputTypeError(f"plot={plot!r}: give True or False.")
    for name in ("over", "sites"):
        if name in options:
            raise SiteError(f"activation_patching sweeps whole layers, so it takes no {name}=; for "
                            f"that sweep call model.patching_sweep(clean, corrupted, {name}=...), "
                            "which returns a PatchingResult.")
    result = patching_sweep(model, clean_text, corrupted_text, component=component,
                            over=("layer",), layers=layers, metric=metric, **options)
    if plot:
        result.plot()
    return result.to_dict()
