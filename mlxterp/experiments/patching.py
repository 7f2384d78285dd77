"""Activation patching: a sweep's arguments checked into a plan, run exactly (by the engine or
the naive reference), returned as a result.

Example:
    >>> result = patching_sweep(model, "Paris is the capital of France",
    ...                         "London is the capital of France", component="mlp",
    ...                         over=("layer", "position"), metric="kl")
    >>> result.top(3)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp.errors import InputTypeError
from mlxterp.experiments.corruption import Ablate, Noise, describe, make_corruption
from mlxterp.experiments.datasets import PromptPair, load_pairs
from mlxterp.experiments.engine import DEFAULT_MEMORY_BUDGET, run_engine, run_naive
from mlxterp.experiments.metrics import ANSWER_METRICS, Metric, MetricFn, get_metric
from mlxterp.experiments.plan import Plan, SweepValues
from mlxterp.experiments.results import PatchingResult
from mlxterp.experiments.sharding import run_sharded
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
    """A plan (of prompt pairs of one token length), and what a result says about it beyond the
    runner's numbers."""

    plan: Plan
    labels: list[Labels]  # of each site, e.g. {"layer": 3, "position": 5}
    clean: list[str]
    corrupted: list[str]
    component: str
    over: tuple[str, ...]
    answers: list[list]  # per pair, [answer, wrong_answer] ids of the metrics that take them; else []


def _metric(model, metric, answers: list[tuple]) -> tuple[Metric, tuple[Metric, ...], list[list]]:
    """(the metric, one metric per pair where the pairs' answers differ, each pair's answer ids)."""
    ids = [[None if a is None else token_id(model, a, "answer"),
            None if w is None else token_id(model, w, "wrong_answer")] for a, w in answers]
    if metric not in ANSWER_METRICS:
        return get_metric(metric, *ids[0]), (), []  # refuses answers for a metric that takes none
    chosen = [get_metric(metric, *pair) for pair in ids]
    return chosen[0], tuple(chosen) if len({tuple(pair) for pair in ids}) > 1 else (), ids


def prepare_sweep(model, clean, corrupted, component="mlp", over=("layer",), layers=None,
                  positions=None, heads=None, sites=None, metric="l2", answers=((None, None),),
                  position=-1, direction="denoise", numbers: tuple[int, ...] = ()) -> Sweep:
    """Check a sweep's arguments and make its plan, for prompt pairs of one token length;
    `patching_sweep` documents them. `answers` holds one (answer, wrong_answer) for all pairs,
    or one per pair; `numbers`, each pair's number among all pairs (default: 0, 1, ...).

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
    count = clean_ids.shape[0]
    chosen, per_pair, answer_ids = _metric(model, metric, list(answers) * (count if len(answers) == 1 else 1))
    if sites is not None:
        sites, labels = check_sites(model, sites)
        component, over = "sites", tuple(dict.fromkeys(axis for label in labels for axis in label))
    else:
        sites, labels = sweep_sites(model, component, over, clean_ids.shape[1], layers, positions, heads)
        over = (over,) if isinstance(over, str) else tuple(over)
    plan = Plan(clean_ids, corrupted_ids, tuple(sites), chosen, direction, position, corruption, per_pair,
                numbers)
    return Sweep(plan, labels, clean_list, corrupted_list, component, over, answer_ids)


def prepare_sweeps(model, clean=None, corrupted=None, pairs=None, answer=None, wrong_answer=None,
                   **options) -> list[Sweep]:
    """The sweeps of prompts (`clean`, `corrupted`) or of a dataset (`pairs`): one per token
    length, since pairs are never padded. `options` are `prepare_sweep`'s."""
    if pairs is None:
        if clean is None or corrupted is None:
            raise InputError("give a clean and a corrupted prompt (or lists of them), or pairs= (a "
                             "list of PromptPair or a .csv / .jsonl file).")
        return [prepare_sweep(model, clean, corrupted, answers=[(answer, wrong_answer)], **options)]
    if clean is not None or corrupted is not None:
        raise InputError("give clean and corrupted prompts, or pairs=, not both.")
    dataset = load_pairs(pairs)
    if answer is not None or wrong_answer is not None:
        if any(p.answer or p.wrong_answer for p in dataset):
            raise InputError("the pairs have their own answer columns; leave out answer= and wrong_answer=.")
        dataset = [replace(p, answer=answer, wrong_answer=wrong_answer) for p in dataset]
    if options.get("metric") not in ANSWER_METRICS:  # a KL sweep of pairs that have answers
        dataset = [replace(p, answer=None, wrong_answer=None) for p in dataset]
    by_length = defaultdict(list)
    for i, pair in enumerate(dataset):
        by_length[len(model.encode(check_text(pair.clean)))].append(i)
    sweeps = [prepare_sweep(model, [dataset[i].clean for i in group], [dataset[i].corrupted for i in group],
                            answers=[(dataset[i].answer, dataset[i].wrong_answer) for i in group],
                            numbers=tuple(group), **options)
              for _, group in sorted(by_length.items())]
    if any(sweep.labels != sweeps[0].labels for sweep in sweeps):
        raise SiteError(f"pairs of {sorted(by_length)} tokens have different sites (positions differ "
                        "by length); sweep positions over pairs of one length, or sweep layers/heads.")
    return sweeps


