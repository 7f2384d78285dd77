"""The pipeline every experiment over prompt pairs shares: prepare (prompts and options checked
into plans), then a runner, then the result.

`prepare_sweeps` turns prompts (or a dataset) and a `SweepOptions` into `Sweep`s, one per token
length; a runner turns their plans into `SweepValues` (`runners.sharding.run_sharded` shares them
among ranks); `sweep_result` turns the values into a `PatchingResult`. An analysis is these three
calls with its runner in the middle.

Example:
    >>> sweeps = prepare_sweeps(model, clean, corrupted, SweepOptions(metric="kl"))
    >>> values, resources = run_sharded(lambda plan: run_engine(model, plan), [s.plan for s in sweeps])
    >>> result = sweep_result(model, sweeps, values, resources=resources)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError, InputTypeError, SiteError
from mlxterp.experiments.data.corruption import Ablate, Noise, describe, make_corruption
from mlxterp.experiments.data.pairs import PromptPair, load_pairs
from mlxterp.experiments.pipeline.metrics import ANSWER_METRICS, Metric, get_metric
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.plan import Plan, SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult, provenance
from mlxterp.experiments.pipeline.sites import Labels, check_sites, location, sweep_sites
from mlxterp.tracing.inputs import check_text, equal_length_rows, is_index


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


def token_id(model, token: str | int, what: str) -> int:
    """The id of one token given as text (' Paris') or an id, checked; `what` names it in errors.

    Example:
        >>> token_id(model, " Paris", "answer")
        7042
    """
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


def prepare_sweep(model, clean, corrupted, options: SweepOptions, answers: Sequence[tuple],
                  numbers: tuple[int, ...] = (), total_pairs: int = 0) -> Sweep:
    """Check a sweep's prompts against the model and make its plan, for prompt pairs of one token
    length. `answers` holds one (answer, wrong_answer) for all pairs, or one per pair; `numbers`,
    each pair's number among all `total_pairs` (default: 0, 1, ... of these pairs alone).

    Every experiment over prompt pairs starts here, so all of them accept and refuse the same.
    """
    if model.tokenizer is None:
        raise InputError("patching prompts needs a tokenizer: InterpretableModel(m, tokenizer).")
    corruption = None
    if isinstance(corrupted, Noise | Ablate):
        clean_list, clean_ids, corruption, corrupted_list = _corrupted_run(model, clean, corrupted)
        corrupted_ids = clean_ids
    else:
        clean_list, corrupted_list, clean_ids, corrupted_ids = _prompt_tokens(model, clean, corrupted)
    count = clean_ids.shape[0]
    chosen, per_pair, answer_ids = _metric(model, options.metric,
                                           list(answers) * (count if len(answers) == 1 else 1))
    if options.sites is not None:
        sites, labels = check_sites(model, options.sites)
        component, over = "sites", tuple(dict.fromkeys(axis for label in labels for axis in label))
    else:
        sites, labels = sweep_sites(model, options.component, options.over, clean_ids.shape[1],
                                    options.layers, options.positions, options.heads)
        component, over = options.component, options.over
    plan = Plan(clean_ids, corrupted_ids, tuple(sites), chosen, options.direction, options.position,
                corruption, per_pair, numbers, total_pairs)
    return Sweep(plan, labels, clean_list, corrupted_list, component, over, answer_ids)


def prepare_sweeps(model, clean, corrupted, options: SweepOptions, pairs=None) -> list[Sweep]:
    """The sweeps of prompts (`clean`, `corrupted`) or of a dataset (`pairs`: `PromptPair`s,
    dicts, or a .csv / .jsonl file): one per token length, since pairs are never padded.

    Example:
        >>> [s.plan.pairs for s in prepare_sweeps(model, None, None, SweepOptions(), ioi_pairs(8))]
    """
    answer = (options.answer, options.wrong_answer)
    if pairs is None:
        if clean is None or corrupted is None:
            raise InputError("give a clean and a corrupted prompt (or lists of them), or pairs= (a "
                             "list of PromptPair or a .csv / .jsonl file).")
        return [prepare_sweep(model, clean, corrupted, options, [answer])]
    if clean is not None or corrupted is not None:
        raise InputError("give clean and corrupted prompts, or pairs=, not both.")
    dataset = load_pairs(pairs)
    if answer != (None, None):
        if any(p.answer or p.wrong_answer for p in dataset):
            raise InputError("the pairs have their own answer columns; leave out answer= and wrong_answer=.")
        dataset = [replace(p, answer=answer[0], wrong_answer=answer[1]) for p in dataset]
    if options.metric not in ANSWER_METRICS:  # a KL sweep of pairs that have answers
        dataset = [replace(p, answer=None, wrong_answer=None) for p in dataset]
    by_length = defaultdict(list)
    for i, pair in enumerate(dataset):
        by_length[len(model.encode(check_text(pair.clean)))].append(i)
    sweeps = [prepare_sweep(model, [dataset[i].clean for i in group], [dataset[i].corrupted for i in group],
                            options, [(dataset[i].answer, dataset[i].wrong_answer) for i in group],
                            tuple(group), len(dataset))
              for _, group in sorted(by_length.items())]
    if any(sweep.labels != sweeps[0].labels for sweep in sweeps):
        raise SiteError(f"pairs of {sorted(by_length)} tokens have different sites (positions differ "
                        "by length); sweep positions over pairs of one length, or sweep layers/heads.")
    return sweeps


def _measured_position(sweeps: list[Sweep]) -> int:
    """The measured position, as one number for pairs of every length: counted from the start
    where it is the same for all, else from the end."""
    positions = {sweep.plan.position for sweep in sweeps}
    return positions.pop() if len(positions) == 1 else sweeps[0].plan.position - sweeps[0].plan.clean.shape[1]


def sweep_result(model, sweeps: list[Sweep], values: SweepValues, method: str = "exact",
                 resources: dict | None = None,
                 described: tuple[list[dict], str, tuple[str, ...]] | None = None) -> PatchingResult:
    """The `PatchingResult` of the sweeps' values (in the order of all pairs). `described` =
    (site records, component, over) for sites that are no `Site`s (a graph's edges, circuits);
    default: the sweeps' own."""
    first = sweeps[0]
    plan = first.plan
    order = np.argsort([i for sweep in sweeps for i in sweep.plan.numbers], kind="stable")

    def in_order(per_sweep) -> list:
        items = [item for sweep in sweeps for item in per_sweep(sweep)]
        return [items[i] for i in order]

    answers = in_order(lambda sweep: sweep.answers) if first.answers else []
    if plan.total_pairs > 1:
        values.check_pairs(plan.direction, plan.metric.name)
    records, component, over = described or (
        [{**label, "location": location(site)} for label, site in zip(first.labels, plan.sites, strict=True)],
        first.component, first.over)
    return PatchingResult(
        sites=records,
        over=over,
        component=component, metric=plan.metric.name, direction=plan.direction,
        clean=in_order(lambda sweep: sweep.clean), corrupted=in_order(lambda sweep: sweep.corrupted),
        tokens=in_order(lambda sweep: map(model.to_str_tokens, sweep.plan.clean.tolist())),
        corrupted_tokens=in_order(lambda sweep: map(model.to_str_tokens, sweep.plan.corrupted.tolist())),
        provenance=provenance(model.model),
        is_distance=plan.metric.is_distance, position=_measured_position(sweeps), answers=answers,
        answer_tokens=[[None if a is None else model.decode([a]) for a in pair] for pair in answers],
        metric_values=values, method=method,
        corruption={} if plan.corruption is None else plan.corruption.description,
        resources=resources or {},
    )


def answered_pairs(model, pairs) -> list[PromptPair]:
    """The pairs whose clean prompt the model answers: the logit of `answer` above that of
    `wrong_answer` at the last position (the pairs a logit-difference study should keep).

    Raises:
        InputError: a pair without both answers, or pairs `load_pairs` refuses.

    Example:
        >>> pairs = answered_pairs(model, ioi_pairs(80))
        >>> result = model.patching_sweep(pairs=pairs, metric="logit_diff")
    """
    dataset = load_pairs(pairs)
    if any(pair.answer is None or pair.wrong_answer is None for pair in dataset):
        raise InputError("every pair needs an answer and a wrong_answer to tell whether the model "
                         "answers it.")
    by_length = defaultdict(list)
    for i, pair in enumerate(dataset):
        by_length[len(model.encode(check_text(pair.clean)))].append(i)
    kept = set()
    for group in by_length.values():
        logits = model.model(mx.array([model.encode(dataset[i].clean) for i in group]))[:, -1]
        answers = mx.array([token_id(model, dataset[i].answer, "answer") for i in group])
        wrong = mx.array([token_id(model, dataset[i].wrong_answer, "wrong_answer") for i in group])
        rows = mx.arange(len(group))
        right = (logits[rows, answers] > logits[rows, wrong]).tolist()
        kept |= {i for i, answered in zip(group, right, strict=True) if answered}
    return [pair for i, pair in enumerate(dataset) if i in kept]
