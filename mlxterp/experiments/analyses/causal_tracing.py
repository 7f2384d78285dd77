"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", sec. 2).

The corrupted run is the prompt itself with Gaussian noise on the subject's token embeddings
(a `Corruption`, one noise sample per pair of the plan). Each site restores, from the clean run,
one state at one token: a block's output (`kind="hidden"`), or the MLP or attention outputs of
`window` consecutive layers around a layer (a `SiteGroup`). The metric is the probability of the
answer; a site's indirect effect is P(answer | corrupted, restored) - P(answer | corrupted),
averaged over the noise samples. The same engine as activation patching runs it, batched.

Example:
    >>> trace = causal_trace(model, "The Eiffel Tower is located in the city of",
    ...                      subject="The Eiffel Tower", kind="mlp")
    >>> trace.effect.mean(axis=0)            # per (layer, position) site
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.data.corruption import Noise, describe, make_corruption
from mlxterp.experiments.data.pairs import Fact, load_facts
from mlxterp.experiments.pipeline.metrics import probability
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.plan import Plan, SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult, read_json, write_json
from mlxterp.experiments.pipeline.sites import check_component, component_key
from mlxterp.experiments.pipeline.sweep import Sweep, sweep_result, token_id
from mlxterp.experiments.runners.engine import run_engine
from mlxterp.experiments.runners.naive import run_naive
from mlxterp.experiments.runners.sharding import run_sharded
from mlxterp.tracing.inputs import is_index, tokenise
from mlxterp.tracing.names import Site, SiteGroup

KINDS = {"hidden": "output", "mlp": "mlp", "attn": "attn"}  # kind -> the component restored
WINDOW = 10  # the paper's window of MLP / attention layers


def _window(layer: int, window: int, n_layers: int) -> range:
    """The paper's window of `window` layers around `layer`, cut at the model's ends."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restoration_sites(model, kind: str, seq_len: int, window: int = WINDOW) -> tuple[list, list[dict]]:
    """The sites of a causal trace and their labels: for each layer and token, one block output
    (`hidden`) or the MLP / attention outputs of the window around that layer at that token.

    Example:
        >>> sites, labels = restoration_sites(model, "mlp", seq_len=12, window=10)
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: use one of {sorted(KINDS)}.")
    n_layers = len(model.tree.blocks)
    if not is_index(window) or not 1 <= window <= n_layers:
        raise InputError(f"window={window!r}: give a number of layers from 1 to {n_layers} (the model's).")
    component = check_component(model, KINDS[kind])
    sites, labels = [], []
    for layer in range(n_layers):
        layers = [layer] if kind == "hidden" else _window(layer, window, n_layers)
        for position in range(seq_len):
            parts = tuple(Site(component_key(model, i, component), positions=(position,)) for i in layers)
            sites.append(parts[0] if len(parts) == 1 else SiteGroup(parts))
            labels.append({"layer": layer, "position": position})
    return sites, labels


def causal_trace(
    model,
    prompt: str | None = None,
    subject: str | Sequence[int] | Noise | None = None,
    options: SweepOptions | None = None,
    *,
    pairs: Sequence[Fact | dict | tuple] | None = None,
    kind: str = "hidden",
    window: int = WINDOW,
    naive: bool = False,
    **overrides,
) -> PatchingResult | list[PatchingResult]:
    """The indirect effect of restoring each (layer, token) state of a noised prompt.

    Args:
        prompt: the clean prompt, e.g. "The Eiffel Tower is located in the city of".
        subject: the text whose token embeddings are noised (it must occur once and cover whole
            tokens), or its token positions; or a `Noise` of it, to set the samples (one pair
            each, default 10), the noise's standard deviation (None: 3x that of the token
            embeddings) and the seed: `Noise("The Eiffel Tower", samples=3)`.
        options: a `SweepOptions` or its keywords; causal tracing uses `answer` (the token whose
            probability is measured; None: the model's top next token) and how to run
            (max_batch, memory_budget, progress, group). It restores every layer and token and
            measures P(answer) at the last token, so the options that choose sites or a metric
            are refused.
        pairs: facts instead of one prompt: `Fact(prompt, subject, answer)`s, dicts with those
            keys, or tuples; one result per fact, in order.
        kind: "hidden" (a block's output), "mlp" or "attn" (their outputs over `window` layers).
        naive: run the one-forward-per-restoration reference instead of the engine.

    Returns a `PatchingResult` over (layer, position) with metric "prob" (a list, one per fact,
    for `pairs`): `result.effect` is the indirect effect per sample and site,
    `result.metric_values` the clean, corrupted and restored probabilities; `recovery` is the
    effect as a percentage of clean - corrupted.

    Raises:
        InputTypeError: an argument of the wrong type.
        InputError: a subject that does not occur once in the prompt, an answer that is not one
            token, a window out of range, an option causal tracing does not use.
        BaselineError: noise 0, which leaves nothing to recover.

    Example:
        >>> result = causal_trace(model, "The Eiffel Tower is located in the city of",
        ...                       "The Eiffel Tower", kind="mlp")
        >>> result.effect.mean(axis=0).max()
    """
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    options = SweepOptions.of(options, **overrides)
    options.refuse(("component", "over", "layers", "positions", "heads", "sites", "metric", "wrong_answer",
                    "position", "direction"),
                   "causal_trace (it restores every layer and token and measures P(answer) at the last "
                   "token)")
    if pairs is None:
        if prompt is None or subject is None:
            raise InputError("give a prompt and its subject, or pairs= (a list of Fact).")
        return _trace_fact(model, Fact(prompt, subject, options.answer), options, kind, window, naive)
    if prompt is not None or subject is not None:
        raise InputError("give a prompt and its subject, or pairs=, not both.")
    if options.answer is not None:
        raise InputError("facts carry their own answers; leave out answer=.")
    return [_trace_fact(model, fact, options, kind, window, naive) for fact in load_facts(pairs)]


