"""Figures of patching results. They read a result and draw; they compute nothing.

- one axis (layers, or explicit sites): bars, with standard-error bars over several pairs;
- two axes (layer x position, layer x head): a heatmap;
- three axes (layer x head x position): one heatmap per head, on one shared scale.

Colours diverge around 0 (blue: the patch moves the receiver toward the donor, red: away) on a
symmetric range set by the 99th percentile of |recovery|, so one outlying cell does not wash out
the rest; cells beyond the range (by more than 5%) are annotated with their value. Positions where the prompts
differ are labelled with both tokens (clean / corrupted) and drawn in red.

Example:
    >>> fig = plot_result(result, "figures/ioi-heads.pdf")   # PNG, PDF or SVG by extension
"""

from __future__ import annotations

import functools
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from mlxterp.experiments.pipeline.results import site_label
from mlxterp.paths import numbered, output_path, write_atomically
from mlxterp.presentation.tables import METHOD_NAMES

SUFFIXES = {".png", ".pdf", ".svg"}
ROBUST_PERCENTILE = 99  # the colour range: this percentile of |recovery|, not the largest cell
OUTLIER = 1.05  # cells this far past the colour range are annotated with their value
DIFFERING = "#c53030"  # tick labels of positions where the prompts differ


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ipython = shell.get_ipython() if shell is not None else None
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}  # ␣ ↵ ⇥ ␍
MOST_LABELLED_LAYERS = 40  # up to this many layers, every layer has its tick label


def token_text(token: str, width: int | None = None) -> str:
    """A token as a figure shows it: every space, newline and tab visible (' Paris' is
    '␣Paris', never 'Paris'), an empty token '∅', and characters the figure's font cannot draw
    as escapes (\u4e2d) instead of boxes; cut to `width` characters with '…'.

    Example:
        >>> token_text(" Paris"), token_text("\n"), token_text("中")
        ('␣Paris', '↵', '\\u4e2d')
    """
    text = "".join(VISIBLE.get(c, c if c.isprintable() and _drawable(c) else _escape(c)) for c in token)
    text = text or "\u2205"
    return text if width is None or len(text) <= width else text[:width - 1] + "\u2026"


def _escape(character: str) -> str:
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@functools.cache
def _drawable(character: str) -> bool:
    """Whether the figures' font has a glyph for `character` (matplotlib draws a box otherwise)."""
    return _font().get_char_index(ord(character)) != 0


@functools.cache
def _font():
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return FT2Font(font_manager.findfont(font_manager.FontProperties()))  # the default font


def layer_ticks(count: int) -> range:
    """Which of `count` layers get a tick label: all up to 40, else evenly spaced."""
    return range(0, count, max(1, math.ceil(count / MOST_LABELLED_LAYERS)))


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: nothing opens a window or blocks a script.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def title(result) -> str:
    """What the figure shows: method, component, axes, metric, direction, model, prompts."""
    how = "Patching" if result.method == "exact" else f"{METHOD_NAMES[result.method].capitalize()} estimate:"
    how = how.replace("(atp)", "(AtP)").replace("(ig)", "(IG)")
    pairs = len(result.clean)
    spread = ("error bars: standard error" if len(result.over) == 1 or result.component == "sites"
              else f"standard error of a cell up to {np.nanmax(result.standard_error):.1f} points")
    prompts = (f"{result.clean[0]!r} -> {result.corrupted[0]!r}" if pairs == 1
               else f"normalised mean of {pairs} prompt pairs ({spread})")
    model = result.provenance.get("model", "")
    return (f"{how} {result.component} over {' x '.join(result.over)}, {result.metric}, "
            f"{result.direction}{', ' + model if model else ''}: {prompts}")


