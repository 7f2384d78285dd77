"""Plots of patching results. They read a result and draw; they compute nothing."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from mlxterp.presentation.tables import METHOD_NAMES, site_label


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None else None
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: nothing opens a window or blocks a script.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _title(ax, text: str, width_inches: float) -> None:
    """A title wrapped to the axes' width, so long prompts stay inside the figure."""
    characters = max(40, int(width_inches * 14))  # about 14 characters an inch at 9 pt
    ax.set_title(textwrap.fill(text, characters), fontsize=9)


def _what(result) -> str:
    """How the recoveries were found, for a title: estimates say so."""
    if result.method == "exact":
        return "Patching"
    name = METHOD_NAMES[result.method]
    return f"{name[0].upper()}{name[1:]} estimate:"


def bar_chart(result):
    """Recovery per layer (or per site), positive bars blue, negative red."""
    values = result.mean
    labels = [site_label(result, site) for site in result.sites]
    width = max(6.0, 0.28 * len(values))
    fig = _figure(width, 3.6)
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color=["#2b6cb0" if v >= 0 else "#c53030" for v in values])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(values)), [label.removeprefix("L") for label in labels],
                  rotation=90 if len(values) > 40 else 0, fontsize=8)
    ax.set_xlabel("layer" if result.over == ("layer",) else "site")
    ax.set_ylabel(f"recovery (%), {result.metric}")
    _title(ax, f"{_what(result)} {result.component} ({result.direction}): {result.clean[0]!r} -> "
               f"{result.corrupted[0]!r}", width)
    return fig


def heatmap(result):
    """Recovery over two axes (layer x position or layer x head), token labels on positions."""
    grid = result.grid()
    if grid.ndim == 3:  # layer x head x position: one row per (layer, head)
        layers, heads = result.axis_values("layer"), result.axis_values("head")
        grid = grid.reshape(len(layers) * len(heads), -1)
        row_labels = [f"L{layer}H{head}" for layer in layers for head in heads]
        column_axis = "position"
    else:
        row_labels = [str(v) for v in result.axis_values("layer")]
        column_axis = result.over[1]
    columns = result.axis_values(column_axis)
    if column_axis == "position" and result.tokens:
        column_labels = [f"{p} {result.tokens[0][p]!r}" for p in columns]
    else:
        column_labels = [str(c) for c in columns]
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    width = max(5.0, 0.5 * len(columns) + 2)
    fig = _figure(width, max(4.0, 0.22 * len(row_labels) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(columns)), column_labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xlabel(column_axis)
    ax.set_ylabel("layer" if grid.ndim == 2 and len(result.over) == 2 else "layer, head")
    fig.colorbar(image, ax=ax, label=f"recovery (%), {result.metric}")
    _title(ax, f"{_what(result)} {result.component} over {' x '.join(result.over)} "
               f"({result.direction}): {result.clean[0]!r} -> {result.corrupted[0]!r}", width)
    return fig


def plot_result(result, path: str | Path | None = None):
    """Draw `result`; show it inline in a notebook, else save a PNG (to `path`) and print where.

    Returns the matplotlib Figure.
    """
    fig = bar_chart(result) if len(result.over) == 1 else heatmap(result)
    if path is None and _in_notebook():
        from IPython.display import display

        display(fig)
        return fig
    if path is None:
        path = Path(f"mlxterp-patching-{result.component}-{time.strftime('%Y%m%d-%H%M%S')}.png")
    fig.savefig(path, dpi=130)
    print(f"plot saved to {path}")
    return fig
