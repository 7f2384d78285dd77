"""Circuits drawn: the circuit as a layered graph (a figure, or an HTML page whose edges show
their scores on hover), the faithfulness curves, and the top edges of edge scores.

Nodes sit in columns by layer (the embeddings left, the logits right), heads stacked by index
with the MLP on top; head nodes are labelled `L.H` (23.3), MLPs `M` and their layer (M23). An
edge is drawn from its upstream node to each node its input feeds (the heads of a key/value
group share one input): solid into a query or an MLP, dashed into a key, dotted into a value;
its width grows with |score|, blue where patching it recovers, red where it moves away.

Example:
    >>> top_circuit(scores, edges=100).plot("circuit.png")
    >>> curve.plot("faithfulness.png")
"""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlxterp.experiments.runners.edges import Graph
from mlxterp.paths import output_path, write_atomically
from mlxterp.presentation.plots import (
    SUFFIXES,
    _figure,
    _set_title,
    _show_or_save,
    bar_chart,
    plot_patching,
    title,
)

STYLES = {"q": "-", "k": "--", "v": ":", "mlp": "-", "logits": "-"}
UP, DOWN = "#2b6cb0", "#c53030"  # recovers, moves away
TOP_EDGES = 30  # of edge scores, drawn as bars


def _graph(circuit) -> tuple[int, int]:
    return circuit.graph["layers"], circuit.graph["heads"]


def node_xy(node: str, layers: int, heads: int) -> tuple[float, float]:
    """Where a node sits: x = its layer (embeddings -1, logits `layers`), y = head index, MLP on
    top, embeddings and logits in the middle."""
    if node == "embed":
        return -1.0, (heads - 1) / 2
    if node == "logits":
        return float(layers), (heads - 1) / 2
    layer, part = node.split(".")
    return float(layer[1:]), float(heads + 0.5) if part == "mlp" else float(part[1:])


def _kind(edge: str) -> str:
    downstream = edge.split("->")[1]
    return downstream.rsplit(".", 1)[-1] if downstream != "logits" else "logits"


def _segments(circuit):
    """(edge, kind, score, (x0, y0), (x1, y1)) of every line the circuit draws."""
    layers, heads = _graph(circuit)
    graph, nodes = Graph(**circuit.graph), set(circuit.nodes)
    for edge, score in zip(circuit.edges, circuit.scores, strict=True):
        start = node_xy(edge.split("->")[0], layers, heads)
        for reader in graph.readers(graph.inputs.index(edge.split("->")[1])):
            if reader in nodes:  # a group's head that feeds nothing in the circuit is not drawn
                yield edge, _kind(edge), score, start, node_xy(reader, layers, heads)


