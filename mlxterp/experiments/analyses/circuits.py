"""Circuits: which edges of a model's graph carry a behaviour, and how much of it they carry.

The graph (`runners/edges.py`) has the embeddings, every attention head and every MLP as nodes,
and an edge from each node into each later node's query, key, value or MLP input and into the
logits. `edge_patching` patches edges exactly (path patching: only the chosen edge carries the
donor's value); `edge_attribution` estimates every edge's effect at once from gradients (EAP,
Syed et al. 2023; EAP-IG, Hanna et al. 2024). `top_circuit` keeps the top edges and prunes what
no longer connects the embeddings to the logits; `faithfulness_curve` runs circuits of growing
size with every edge outside them carrying the corrupted run's value: 0 % is the corrupted run,
100 % the clean run.

Every score is a `PatchingResult` whose sites are edges (`{"edge": "L3.H4->L5.H2.q"}`): the same
recoveries, normalised mean over pairs, standard errors, intervals and JSON as a patching sweep.

Example:
    >>> pairs = answered_pairs(model, ioi_pairs(64))
    >>> scores = edge_attribution(model, pairs=pairs, metric="logit_diff", method="eap-ig", steps=8)
    >>> circuit = top_circuit(scores, edges=200)
    >>> curve = faithfulness_curve(model, scores)   # faithfulness (%) of the top 1 .. all edges
"""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from mlxterp.errors import DisconnectedCircuitWarning, InputError, InputTypeError
from mlxterp.experiments.data.corruption import Ablate, Noise
from mlxterp.experiments.data.pairs import PromptPair
from mlxterp.experiments.pipeline.metrics import ANSWER_METRICS, METRICS
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.results import VIEWS, PatchingResult, draw
from mlxterp.experiments.pipeline.sweep import prepare_sweeps, sweep_result
from mlxterp.experiments.runners.edges import (
    EdgeRunner,
    Graph,
    rows_per_forward,
    run_edge_gradients,
    run_edge_patches,
)
from mlxterp.experiments.runners.sharding import run_sharded
from mlxterp.paths import output_path, write_atomically
from mlxterp.tracing.inputs import is_index

METHODS = ("eap", "eap-ig")
# Options that choose sites: a graph's edges are its own.
SITE_OPTIONS = ("component", "over", "layers", "positions", "heads", "sites")
CURVE_POINTS = 20


def _edge_result(model, clean, corrupted, options: SweepOptions, pairs, analysis: str, sites: tuple,
                 runner_of, method: str, described) -> PatchingResult:
    """The shared pipeline of every edge analysis: prompts checked into plans whose sites are sets
    of edge numbers, the runner `runner_of(edge_runner, rows)` over them, the result."""
    options.refuse((*SITE_OPTIONS, "progress"), analysis)
    if isinstance(corrupted, Noise | Ablate):
        raise InputError(f"{analysis} takes prompt pairs (clean and corrupted prompts of one length); "
                         "a graph's corrupted run is a prompt, not a Noise or Ablate corruption.")
    edge_runner = EdgeRunner(model)
    sweeps = prepare_sweeps(model, clean, corrupted, options, pairs)
    plans = [replace(sweep.plan, sites=sites(edge_runner.graph)) for sweep in sweeps]
    longest = max(plan.clean.shape[1] for plan in plans)
    rows = rows_per_forward(edge_runner.graph, longest, edge_runner.width, options.memory_budget,
                            options.max_batch)
    values, resources = run_sharded(runner_of(edge_runner, rows), plans, options.group)
    records, component, over = described(edge_runner.graph, plans[0].sites)
    result = sweep_result(model, sweeps, values, method=method, resources=resources,
                          described=(records, component, over))
    result.provenance["graph"] = asdict(edge_runner.graph)
    return result


def _edge_records(graph: Graph, sites: tuple) -> tuple[list[dict], str, tuple[str, ...]]:
    return [{"edge": graph.edge_names[edges[0]]} for edges in sites], "edges", ("edge",)