# A quoted prompt (as repr writes it) or a word: titles break between these, never inside one.
_TITLE_PIECES = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+""")


def wrap_title(text: str, characters: int) -> list[str]:
    """`text` in lines of at most `characters`, broken between words and never inside a quoted
    prompt (a quoted prompt longer than a line has a line of its own).

    Example:
        >>> wrap_title("Patching mlp: 'When Mary and John went' -> 'When John'", 30)
        ['Patching mlp:', "'When Mary and John went' ->", "'When John'"]
    """
    lines, line = [], ""
    for piece in _TITLE_PIECES.findall(text):
        if line and len(line) + 1 + len(piece) > characters:
            lines.append(line)
            line = piece
        else:
            line = f"{line} {piece}" if line else piece
    return [*lines, line] if line else lines


def _set_title(fig, text: str, width_inches: float) -> None:
    """A title wrapped to the figure's width, so long prompts stay inside it; a quoted prompt
    longer than the width is set smaller rather than broken."""
    characters = max(40, int(width_inches * 13))  # about 13 characters an inch at 9 pt
    lines = wrap_title(text, characters)
    longest = max(map(len, lines))
    fig.suptitle("\n".join(lines), fontsize=9 * min(1.0, characters / longest))


def color_limit(values: np.ndarray) -> float:
    """The symmetric colour range: the robust percentile of |values|, at least 1 point."""
    finite = np.abs(values[np.isfinite(values)])
    return max(float(np.percentile(finite, ROBUST_PERCENTILE)) if finite.size else 0.0, 1.0)


def position_labels(result, positions: list[int]) -> tuple[list[str], list[bool]]:
    """Tick labels of positions: `5 ' Mary'`, or `5 ' Mary' / ' John'` where the prompts differ."""
    labels, differ = [], []
    for p in positions:
        clean = result.tokens[0][p] if result.tokens else ""
        corrupted = result.corrupted_tokens[0][p] if result.corrupted_tokens else clean
        differ.append(clean != corrupted)
        labels.append(f"{p} {token_text(clean)} / {token_text(corrupted)}" if clean != corrupted
                      else f"{p} {token_text(clean)}")
    return labels, differ


def bar_chart(result):
    """Recovery per layer (or per site), with standard-error bars over several pairs."""
    values = result.mean
    labels = [site_label(result, site).removeprefix("L") if result.over == ("layer",)
              else site_label(result, site) for site in result.sites]
    width = max(6.0, 0.28 * len(values))
    fig = _figure(width, 3.8)
    ax = fig.add_subplot()
    errors = result.standard_error if len(result.clean) > 1 else None
    ax.bar(range(len(values)), values, yerr=errors, capsize=2,
           color=["#2b6cb0" if v >= 0 else DIFFERING for v in values])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(values)), labels, rotation=90 if len(values) > 40 or result.over != ("layer",)
                  else 0, fontsize=8)
    ax.set_xlabel("layer" if result.over == ("layer",) else "site")
    ax.set_ylabel(f"recovery (%), {result.metric}")
    _set_title(fig, title(result), width)
    return fig


def _draw_grid(fig, ax, grid: np.ndarray, limit: float, rows: list[str], columns: list[str],
               differ: list[bool] | None):
    """One heatmap panel on the shared scale; cells beyond it annotated with their value."""
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for tick, marked in zip(ax.get_xticklabels(), differ or [], strict=False):
        if marked:
            tick.set_color(DIFFERING)
            tick.set_fontweight("bold")
    for (row, column), value in np.ndenumerate(grid):
        if np.isfinite(value) and abs(value) > OUTLIER * limit:
            ax.annotate(f"{value:.0f}", (column, row), ha="center", va="center", fontsize=6,
                        color="white")
    return image


def heatmap(result):
    """Recovery over two axes (layer x position or layer x head), or over three as one panel
    per head (layer x position each), all on one colour scale."""
    limit = color_limit(result.mean)
    layers = result.axis_values("layer")
    rows = [str(layer) for layer in layers]
    column_axis = result.over[-1]
    columns = result.axis_values(column_axis)
    differ = None
    if column_axis == "position":
        column_labels, differ = position_labels(result, columns)
    else:
        column_labels = [str(c) for c in columns]
    grid = result.grid()
    panels = [("", grid)] if grid.ndim == 2 else [
        (f"head {head}", grid[:, i]) for i, head in enumerate(result.axis_values("head"))]
    across = min(3, len(panels))
    down = math.ceil(len(panels) / across)
    panel_width = max(3.5, 0.32 * len(columns) + 1.2)
    width = panel_width * across + 1.2
    fig = _figure(width, down * max(3.5, 0.16 * len(rows) + 1.6) + 0.8)
    axes = fig.subplots(down, across, squeeze=False, sharey=True)
    for ax, (name, values) in zip(axes.flat, panels, strict=False):
        image = _draw_grid(fig, ax, values, limit, rows, column_labels, differ)
        ax.set_title(name, fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("layer")
    for ax in axes[-1]:
        ax.set_xlabel(column_axis)
    bar = fig.colorbar(image, ax=axes, label=f"recovery (%), {result.metric}",
                       extend="both" if np.nanmax(np.abs(grid)) > limit else "neither")
    bar.set_ticks([-limit, 0, limit], labels=[f"{-limit:.0f}", "0", f"{limit:.0f}"])
    _set_title(fig, title(result), width)
    return fig


def plot_result(result, path: str | Path | None = None, overwrite: bool = False):
    """Draw `result`; show it inline in a notebook, else save it (to `path`: PNG, PDF or SVG by
    its extension; an existing file only with `overwrite=True`) and print where.

    With no path in a script, the file is named after what it shows and numbered so that two
    plots never overwrite each other. Returns the matplotlib Figure.
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    fig = bar_chart(result) if len(result.over) == 1 else heatmap(result)
    stem = "-".join(["mlxterp", result.method if result.method != "exact" else "patching",
                     result.component, *result.over, result.metric])
    return _show_or_save(fig, path, stem)