def plot_circuit(circuit, path: str | Path | None = None, overwrite: bool = False):
    """The circuit as a layered graph (see the module's docstring).

    Example:
        >>> plot_circuit(top_circuit(scores, edges=100), "circuit.svg")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    layers, heads = _graph(circuit)
    width = max(7.0, 0.32 * (layers + 2) + 1.5)
    fig = _figure(width, max(3.5, 0.32 * (heads + 2) + 1.4))
    ax = fig.add_subplot()
    largest = max((abs(s) for s in circuit.scores), default=1.0) or 1.0
    for _, kind, score, (x0, y0), (x1, y1) in _segments(circuit):
        ax.plot([x0, x1], [y0, y1], STYLES[kind], color=UP if score >= 0 else DOWN,
                linewidth=0.3 + 3.0 * abs(score) / largest, alpha=0.35 + 0.6 * abs(score) / largest)
    for node in circuit.nodes:
        x, y = node_xy(node, layers, heads)
        is_head = ".H" in node
        ax.scatter([x], [y], s=60 if is_head else 90, marker="o" if is_head else "s", color="white",
                   edgecolors="black", zorder=3, linewidths=0.8)
        # heads "23.3", MLPs "M23": short enough not to overlap at one label per layer
        label = node[1:].replace(".H", ".") if is_head else node.replace("L", "M").removesuffix(".mlp")
        ax.annotate(label, (x, y), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=6,
                    zorder=4)
    ax.set_xticks(range(-1, layers + 1), ["emb", *[str(n) for n in range(layers)], "out"], fontsize=6)
    ax.set_yticks([*range(heads), heads + 0.5], [*[f"H{h}" for h in range(heads)], "mlp"], fontsize=6)
    ax.set_xlim(-1.6, layers + 0.6)
    ax.set_xlabel("layer")
    model = circuit.provenance.get("model", "")
    _set_title(fig, f"Circuit of {len(circuit.edges)} edges (top {circuit.requested} by {circuit.method}, "
                    f"pruned), {circuit.metric}{', ' + model if model else ''}; solid: query / MLP / "
                    "logits, dashed: key, dotted: value; blue recovers, red moves away", width)
    return _show_or_save(fig, path, f"mlxterp-circuit-{model}")


def write_circuit_html(circuit, path: str | Path, overwrite: bool = False, exact=None) -> Path:
    """The circuit as one self-contained HTML page: hovering an edge shows its name, its score
    and, with `exact` (the `edge_patching` result of the circuit's edges), its exact recovery.

    Example:
        >>> write_circuit_html(circuit, "circuit.html", exact=model.edge_patching(pairs=pairs,
        ...                    metric="logit_diff", edges=list(circuit.edges)))
    """
    target = output_path(path, {".html"}, overwrite)
    layers, heads = _graph(circuit)
    measured = {} if exact is None else {site["edge"]: value for site, value in zip(exact.sites, exact.mean,
                                                                                  strict=True)}
    scale_x, scale_y, margin = 36, 40, 50

    def point(x: float, y: float) -> tuple[float, float]:
        return margin + (x + 1) * scale_x, margin + (heads + 0.5 - y) * scale_y

    largest = max((abs(s) for s in circuit.scores), default=1.0) or 1.0
    lines = []
    for edge, kind, score, start, end in _segments(circuit):
        (x0, y0), (x1, y1) = point(*start), point(*end)
        tip = f"{edge}\n{circuit.method} score {score:.2f}%"
        if edge in measured:
            tip += f"\nexact recovery {measured[edge]:.2f}%"
        dash = {"--": ' stroke-dasharray="6 3"', ":": ' stroke-dasharray="2 3"'}.get(STYLES[kind], "")
        stroke = f'stroke="{UP if score >= 0 else DOWN}" stroke-width="{0.6 + 5 * abs(score) / largest:.2f}"'
        lines.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                     f'data-edge="{html.escape(edge)}" {stroke}{dash} opacity="0.7">'
                     f'<title>{html.escape(tip)}</title></line>')
    for node in circuit.nodes:
        x, y = point(*node_xy(node, layers, heads))
        lines.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="white" stroke="black">'
                     f'<title>{html.escape(node)}</title></circle>'
                     f'<text x="{x:.1f}" y="{y - 9:.1f}" font-size="9" text-anchor="middle">'
                     f'{html.escape(node)}</text>')
    width, height = point(layers + 1, -1)
    model = html.escape(circuit.provenance.get("model", ""))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Circuit, {model}</title></head>"
            f"<body style='font-family: sans-serif'><h3>Circuit of {len(circuit.edges)} edges (top "
            f"{circuit.requested} by {html.escape(circuit.method)}, pruned), {html.escape(circuit.metric)}, "
            f"{model}</h3><p>Hover an edge for its score{' and exact recovery' if measured else ''}. "
            "Dashed: into a key, dotted: into a value.</p>"
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}'>"
            + "".join(lines) + "</svg></body></html>")
    write_atomically(target, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return target


def plot_faithfulness(curves: list, path: str | Path | None = None, overwrite: bool = False):
    """Faithfulness (percent) against circuit size (edges requested, log scale), one line per
    curve (`faithfulness_curve` results) with its standard-error band.

    Example:
        >>> plot_faithfulness([eap_curve, eap_ig_curve, random_curve], "faithfulness.png")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for curve in curves:
        sizes = np.array([site["edges"] for site in curve.sites])
        mean, error = curve.mean, curve.standard_error
        ax.plot(sizes, mean, marker="o", markersize=3, label=curve.method)
        ax.fill_between(sizes, mean - error, mean + error, alpha=0.2)
    ax.set_xscale("log")
    ax.axhline(100, color="black", linewidth=0.6, linestyle=":")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("edges in the circuit (before pruning)")
    ax.set_ylabel(f"faithfulness (%), {curves[0].metric}")
    ax.legend(fontsize=8)
    model = curves[0].provenance.get("model", "")
    _set_title(fig, f"Faithfulness of circuits, {model}: normalised mean over {len(curves[0].clean)} "
                    "prompt pairs (bands: standard error); 0 % the corrupted run, 100 % the clean run", 6.5)
    return _show_or_save(fig, path, f"mlxterp-faithfulness-{model}")


def plot_edges(result):
    """The `TOP_EDGES` edges of edge scores with the largest |recovery|, as bars."""
    order = np.argsort(-np.abs(result.mean), kind="stable")[:TOP_EDGES]
    shown = replace(result, sites=[result.sites[i] for i in order],
                    metric_values=result.metric_values.subset(list(range(len(result.clean))), order))
    fig = bar_chart(shown)
    _set_title(fig, f"{title(result)} (top {len(order)} of {len(result.sites)} edges)", 6.0)
    return fig


def plot_any_patching(result, path: str | Path | None = None, overwrite: bool = False):
    """A `PatchingResult` drawn by what its sites are: a faithfulness curve (circuits), the top
    edges (edge scores), else as `plot_patching` draws a sweep."""
    if result.component == "circuit":
        return plot_faithfulness([result], path, overwrite=overwrite)
    if result.component == "edges":
        if path is not None:
            path = output_path(path, SUFFIXES, overwrite)
        return _show_or_save(plot_edges(result), path, f"mlxterp-{result.method}-edges-{result.metric}")
    return plot_patching(result, path, overwrite=overwrite)