def edge_patching(
    model,
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | None = None,
    options: SweepOptions | None = None,
    *,
    edges: Sequence[str],
    pairs: str | Path | Sequence[PromptPair] | None = None,
    **overrides,
) -> PatchingResult:
    """The exact recovery of patching each edge alone (path patching): the receiving run with
    that one edge carrying the donor's upstream value, every other edge its own.

    Takes the prompts, pairs and options of `patching_sweep` (metric, answers, direction,
    position, max_batch, memory_budget, group); the edges replace its sites. The patched rows of a
    pair run batched, `max_batch` (or what `memory_budget` holds) per forward.

    Args:
        edges: edge names, 'UPSTREAM->INPUT': upstream nodes `embed`, `L3.H4`, `L3.mlp`; inputs
            `L5.H2.q`, `L5.G0.k`, `L5.G0.v` (key/value group), `L5.mlp`, `logits`.

    Raises:
        GraphError: a model whose blocks are not a plain sum of heads and MLPs, or an edge that
            is not in its graph (unknown, or from a later node into an earlier input).
        InputError: no edges, a site option (component, over, ...), a Noise / Ablate corruption,
            or what `patching_sweep` refuses.

    Example:
        >>> exact = edge_patching(model, clean, corrupted, edges=["L0.mlp->L3.H1.q"],
        ...                       metric="logit_diff", answer=" Mary", wrong_answer=" John")
        >>> exact.mean
    """
    if isinstance(edges, str) or not isinstance(edges, Sequence) or not edges:
        raise InputError(f"edges={edges!r}: give a list of edge names, e.g. ['L0.mlp->L3.H1.q'].")
    options = SweepOptions.of(options, **overrides)

    def sites(graph: Graph) -> tuple:
        return tuple((graph.edge_index(edge),) for edge in edges)

    return _edge_result(model, clean, corrupted, options, pairs, "edge_patching", sites,
                        lambda runner, rows: lambda plan: run_edge_patches(runner, plan, rows),
                        "exact", _edge_records)