def _trace_fact(model, fact: Fact, options: SweepOptions, kind: str, window: int,
                naive: bool) -> PatchingResult:
    """The causal trace of one fact."""
    tokens = mx.array([tokenise(model.tokenizer, fact.prompt)])
    seq_len = tokens.shape[1]
    sites, labels = restoration_sites(model, kind, seq_len, window)
    noise = fact.subject if isinstance(fact.subject, Noise) else Noise(fact.subject)
    corruption = make_corruption(model, fact.prompt, seq_len, noise)
    answer_id = _answer(model, tokens, fact.answer)
    repeated = mx.repeat(tokens, noise.samples, axis=0)
    plan = Plan(repeated, repeated, tuple(sites), probability(answer_id), corruption=corruption)

    def runner(plan: Plan) -> SweepValues:
        if naive:
            return run_naive(model, plan)
        return run_engine(model, plan, options.max_batch, options.memory_budget, options.progress)

    values, resources = run_sharded(runner, [plan], options.group)
    component = kind if kind == "hidden" else f"{kind} (window {window})"
    corrupted = describe(corruption, model.to_str_tokens(tokens[0].tolist()))
    sweep = Sweep(plan, labels, [fact.prompt] * noise.samples, [corrupted] * noise.samples, component,
                  ("layer", "position"), [[answer_id, None]] * noise.samples)
    return sweep_result(model, [sweep], values, resources=resources)


def _answer(model, tokens: mx.array, answer: str | int | None) -> int:
    """The answer's token id; for None the clean run's top next token."""
    if answer is not None:
        return token_id(model, answer, "answer")
    return int(mx.argmax(model.model(tokens)[0, -1]).item())


def answered_facts(model, facts) -> list[Fact]:
    """The facts whose answer is the model's greedy next token (the facts a causal-tracing study
    keeps, as the paper does).

    Raises:
        InputError: a fact without an answer, or a list `load_facts` refuses.
        InputTypeError: facts of the wrong type.

    Example:
        >>> facts = [Fact("The Eiffel Tower is in the city of", "The Eiffel Tower", " Paris")]
        >>> known = answered_facts(model, facts)
    """
    kept = []
    for fact in load_facts(facts):
        if fact.answer is None:
            raise InputError(f"fact {fact.prompt!r} has no answer; give one to tell whether the model "
                             "knows it.")
        tokens = mx.array([tokenise(model.tokenizer, fact.prompt)])
        if _answer(model, tokens, None) == token_id(model, fact.answer, "answer"):
            kept.append(fact)
    return kept


TOKEN_CLASSES = ("first subject token", "middle subject tokens", "last subject token",
                 "first subsequent token", "further tokens", "last token")


def token_classes(subject: Sequence[int], length: int) -> dict[str, list[int]]:
    """The positions of each of the paper's token classes in a prompt of `length` tokens whose
    subject is at `subject`. Tokens before the subject belong to none (the paper's prompts begin
    with it); a one-token subject is both its first and last token.

    Example:
        >>> token_classes((1, 2, 3), 8)["further tokens"]
        [5, 6]
    """
    last = length - 1
    after = list(range(subject[-1] + 1, last))
    return {"first subject token": [subject[0]], "middle subject tokens": list(subject[1:-1]),
            "last subject token": [subject[-1]], "first subsequent token": after[:1],
            "further tokens": after[1:], "last token": [last]}


