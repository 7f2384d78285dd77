"""Results that say what made them, and figures checked on their objects: titles inside the
canvas, differing positions marked, robust colour limits, facets, error bars, file names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mlxterp.errors import OutputPathError, ResultFormatError
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.presentation.plots import color_limit, layer_ticks, token_text, wrap_title

NAMES = ("When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to")
MARY = dict(answer=" Mary", wrong_answer=" John")


@pytest.fixture(scope="module")
def heads(smollm2):
    from mlxterp import InterpretableModel

    model = InterpretableModel(*smollm2)
    return model.patching_sweep(*NAMES, component="self_attn", over=("layer", "head"),
                                layers=[16, 23, 29], metric="logit_diff", **MARY)


def inside_canvas(fig, text) -> bool:
    box = text.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    return box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y0 >= 0 and box.y1 <= fig.bbox.y1


def test_results_carry_their_provenance_and_round_trip_exactly(heads, tmp_path):
    saved = json.loads(heads.to_json())
    assert saved["format"] == 4
    assert "recovery" not in saved and all("location" in site for site in saved["sites"])  # computed
    assert saved["answers"] == [[heads.answers[0][0], heads.answers[0][1]]]  # per pair
    assert saved["answer_tokens"] == [[" Mary", " John"]]
    assert saved["resources"]["ranks"] == 1 and saved["resources"]["peak_memory_bytes"] > 0
    assert saved["provenance"]["model"] == "smollm2-135m"
    assert len(saved["provenance"]["model_sha256"]) == 64 and saved["provenance"]["dtype"] == "float32"
    assert {"mlxterp", "mlx"} <= set(saved["provenance"])
    assert saved["corrupted_tokens"][0][1] == " John" and saved["tokens"][0][1] == " Mary"
    again = PatchingResult.from_json(heads.to_json())
    for name, value in vars(heads).items():
        other = getattr(again, name)
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(other, value)
        elif name == "metric_values":
            for key, array in vars(value).items():
                np.testing.assert_array_equal(getattr(other, key), array)
        else:
            assert other == value, name
    frame = heads.to_dataframe()
    assert frame.attrs["model"] == "smollm2-135m" and frame.attrs["metric"] == "logit_diff"
    assert {"clean", "corrupted", "layer", "head", "recovery", "noise"} <= set(frame.columns)
    path = tmp_path / "r.json"
    heads.to_json(path)
    with pytest.raises(OutputPathError, match="exists; pass overwrite=True"):
        heads.to_json(path)
    heads.to_json(path, overwrite=True)


def test_older_and_newer_formats(heads):
    third = json.loads(heads.to_json())  # format 3 stored recoveries beside parallel site lists
    third.update(format=3, sites=heads.labels, locations=[site["location"] for site in heads.sites],
                 recovery=heads.recovery.tolist(), baseline=heads.baseline.tolist(),
                 noise=heads.noise.tolist())
    read = PatchingResult.from_json(json.dumps(third))
    assert read.sites == heads.sites
    np.testing.assert_array_equal(read.recovery, heads.recovery)
    first = dict(third)  # format 1 (mlxterp 0.1): recoveries and labels only, answers for all pairs
    for key in ("format", "provenance", "corrupted_tokens", "metric_values", "noise", "method", "locations",
                "resources"):
        first.pop(key)
    first["answers"], first["answer_tokens"] = first["answers"][0], first["answer_tokens"][0]
    read = PatchingResult.from_json(json.dumps(first))
    # Recoveries come back through metric values that reproduce them: x / 100 * gap / gap * 100
    # rounds twice in float64, so they agree to a few units in the last place, not bit for bit.
    np.testing.assert_allclose(read.recovery, heads.recovery, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(read.baseline, heads.baseline, rtol=1e-15)
    assert read.provenance == {} and read.method == "exact" and read.sites == heads.labels
    assert read.answers == heads.answers and read.answer_tokens == heads.answer_tokens
    newer = json.loads(heads.to_json())
    newer["format"] = 5
    with pytest.raises(ResultFormatError, match="format 5, written by mlxterp"):
        PatchingResult.from_json(json.dumps(newer))


def test_compact_repr(heads):
    text = repr(heads)
    assert len(text.splitlines()) == 2
    assert text.startswith("PatchingResult(self_attn over layer x head, logit_diff, denoise, exact; "
                           "27 sites, 1 pair, smollm2-135m)")
    assert "L23 H3 57.8%" in text


def test_heatmap_objects(heads, tmp_path):
    fig = heads.plot(tmp_path / "heads.svg")
    ax = fig.axes[0]
    image = ax.get_images()[0]
    low, high = image.get_clim()
    limit = color_limit(heads.mean)
    assert low == -high == -limit and limit < heads.mean.max()  # robust: the 57.8% outlier does not set it
    annotated = [t.get_text() for t in ax.texts]
    assert "58" in annotated  # the outlier is written on its cell
    ticks = [t.get_text() for t in fig.axes[-1].get_yticklabels()]  # the colour bar
    assert ticks == [f"{-limit:.0f}", "0", f"{limit:.0f}"]
    assert inside_canvas(fig, fig._suptitle)
    assert "logit_diff" in fig.get_suptitle() and "smollm2-135m" in fig.get_suptitle()
    assert (tmp_path / "heads.svg").read_text().lstrip().startswith("<?xml")


def test_positions_mark_where_the_prompts_differ(wrapped, tmp_path):
    result = wrapped.patching_sweep(*NAMES, component="input", over=("layer", "position"),
                                    layers=[0, 12], metric="kl")
    fig = result.plot(tmp_path / "positions.pdf")
    labels = fig.axes[0].get_xticklabels()
    marked = {label.get_text() for label in labels if label.get_color() != "black"}
    assert marked == {"1 \u2423Mary / \u2423John", "3 \u2423John / \u2423Mary", "9 \u2423John / \u2423Mary"}
    assert (tmp_path / "positions.pdf").read_bytes().startswith(b"%PDF")


def test_three_axes_are_facets_not_a_strip(wrapped, tmp_path):
    result = wrapped.patching_sweep(*NAMES, component="self_attn", over=("layer", "head", "position"),
                                    layers=[23, 29], heads=[0, 1, 3, 4], metric="kl")
    fig = result.plot(tmp_path / "facets.png")
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["head 0", "head 1", "head 3", "head 4"]
    assert len({ax.get_images()[0].get_clim() for ax in panels}) == 1  # one shared scale
    width, height = fig.get_size_inches()
    assert width / height < 3 and inside_canvas(fig, fig._suptitle)


def test_several_pairs_have_error_bars_and_file_names_never_collide(wrapped, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = [NAMES[0], "When Anna and Tom went to the park, Tom gave a ball to"]
    corrupted = [NAMES[1], "When Tom and Anna went to the park, Anna gave a ball to"]
    result = wrapped.patching_sweep(clean, corrupted, layers=[0, 5, 10], metric="kl")
    fig = result.plot()
    bars = fig.axes[0].containers[0]
    assert bars.has_yerr and "normalised mean of 2 prompt pairs" in fig.get_suptitle().replace("\n", " ")
    mean, error = result.mean[0], result.standard_error[0]
    segment = bars.lines[2][0].get_segments()[0]
    np.testing.assert_allclose(segment[:, 1], [mean - error, mean + error])
    result.plot()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "mlxterp-patching-mlp-layer-kl-2.png", "mlxterp-patching-mlp-layer-kl.png"]
    with pytest.raises(OutputPathError, match="'.jpg'; use one of .pdf, .png, .svg"):
        result.plot(tmp_path / "figure.jpg")


def test_tokens_in_figures_show_their_whitespace_and_draw_no_boxes():
    assert token_text(" Paris") == "\u2423Paris" != token_text("Paris")  # a leading space is seen
    assert token_text("\n\n") == "\u21b5\u21b5" and token_text(" ") == "\u2423" and token_text("") == "\u2205"
    assert token_text("\u4e2d") == "\\u4e2d"  # the default font has no glyph: an escape, not a box
    assert token_text("caf\u00e9") == "caf\u00e9" and token_text("abcdefghij", 5) == "abcd\u2026"


def test_every_layer_is_labelled_up_to_40():
    assert list(layer_ticks(30)) == list(range(30)) and list(layer_ticks(40)) == list(range(40))
    assert list(layer_ticks(48)) == list(range(0, 48, 2))


def test_titles_break_between_words_never_inside_a_quoted_prompt():
    prompt = "When Mary and John went to the store, John gave a drink to"
    other = prompt.replace("Mary", "Ann")
    text = f"Patching mlp over layer, kl, denoise, smollm2-135m: {prompt!r} -> {other!r}"
    lines = wrap_title(text, 50)
    assert " ".join(lines) == text
    assert all(line.count("'") % 2 == 0 for line in lines)  # every quote closes on its own line
    assert all(len(line) <= 50 or line.startswith("'") for line in lines)


def test_lens_cells_of_whitespace_tokens_are_visible(wrapped, tmp_path):
    result = wrapped.logit_lens("def f():\n    return 1\n\n\ndef g():")
    fig = result.plot(tmp_path / "lens.png")
    cells = [text.get_text() for text in fig.axes[0].texts]
    whitespace = [cell[0] for row in result.top_tokens for cell in row if not cell[0].strip()]
    assert whitespace, "the prompt should make some layer predict a whitespace token"
    assert "" not in cells and all(token_text(token, 8) in cells for token in whitespace)
    ticks = [label.get_text() for label in fig.axes[0].get_yticklabels()]
    assert ticks == [str(layer) for layer in result.layers]  # every one of the 30 layers