def edge_attribution(
    model,
    clean: str | Sequence[str] | None = None,
    corrupted: str | Sequence[str] | None = None,
    options: SweepOptions | None = None,
    *,
    pairs: str | Path | Sequence[PromptPair] | None = None,
    method: str = "eap",
    steps: int = 16,
    **overrides,
) -> PatchingResult:
    """Estimate every edge's recovery at once, from gradients.

    `method="eap"`: (donor's - receiver's upstream output) . dm/d(downstream input) at the
    receiving run: one plain forward of the donor prompt, one forward and backward of the
    receiving prompt, per pair.
    `method="eap-ig"`: the gradient averaged over `steps` runs whose embeddings lie between the
    receiver's and the donor's, which follows the metric where it curves (saturated softmax,
    KL at its minimum) and finds more faithful circuits.

    Args:
        method: "eap" or "eap-ig".
        steps: points of the integrated gradients (method "eap-ig"), at least 1.

    Raises:
        GraphError: a model whose blocks are not a plain sum of heads and MLPs.
        InputError: a bad `method` or `steps`, a site option, a Noise / Ablate corruption, or
            what `patching_sweep` refuses.
        GradientError: a backward pass that overflows.
        MetricError: a metric with a zero gradient everywhere (KL at the donor itself).

    Example:
        >>> scores = edge_attribution(model, pairs=pairs, metric="logit_diff", method="eap-ig",
        ...                           steps=8)
        >>> scores.top(5)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"method={method!r}: use 'eap' or 'eap-ig' (edge_patching gives exact effects).")
    if not is_index(steps) or steps < 1:
        raise InputError(f"steps={steps!r}: give a whole number of integration steps, at least 1.")
    options = SweepOptions.of(options, **overrides)
    options.refuse(("max_batch", "memory_budget"), "edge_attribution")

    def sites(graph: Graph) -> tuple:
        return tuple((n,) for n in range(graph.edge_count))

    return _edge_result(model, clean, corrupted, options, pairs, "edge_attribution", sites,
                        lambda runner, rows: lambda plan: run_edge_gradients(runner, plan, method, steps),
                        method, _edge_records)


def _graph_of(scores: PatchingResult) -> Graph:
    if not isinstance(scores, PatchingResult) or scores.component != "edges":
        raise InputTypeError(f"scores={type(scores).__name__}: give the edge scores of edge_attribution "
                             "or edge_patching.")
    return Graph(**scores.provenance["graph"])


def prune(graph: Graph, chosen: Sequence[int]) -> list[int]:
    """The edges of `chosen` (edge numbers) on a path from the embeddings to the logits within
    them. The others change nothing: a node that no kept edge changes is computed from
    corrupted inputs only, and a node with no path to the logits reaches them through corrupted
    edges. (An edge into a head of Gemma 3 changes every head of its block: their outputs are
    scaled by the rms of their sum.)

    Example:
        >>> prune(graph, [graph.edge_index("embed->L0.mlp")])   # L0.mlp reaches nothing: pruned
        []
    """
    chosen = list(chosen)
    edges = graph.edges[chosen] if chosen else np.zeros((0, 2), dtype=int)
    readers = graph.changed_by
    leaving = defaultdict(list)  # upstream node -> inputs its chosen edges go into
    for up, i in edges.tolist():
        leaving[up].append(i)
    reaches = np.zeros(len(graph.upstream) + 1, dtype=bool)  # with a path to the logits (last)
    reaches[-1] = True
    for up in sorted(leaving, reverse=True):  # later nodes first: their answer is known
        reaches[up] = any(reaches[list(readers[i])].any() for i in leaving[up])
    reached = np.zeros(len(graph.upstream) + 1, dtype=bool)  # with a path from the embeddings
    reached[0] = True
    for up in sorted(leaving):  # earlier nodes first
        if reached[up]:
            for i in leaving[up]:
                reached[list(readers[i])] = True
    return [n for n, (up, i) in zip(chosen, edges.tolist(), strict=True)
            if reached[up] and reaches[list(readers[i])].any()]


def _ranked(scores: PatchingResult, graph: Graph) -> tuple[np.ndarray, np.ndarray]:
    """(the scored edges' numbers, highest |mean recovery| first; their mean recoveries)."""
    mean = scores.mean  # computed from every pair's values: once
    order = np.argsort(-np.abs(mean), kind="stable")
    numbers = np.array([graph.edge_index(scores.sites[i]["edge"]) for i in order], dtype=int)
    return numbers, mean[order]


@dataclass(frozen=True)
class Circuit:
    """A circuit: edges of a model's graph, highest |score| first, after pruning.

    Example:
        >>> circuit = top_circuit(scores, edges=100)
        >>> circuit.edges[:3], circuit.nodes[:5]
    """

    edges: tuple[str, ...]
    scores: tuple[float, ...]  # each edge's mean recovery (percent) in the scores it came from
    requested: int  # how many top edges were taken before pruning
    method: str  # of the scores ("eap", "eap-ig", "exact")
    metric: str
    graph: dict  # {"layers", "heads", "groups"}
    provenance: dict

    @property
    def nodes(self) -> list[str]:
        """The nodes the circuit's edges join, in the graph's order, with 'logits' last: the
        upstream node of each edge, and the logits where an edge reads into them (a key/value
        group's heads that feed nothing in the circuit are left out)."""
        graph = Graph(**self.graph)
        used = {edge.split("->")[0] for edge in self.edges}
        if any(edge.endswith("->logits") for edge in self.edges):
            used.add("logits")
        return [node for node in [*graph.upstream, "logits"] if node in used]

    def to_json(self, path: str | Path | None = None, overwrite: bool = False) -> str:
        """The circuit as JSON (written to `path` when given); `Circuit.from_json` reads it."""
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            target = output_path(path, {".json"}, overwrite)
            write_atomically(target, lambda temporary: temporary.write_text(text))
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Circuit:
        """Read a circuit written by `to_json` (JSON text or a file path)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        return cls(**{**data, "edges": tuple(data["edges"]), "scores": tuple(data["scores"])})

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """The circuit as a layered graph: nodes placed by layer (heads labelled L.H), edges
        weighted by score; PNG, PDF or SVG by the path's extension."""
        return draw("circuit", self, path, overwrite)

    def to_html(self, path: str | Path, overwrite: bool = False, exact: PatchingResult | None = None) -> Path:
        """One self-contained HTML page of the circuit: hover an edge for its score and, with
        `exact` (`edge_patching` of the circuit's edges), its exact recovery.

        Raises:
            InputTypeError: `exact` that is no edge_patching result.

        Example:
            >>> circuit.to_html("circuit.html", exact=model.edge_patching(
            ...     pairs=pairs, metric="logit_diff", edges=list(circuit.edges)))
        """
        if exact is not None and (not isinstance(exact, PatchingResult) or exact.component != "edges"):
            raise InputTypeError(f"exact={type(exact).__name__}: give the edge_patching result of the "
                                 "circuit's edges, or None.")
        return VIEWS["circuit_html"](self, path, overwrite=overwrite, exact=exact)


def top_circuit(scores: PatchingResult, edges: int | None = None, *,
                threshold: float | None = None) -> Circuit:
    """The circuit of the `edges` highest-|score| edges (or every edge whose |mean recovery| is
    at least `threshold` percent), pruned to the edges on a path from the embeddings to the
    logits.

    Raises:
        InputTypeError: `scores` that are no edge scores.
        InputError: neither or both of `edges` and `threshold`, a count below 1, or a threshold
            that is no number >= 0 or that no edge reaches.

    Example:
        >>> top_circuit(scores, edges=100).edges[:3]
    """
    graph = _graph_of(scores)
    if (edges is None) == (threshold is None):
        raise InputError("give the circuit's size as edges=N or threshold=PERCENT (one of them).")
    numbers, means = _ranked(scores, graph)
    if edges is not None:
        if not is_index(edges) or edges < 1:
            raise InputError(f"edges={edges!r}: give how many top edges to take, a whole number >= 1.")
        count = edges
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold >= 0:
            raise InputError(f"threshold={threshold!r}: give a recovery in percent, a number >= 0.")
        count = int(np.sum(np.abs(means) >= threshold))
        if count == 0:
            raise InputError(f"threshold={threshold!r}: no edge has |recovery| that large; the largest is "
                             f"{abs(means[0]):.3g} %.")
    score_of = dict(zip(numbers[:count].tolist(), means[:count].tolist(), strict=True))
    kept = prune(graph, numbers[:count].tolist())
    return Circuit(edges=tuple(graph.edge_names[n] for n in kept), scores=tuple(score_of[n] for n in kept),
                   requested=count, method=scores.method, metric=scores.metric,
                   graph=asdict(graph), provenance=dict(scores.provenance))


def log_sizes(total: int, points: int = CURVE_POINTS) -> list[int]:
    """About `points` circuit sizes from 1 to `total` edges, evenly spaced on a log scale."""
    return sorted({int(round(s)) for s in np.logspace(0, np.log10(total), points)})


def faithfulness_curve(
    model,
    scores: PatchingResult,
    sizes: Sequence[int] | None = None,
    options: SweepOptions | None = None,
    *,
    random_seed: int | None = None,
    **overrides,
) -> PatchingResult:
    """The faithfulness of the top-n circuits of `scores` for each n of `sizes`, on the scores'
    own prompt pairs: the clean run with every edge outside the (pruned) circuit carrying the
    corrupted run's value, as a recovery: 0 % is the corrupted run, 100 % the clean run.

    With `random_seed`, the circuits are instead n edges drawn at random (then pruned): the
    baseline a scored circuit must beat. The result's sites are the circuits
    (`{"edges": n, "kept": edges after pruning}`); `mean` is the faithfulness over pairs.

    Args:
        sizes: circuit sizes in edges (default: about 20 sizes from 1 to every edge, log-spaced).
        random_seed: draw random circuits of the same sizes with this seed.

    Raises:
        InputTypeError: `scores` that are no edge scores, `sizes` that is no list, a
            `random_seed` that is no whole number.
        InputError: a size below 1 or above the number of scored edges, a direction (faithfulness
            is measured from the corrupted run toward the clean one), a site option, scores of
            another model's graph, or scores of a custom metric not passed again (`metric=`).

    Warns:
        DisconnectedCircuitWarning: a circuit with no path from the embeddings to the logits; its
            faithfulness is the corrupted run's (0 %).

    Example:
        >>> curve = faithfulness_curve(model, scores)
        >>> random = faithfulness_curve(model, scores, random_seed=0)
        >>> list(zip(curve.sites, curve.mean))
    """
    graph = _graph_of(scores)
    options = SweepOptions.of(options, **overrides)
    options.refuse(("direction", "position", "answer", "wrong_answer"),
                   "faithfulness_curve (it measures on the scores' own pairs and position)")
    total = len(scores.sites)
    if sizes is not None and (isinstance(sizes, str) or not isinstance(sizes, Sequence)):
        raise InputTypeError(f"sizes={sizes!r}: give a list of circuit sizes, e.g. [10, 100, 1000].")
    sizes = log_sizes(total) if sizes is None else list(sizes)
    if not sizes or not all(is_index(n) and 1 <= n <= total for n in sizes):
        raise InputError(f"sizes={sizes!r}: give circuit sizes from 1 to {total} edges (the scored edges).")
    if random_seed is not None and not is_index(random_seed):
        raise InputTypeError(f"random_seed={random_seed!r}: give a whole number (or None for the top edges).")
    if "metric" not in options.changed() and scores.metric not in (*METRICS, *ANSWER_METRICS):
        raise InputError(f"the scores were measured with a custom metric ({scores.metric!r}), which a result "
                         "records by name only; pass it again: metric=your_function.")
    if random_seed is None:
        ranked, _ = _ranked(scores, graph)
        kept = [prune(graph, ranked[:n].tolist()) for n in sizes]
    else:
        scored = [graph.edge_index(site["edge"]) for site in scores.sites]
        rng = np.random.default_rng(random_seed)
        kept = [prune(graph, list(rng.choice(scored, n, replace=False))) for n in sizes]
    metric = options.metric if "metric" in options.changed() else scores.metric

    def described(graph: Graph, sites: tuple) -> tuple[list[dict], str, tuple[str, ...]]:
        records = [{"edges": n, "kept": len(circuit)} for n, circuit in zip(sizes, kept, strict=True)]
        return records, "circuit", ("edges",)

    def sites(model_graph: Graph) -> tuple:
        if model_graph != graph:
            raise InputError(f"the scores are of a graph of {graph.layers} blocks of {graph.heads} heads in "
                             f"{graph.groups} key/value groups; this model has {model_graph.layers} of "
                             f"{model_graph.heads} in {model_graph.groups}: score this model's edges first.")
        disconnected = [n for n, circuit in zip(sizes, kept, strict=True) if not circuit]
        if disconnected:
            warnings.warn(f"the circuits of {', '.join(map(str, disconnected))} edges have no path from the "
                          "embeddings to the logits: their faithfulness is the corrupted run's (0 %).",
                          DisconnectedCircuitWarning, stacklevel=4)
        return tuple(tuple(circuit) for circuit in kept)

    options = replace(options, metric=metric, position=scores.position)
    return _edge_result(model, None, None, options, scores.prompt_pairs(), "faithfulness_curve", sites,
                        lambda runner, rows: lambda plan: run_edge_patches(runner, plan, rows, circuits=True),
                        "random" if random_seed is not None else scores.method, described)