@dataclass
class TokenClassSummary:
    """Causal tracing over many facts as the paper summarises it (fig. 2): each fact's indirect
    effect (mean over its noise samples) averaged over the positions of each token class, per
    layer; then the mean over facts, with a bootstrap interval over facts.

    `effect[fact, class, layer]` is NaN where a fact has no token of that class.
    """

    kind: str
    classes: list[str]
    layers: list[int]
    effect: np.ndarray  # (facts, classes, layers)
    prompts: list[str]
    samples: int
    provenance: dict = field(default_factory=dict)

    ARRAYS = {"effect": np.float64}

    @property
    def mean(self) -> np.ndarray:
        """(classes, layers): the mean indirect effect over the facts that have the class."""
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.effect, axis=0)

    @property
    def facts_per_class(self) -> list[int]:
        return np.isfinite(self.effect[:, :, 0]).sum(axis=0).tolist()

    def interval(self, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> np.ndarray:
        """(2, classes, layers): a bootstrap percentile interval of `mean`, facts resampled.

        Example:
            >>> low, high = summary.interval()
        """
        if not 0 < confidence < 1:
            raise InputError(f"confidence={confidence!r}: give a fraction between 0 and 1, e.g. 0.95.")
        facts = self.effect.shape[0]
        draws = np.random.default_rng(seed).integers(0, facts, size=(resamples, facts))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample without a class: NaN
            means = np.nanmean(self.effect[draws], axis=1)
        tail = (1 - confidence) / 2 * 100
        return np.nanpercentile(means, [tail, 100 - tail], axis=0)

    def __str__(self) -> str:
        low, high = self.interval()
        mean = self.mean
        lines = [f"{self.kind}: mean indirect effect on P(answer) over {len(self.prompts)} facts "
                 f"({self.samples} noise samples each), peak per token class, 95% interval over facts"]
        for i, (name, count) in enumerate(zip(self.classes, self.facts_per_class, strict=True)):
            if count:
                layer = int(np.nanargmax(mean[i]))
                lines.append(f"  {name:<24} {mean[i, layer]:.3f} [{low[i, layer]:.3f}, "
                             f"{high[i, layer]:.3f}] at layer {self.layers[layer]:>2} ({count} facts)")
        return "\n".join(lines)

    def to_json(self, path: str | Path | None = None, overwrite: bool = False) -> str:
        """The summary as JSON (written to `path` when given); `from_json` reads it back."""
        return write_json(self, path, overwrite)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TokenClassSummary:
        """Read a summary written by `to_json` (JSON text or a file path)."""
        return read_json(cls, text_or_path)


def token_class_summary(results: Sequence[PatchingResult]) -> TokenClassSummary:
    """The paper's summary of one kind's causal traces of many facts (`causal_trace(pairs=...)`
    or one call per fact): the indirect effect by token class x layer, averaged over facts.

    Raises:
        InputError: no results, results of different kinds or models, or results that are not
            causal traces.

    Example:
        >>> traces = model.causal_trace(pairs=answered_facts(model, facts), kind="mlp")
        >>> print(token_class_summary(traces))
    """
    if not results:
        raise InputError("give the causal traces of at least one fact.")
    if any(r.metric != "prob" or r.corruption.get("kind") != "noise" for r in results):
        raise InputError("token_class_summary summarises causal traces (metric 'prob', noised subject).")
    kinds = {r.component for r in results}
    models = {r.provenance.get("model_sha256") for r in results}
    if len(kinds) > 1 or len(models) > 1:
        raise InputError(f"summarise one kind of one model at a time; got kinds {sorted(kinds)}.")
    layers = results[0].axis_values("layer")
    effect = np.full((len(results), len(TOKEN_CLASSES), len(layers)), np.nan)
    for f, result in enumerate(results):
        grid = np.full((len(layers), len(result.tokens[0])), np.nan)
        for site, value in zip(result.sites, result.effect.mean(axis=0), strict=True):
            grid[site["layer"], site["position"]] = value
        classes = token_classes(result.corruption["positions"], grid.shape[1])
        for c, name in enumerate(TOKEN_CLASSES):
            if classes[name]:
                effect[f, c] = grid[:, classes[name]].mean(axis=1)
    return TokenClassSummary(results[0].component, list(TOKEN_CLASSES), layers, effect,
                             [r.clean[0] for r in results], len(results[0].clean), results[0].provenance)