def plot_patching(result, path: str | Path | None = None, overwrite: bool = False):
    """`result` as `plot_result` draws it, or for a causal trace as the paper's figure."""
    if result.metric == "prob" and result.corruption and result.over == ("layer", "position"):
        return plot_causal_trace([result], path, overwrite=overwrite)
    return plot_result(result, path, overwrite=overwrite)


def _show_or_save(fig, path: Path | None, stem: str):
    """Show `fig` inline in a notebook when no path is given, else save it (to `path`, or to a
    new numbered file named `stem` in the working directory)."""
    if path is None and _in_notebook():
        from IPython.display import display

        display(fig)
        return fig
    if path is None:
        path = numbered(Path.cwd(), stem.replace("/", "_").replace(" ", "_"), ".png")
    with warnings.catch_warnings():
        # A token in a script the font lacks (a lens cell in Chinese) is drawn as a box; one
        # warning per glyph would bury what the script prints.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        write_atomically(Path(path), lambda temporary: fig.savefig(temporary, dpi=130))
    print(f"plot saved to {path}")
    return fig


# -- causal tracing ------------------------------------------------------------------------------

TRACE_COLORS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}  # the paper's


def effect_panels(panels: list[tuple[str, np.ndarray]], rows: list[str], marked: list[bool],
                  layers: list[int], title_text: str, label: str):
    """Causal tracing's figure: one heatmap per kind of state (name, grid (rows, layers)), the
    tokens (or token categories) down the side with the subject's marked, layers across, each
    panel on its own scale from min(0, lowest) to its highest value."""
    width = max(3.2, 0.13 * len(layers) + 1.2) * len(panels) + 1.2  # room for every layer's label
    fig = _figure(width, max(3.0, 0.22 * len(rows) + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (name, grid) in zip(axes, panels, strict=True):
        kind = name.split()[0]
        image = ax.imshow(grid, cmap=TRACE_COLORS.get(kind, "Blues"), aspect="auto",
                          vmin=min(0.0, float(np.nanmin(grid))), vmax=max(float(np.nanmax(grid)), 1e-9))
        ax.set_title(name, fontsize=8)
        ticks = layer_ticks(len(layers))
        ax.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize=6 if len(layers) > 24 else 7)
        ax.set_xlabel("layer")
        fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    axes[0].set_yticks(range(len(rows)), rows, fontsize=7)
    for tick, is_marked in zip(axes[0].get_yticklabels(), marked, strict=True):
        if is_marked:
            tick.set_color(DIFFERING)
            tick.set_fontweight("bold")
    _set_title(fig, title_text, width)
    return fig


def plot_causal_trace(results: list, path: str | Path | None = None, overwrite: bool = False):
    """The paper's figure for one prompt: the mean indirect effect of each kind's results
    (hidden, MLP, attention) over layer x token, tokens down the side, the subject marked (*).

    Example:
        >>> plot_causal_trace([hidden, mlp, attn], "eiffel.pdf")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    first = results[0]
    layers, positions = first.axis_values("layer"), first.axis_values("position")
    subject = set(first.corruption.get("positions", []))
    rows = [f"{token_text(first.tokens[0][p])}{' *' if p in subject else ''}" for p in positions]
    answer = first.answer_tokens[0][0] if first.answer_tokens else "the answer"
    panels = []
    for result in results:
        effect = result.effect.mean(axis=0)
        grid = np.full((len(positions), len(layers)), np.nan)
        for site, value in zip(result.sites, effect, strict=True):
            grid[positions.index(site["position"]), layers.index(site["layer"])] = value
        panels.append((result.component, grid))
    values = first.metric_values
    model = first.provenance.get("model", "")
    text = (f"Causal tracing{', ' + model if model else ''}: {first.clean[0]!r}, subject (*) noised "
            f"({len(first.clean)} samples); P({answer!r}) clean {values.clean.mean():.3f}, "
            f"corrupted {values.corrupted.mean():.3f}")
    fig = effect_panels(panels, rows, [p in subject for p in positions], layers, text,
                        "indirect effect on P(answer)")
    return _show_or_save(fig, path, f"mlxterp-causal-trace-{model}")


def plot_token_classes(summaries: list, path: str | Path | None = None, overwrite: bool = False):
    """The paper's summary figure (fig. 2): for each kind (`TokenClassSummary`), the mean
    indirect effect over facts by token class (rows, the subject's marked) x layer.

    Example:
        >>> plot_token_classes([token_class_summary(r) for r in (hidden, mlp, attn)], "facts.png")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    first = summaries[0]
    model = first.provenance.get("model", "")
    text = (f"Causal tracing{', ' + model if model else ''}: mean indirect effect on P(answer) over "
            f"{len(first.prompts)} facts ({first.samples} noise samples each)")
    rows = [f"{name} ({count})" for name, count in zip(first.classes, first.facts_per_class, strict=True)]
    fig = effect_panels([(summary.kind, summary.mean) for summary in summaries], rows,
                        ["subject" in name for name in first.classes], first.layers, text,
                        "mean indirect effect")
    return _show_or_save(fig, path, f"mlxterp-causal-tracing-facts-{model}")


# -- lenses and heads ----------------------------------------------------------------------------


def plot_lens(result, path: str | Path | None = None, overwrite: bool = False):
    """The lens grid: layers up the side (last on top), positions across labelled with the input
    tokens, each cell the top token, coloured by its probability (0 to 1).

    Example:
        >>> plot_lens(model.logit_lens("The Eiffel Tower is in"), "lens.png")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    probs = result.top_probs[:, :, 0]
    width = 0.75 * len(result.positions) + 2.2
    fig = _figure(width, 0.24 * len(result.layers) + 1.8)
    ax = fig.subplots()
    image = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for (row, column), prob in np.ndenumerate(probs):
        ax.text(column, row, token_text(result.top_tokens[row][column][0], 8), ha="center", va="center",
                fontsize=6, color="white" if prob > 0.6 else "black")
    ax.set_xticks(range(len(result.positions)),
                  [token_text(result.tokens[p], 10) for p in result.positions],
                  rotation=60, ha="right", fontsize=7)
    ticks = layer_ticks(len(result.layers))
    ax.set_yticks(ticks, [str(result.layers[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="probability of the top token", shrink=0.8)
    model = result.provenance.get("model", "")
    target = f", target {result.target!r}" if result.target is not None else ""
    prompt = f": {result.prompt!r}" if result.prompt else ""
    _set_title(fig, f"{result.lens.capitalize()} lens{', ' + model if model else ''}{target}{prompt}",
               width)
    return _show_or_save(fig, path, f"mlxterp-{result.lens}-lens-{model}")


def plot_heads(result, path: str | Path | None = None, overwrite: bool = False):
    """Head detection: one heatmap per kind (layers down, heads across), colour = score 0 to 1.

    Example:
        >>> plot_heads(model.detect_heads(), "heads.png")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    n_layers, n_heads = result.scores.shape[1:]
    panel_width = max(2.2, 0.3 * n_heads + 1.0)
    width = panel_width * len(result.kinds) + 1.2
    fig = _figure(width, 0.16 * n_layers + 1.8)
    axes = fig.subplots(1, len(result.kinds), squeeze=False, sharey=True)[0]
    for ax, kind, grid in zip(axes, result.kinds, result.scores, strict=True):
        image = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_title(kind, fontsize=8)
        ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)], fontsize=7)
        ax.set_xlabel("head")
    ticks = layer_ticks(n_layers)
    axes[0].set_yticks(ticks, [str(x) for x in ticks], fontsize=7)
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="attention on the kind's target tokens", shrink=0.8)
    model = result.provenance.get("model", "")
    _set_title(fig, f"Head detection{', ' + model if model else ''}: {result.text}", width)
    return _show_or_save(fig, path, f"mlxterp-heads-{model}")


def plot_routing(stats, path: str | Path | None = None, overwrite: bool = False):
    """Expert routing: layers down, experts across; colour = clean minus corrupted fraction of
    tokens routed there (or the fraction, for one set of prompts).

    Example:
        >>> plot_routing(routing_statistics(moe, pairs=pairs), "routing.png")
    """
    if path is not None:
        path = output_path(path, SUFFIXES, overwrite)
    compared = stats.corrupted is not None
    values = stats.difference() if compared else stats.clean
    n_layers, n_experts = values.shape
    width = min(16.0, max(4.0, 0.12 * n_experts + 1.8))
    fig = _figure(width, 0.16 * n_layers + 1.8)
    ax = fig.subplots()
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r" if compared else "Blues", aspect="auto",
                      vmin=-limit if compared else 0, vmax=limit)
    ax.set_yticks(range(n_layers), [str(layer) for layer in stats.layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("expert")
    label = "clean minus corrupted: fraction of tokens" if compared else "fraction of tokens routed"
    fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    _set_title(fig, f"Expert routing, {stats.model}: {stats.tokens} tokens per side", width)
    return _show_or_save(fig, path, f"mlxterp-routing-{Path(stats.model).name}")