def run_sweeps(sweeps: list[Sweep], runner, group: mx.distributed.Group | None = None
               ) -> tuple[SweepValues, dict]:
    """The values of every pair of the sweeps, in the pairs' order, each plan run by
    `runner(plan)` (shared among `group`'s ranks when given), and what the run took."""
    parts, resources = run_sharded(runner, [sweep.plan for sweep in sweeps], group)
    values = SweepValues.empty(sum(s.plan.pairs for s in sweeps), len(sweeps[0].plan.sites))
    for sweep, part in zip(sweeps, parts, strict=True):
        values.place(list(sweep.plan.numbers), slice(None), part)
    return values, resources


def provenance(module) -> dict:
    """What made a result: the model (name, sha256 of its weights, dtype), mlxterp and MLX."""
    sha256, dtype = fingerprint(module)
    return {"model": model_name(module), "model_sha256": sha256, "dtype": dtype,
            "mlxterp": mlxterp.__version__, "mlx": mx.__version__}


def _measured_position(sweeps: list[Sweep]) -> int:
    """The measured position, as one number for pairs of every length: counted from the start
    where it is the same for all, else from the end."""
    positions = {sweep.plan.position for sweep in sweeps}
    return positions.pop() if len(positions) == 1 else sweeps[0].plan.position - sweeps[0].plan.clean.shape[1]


def sweep_result(model, sweeps: list[Sweep], values: SweepValues, method: str = "exact",
                 resources: dict | None = None) -> PatchingResult:
    """The `PatchingResult` of the sweeps' values (in the order of all pairs)."""
    first = sweeps[0]
    plan, direction = first.plan, first.plan.direction
    order = np.argsort([i for sweep in sweeps for i in sweep.plan.numbers], kind="stable")

    def in_order(per_sweep) -> list:
        items = [item for sweep in sweeps for item in per_sweep(sweep)]
        return [items[i] for i in order]

    # The baseline is reported as a positive gap for distances: d(receiver, donor).
    gap = values.gap(direction)  # above the noise floor: the runners check each pair first
    answers = in_order(lambda sweep: sweep.answers) if first.answers else []
    return PatchingResult(
        recovery=values.recovery(direction),
        sites=[dict(label) for label in first.labels],
        over=first.over,
        component=first.component, metric=plan.metric.name, direction=direction,
        baseline=-gap if plan.metric.is_distance else gap,
        clean=in_order(lambda sweep: sweep.clean), corrupted=in_order(lambda sweep: sweep.corrupted),
        tokens=in_order(lambda sweep: map(model.to_str_tokens, sweep.plan.clean.tolist())),
        corrupted_tokens=in_order(lambda sweep: map(model.to_str_tokens, sweep.plan.corrupted.tolist())),
        provenance=provenance(model.model),
        is_distance=plan.metric.is_distance, position=_measured_position(sweeps), answers=answers,
        answer_tokens=[[None if a is None else model.decode([a]) for a in pair] for pair in answers],
        metric_values=values, noise=values.recovery_noise(direction), method=method,
        locations=[location(s) for s in plan.sites],
        corruption={} if plan.corruption is None else plan.corruption.description,
        resources=resources or {},
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
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | Noise | Ablate | None = None,
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool | None = None,
    pairs: str | Path | Sequence[PromptPair] | None = None,
    group: mx.distributed.Group | None = None,
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
        max_batch: patched rows per forward (default: as many as `memory_budget` allows).
        memory_budget: bytes of activations a forward may hold (default 2 GiB), by the
            estimate `engine.bytes_per_row`; the model's weights come on top.
        pairs: a dataset instead of `clean` and `corrupted`: `PromptPair`s (e.g. from
            `ioi_pairs`), dicts, or a .csv / .jsonl file with the columns clean, corrupted and
            optionally answer, wrong_answer (each pair's own answers). Pairs of different token
            lengths run in separate batches, never padded.
        group: an `mx.distributed` group (`mx.distributed.init()` under `mlx.launch`): its ranks
            share the pairs (and sites) and every rank returns the whole result.

    Example:
        >>> r = patching_sweep(model, clean, corrupted, component="self_attn",
        ...                    over=("layer", "head"), metric="logit_diff",
        ...                    answer=" Mary", wrong_answer=" John")
        >>> r = patching_sweep(model, pairs=ioi_pairs(64), metric="logit_diff")
        >>> r.mean, r.standard_error
    """
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    if progress is not None and not isinstance(progress, bool):
        raise InputTypeError(f"progress={progress!r}: give True, False or None (automatic).")
    sweeps = prepare_sweeps(model, clean, corrupted, pairs, answer, wrong_answer, component=component,
                            over=over, layers=layers, positions=positions, heads=heads, sites=sites,
                            metric=metric, position=position, direction=direction)
    if group is not None and group.rank() != 0:
        progress = False  # rank 0 shows it

    def runner(plan: Plan) -> SweepValues:
        if naive:
            return run_naive(model, plan)
        return run_engine(model, plan, max_batch=max_batch, memory_budget=memory_budget, progress=progress)

    values, resources = run_sweeps(sweeps, runner, group)
    return sweep_result(model, sweeps, values, resources=resources)


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
