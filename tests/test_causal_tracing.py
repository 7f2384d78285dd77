"""Causal tracing and corruptions made from the clean prompt: the engine against the naive
one-forward-per-restoration procedure, the noise against its definition, the figure, the CLI,
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_model_untouched, parameters_snapshot

from mlxterp import Fact, InterpretableModel, TokenClassSummary, answered_facts, token_class_summary
from mlxterp.errors import BaselineError, InputError, InputTypeError
from mlxterp.experiments.analyses.causal_tracing import TOKEN_CLASSES, token_classes
from mlxterp.experiments.data.corruption import Ablate, Noise, embedding_statistics, subject_positions
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.experiments.pipeline.sites import site_at
from mlxterp.presentation import cli
from mlxterp.presentation.plots import plot_causal_trace, plot_token_classes
from mlxterp.tracing.names import Site, SiteGroup

PROMPT, SUBJECT, ANSWER = "The iPhone is made by", "The iPhone", " Apple"  # 5 tokens
EIFFEL = "The Eiffel Tower is located in the city of"
KINDS = ("hidden", "mlp", "attn")


def assert_same_recoveries(engine: PatchingResult, naive: PatchingResult) -> None:
    """Equal within 0.01 pp, or 3x the float32 noise floor each result reports where that is
    larger (batch layouts round differently: metrics.LOGIT_NOISE)."""
    assert engine.sites == naive.sites and engine.recovery.shape == naive.recovery.shape
    tolerance = np.maximum(0.01, 3 * np.maximum(engine.noise, naive.noise))
    assert np.all(np.abs(engine.recovery - naive.recovery) <= tolerance)


@pytest.fixture(scope="module")
def traces(smollm2):
    """Each kind traced by the engine, with one noise sample."""
    wrapped = InterpretableModel(*smollm2)
    return {kind: wrapped.causal_trace(PROMPT, Noise(SUBJECT, samples=1), answer=ANSWER, kind=kind)
            for kind in KINDS}


# The naive procedure is 150 forwards a kind: CI's slow round runs the windows (mlp), under Haswell too.
@pytest.mark.kernels
@pytest.mark.parametrize("kind", [pytest.param("mlp", marks=pytest.mark.slow),
                                  pytest.param("hidden", marks=pytest.mark.slow),
                                  pytest.param("attn", marks=pytest.mark.slow)])
def test_engine_equals_naive(traces, wrapped, kind):
    engine = traces[kind]
    naive = wrapped.causal_trace(PROMPT, Noise(SUBJECT, samples=1), answer=ANSWER, kind=kind, naive=True)
    assert_same_recoveries(engine, naive)
    # 0.01 pp of the answer's probability: the bar for the indirect effect.
    assert np.abs(engine.effect - naive.effect).max() <= 1e-4
    assert engine.effect.max() > 0.05  # something is restored: the comparison is not of zeros


def test_sites_are_windows_of_the_papers_shape(traces, wrapped):
    result = traces["mlp"]
    n_layers, seq_len = len(wrapped.tree.blocks), 5
    assert result.over == ("layer", "position") and len(result.sites) == n_layers * seq_len
    # The paper's window for layer l: layers l-5 .. l+4, cut at the ends.
    windows = {(s["layer"], s["position"]): [int(p["module"].split(".")[-2]) for p in s["location"]["parts"]]
               for s in result.sites}
    assert windows[0, 1] == list(range(0, 5)) and windows[15, 1] == list(range(10, 20))
    assert windows[29, 4] == list(range(24, 30))
    assert all(len(site["location"]) == 5 for site in traces["hidden"].sites)  # one Site each


@pytest.mark.kernels
def test_restoring_every_hidden_state_of_the_last_layer_restores_the_clean_run(traces):
    """At the last layer a restored state at the last token is the clean run's final residual
    stream there: P(answer) comes back exactly (recovery 100% within the noise floor)."""
    result = traces["hidden"]
    last = result.labels.index({"layer": 29, "position": 4})
    assert abs(result.recovery[0, last] - 100) <= max(0.01, 3 * result.noise[0, last])
    values = result.metric_values
    assert values.clean[0] > 0.3 and values.corrupted[0] < values.clean[0] / 2  # the noise matters


def test_noise_is_seeded_and_scaled_as_the_paper(wrapped):
    """Default noise sd: 3x the sd of all token embeddings, checked against numpy on the
    embedding matrix; the same seed gives the same noise, another seed other noise."""
    weight = np.array(wrapped.model.model.embed_tokens.weight.astype(mx.float32), dtype=np.float64)
    mean, std = embedding_statistics(wrapped)
    np.testing.assert_allclose(std, weight.std(), rtol=1e-6)
    np.testing.assert_allclose(mean, weight.mean(axis=0), atol=1e-7)
    first, again, other = (wrapped.patching_sweep(EIFFEL, Noise(SUBJECT_EIFFEL, samples=2, seed=seed),
                                                  layers=[0], metric="kl") for seed in (0, 0, 1))
    assert first.corruption["scale"] == pytest.approx(3 * weight.std(), rel=1e-6)
    np.testing.assert_array_equal(first.metric_values.corrupted, again.metric_values.corrupted)
    assert not np.allclose(first.metric_values.corrupted, other.metric_values.corrupted)


SUBJECT_EIFFEL = "The Eiffel Tower"


@pytest.mark.kernels
@pytest.mark.parametrize("spec", [pytest.param(Noise(SUBJECT_EIFFEL, samples=2), marks=pytest.mark.slow),
                                  pytest.param(Ablate(SUBJECT_EIFFEL, kind="mean"), marks=pytest.mark.slow),
                                  Ablate((1, 2), kind="zero")], ids=["noise", "mean", "zero"])
def test_patching_with_a_corruption_equals_naive_and_matches_a_trace(wrapped, spec):
    """A corrupted run made by a corruption: the engine equals the naive procedure, and the
    corrupted run's KL to the clean run is what a trace with the corruption applied by hand
    gives (replace or add at the subject's embeddings)."""
    options = dict(component="mlp", over=("layer", "position"), layers=[0, 12], metric="kl")
    engine = wrapped.patching_sweep(EIFFEL, spec, **options)
    naive = wrapped.patching_sweep(EIFFEL, spec, naive=True, **options)
    assert_same_recoveries(engine, naive)
    positions = engine.corruption["positions"]
    assert positions == ([0, 1, 2, 3] if isinstance(spec.subject, str) else [1, 2])
    ids = mx.array([wrapped.encode(EIFFEL)])
    clean = wrapped.model(ids)[0, -1]
    mean, std = embedding_statistics(wrapped)
    subject = np.zeros((ids.shape[1], 1), dtype=bool)
    subject[positions] = True
    for pair in range(len(engine.clean)):
        if isinstance(spec, Noise):  # the paper's noise, drawn here as embedding_noise documents
            draws = np.random.default_rng(spec.seed).standard_normal(
                (spec.samples, len(positions), mean.size))
            added = np.zeros((ids.shape[1], mean.size), dtype=np.float32)
            added[positions] = draws[pair] * 3 * std
            change = lambda x, a=added: x + mx.array(a)  # noqa: E731
        else:
            value = mx.array(np.zeros_like(mean) if spec.kind == "zero" else mean, dtype=mx.float32)
            change = lambda x, v=value: mx.where(mx.array(subject), v, x)  # noqa: E731
        with wrapped.trace(ids, interventions={"embed_tokens": change}) as trace:
            corrupted = trace.output[0, -1]
        p, q = (x - mx.logsumexp(x) for x in (clean, corrupted))
        kl = mx.sum(mx.exp(p) * (p - q)).item()
        assert engine.metric_values.corrupted[pair] == pytest.approx(kl, rel=1e-4)


@pytest.mark.kernels
@pytest.mark.filterwarnings("ignore::mlxterp.errors.NoisyBaselineWarning")
def test_attribution_with_a_corruption_converges_to_the_exact_effect_as_the_noise_shrinks(wrapped):
    """AtP is the first-order term, so under noise of sd s its error at the first block's input
    shrinks with s (measured: 36.9 pp at s=5e-3, 9.4 at 1e-3, 2.3 at 2e-4). An AtP that applied the corruption
    differently from the exact engine would not converge to it."""
    options = dict(component="input", over=("layer", "position"), layers=[0], metric="logit_diff",
                   answer=" Paris", wrong_answer=" London")
    errors = []
    for scale in (5e-3, 1e-3, 2e-4):
        spec = Noise(SUBJECT_EIFFEL, samples=1, scale=scale)
        exact = wrapped.patching_sweep(EIFFEL, spec, **options)
        estimate = wrapped.attribution_patching(EIFFEL, spec, **options)
        assert estimate.sites == exact.sites
        errors.append(np.abs(estimate.mean - exact.mean).max())
    # Each scale is 5x smaller: the error shrinks with it. (At 2e-4 the float32 noise floor of
    # the recoveries is up to 3.6 pp, NoisyBaselineWarning, below the 9 pp measured at 1e-3.)
    assert errors[0] > 2 * errors[1] and errors[1] > errors[2], errors


def test_figure_has_three_panels_with_the_subject_marked(traces, tmp_path):
    results = [traces[kind] for kind in KINDS]
    fig = plot_causal_trace(results, tmp_path / "trace.svg")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["hidden", "mlp (window 10)", "attn (window 10)"]
    labels = panels[0].get_yticklabels()
    assert [t.get_text() for t in labels] == ["The *", "\u2423iPhone *", "\u2423is", "\u2423made", "\u2423by"]
    assert [t.get_color() for t in labels][:2] == ["#c53030"] * 2 and labels[2].get_color() != "#c53030"
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # inside the canvas
    assert "' Apple'" in fig._suptitle.get_text() and (tmp_path / "trace.svg").exists()


def test_result_round_trips_with_its_windows_and_corruption(traces):
    result = traces["attn"]
    back = PatchingResult.from_json(result.to_json())
    assert back.sites == result.sites and back.corruption == result.corruption
    np.testing.assert_array_equal(back.effect, result.effect)
    assert site_at(back.sites[0]["location"]) == SiteGroup(tuple(Site(p["module"], positions=(0,))
                                                         for p in result.sites[0]["location"]["parts"]))


@pytest.mark.slow
def test_cli_trace_fact_writes_the_figure_and_three_results(tmp_path, capsys):
    code = cli.main(["trace-fact", PROMPT, "--subject", SUBJECT, "--samples", "1", "--out",
                     str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "P(' Apple'): clean" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "trace-fact-smollm2-135m-attn.json", "trace-fact-smollm2-135m-hidden.json",
        "trace-fact-smollm2-135m-mlp.json", "trace-fact-smollm2-135m.png"]
    saved = json.loads((tmp_path / "trace-fact-smollm2-135m-mlp.json").read_text())
    assert saved["metric"] == "prob" and saved["corruption"]["positions"] == [0, 1]


def test_bad_input(wrapped):
    before = parameters_snapshot(wrapped.model)
    with pytest.raises(InputError, match="occurs 0 times"):
        wrapped.causal_trace(PROMPT, "Android")
    with pytest.raises(InputError, match="occurs 2 times"):
        wrapped.causal_trace("Paris is Paris and the capital of", "Paris")
    with pytest.raises(InputError, match=r"token boundaries: the tokens that cover it are \[' iPhone'\]"):
        wrapped.causal_trace(PROMPT, "iPho")
    with pytest.raises(InputError, match="is 2 tokens"):
        wrapped.causal_trace(PROMPT, SUBJECT, answer=" Apple Inc")
    with pytest.raises(BaselineError, match="adds nothing"):
        wrapped.causal_trace(PROMPT, Noise(SUBJECT, scale=0))
    with pytest.raises(InputError, match="window=31: give a number of layers from 1 to 30"):
        wrapped.causal_trace(PROMPT, SUBJECT, kind="mlp", window=31)
    with pytest.raises(InputTypeError, match="samples=0"):
        wrapped.causal_trace(PROMPT, Noise(SUBJECT, samples=0))
    with pytest.raises(InputError, match="kind='mpl'"):
        wrapped.causal_trace(PROMPT, SUBJECT, kind="mpl")
    with pytest.raises(InputError, match="out of range"):
        wrapped.patching_sweep(PROMPT, Ablate((7,)))
    with pytest.raises(InputError, match="applies to one clean prompt"):
        wrapped.patching_sweep([PROMPT, PROMPT], Noise(SUBJECT))
    assert_model_untouched(wrapped.model, before)
    assert subject_positions(wrapped, PROMPT, SUBJECT) == (0, 1)


@pytest.mark.slow
def test_the_facts_are_well_formed_and_mostly_known(wrapped):
    """tests/fixtures/facts.json (scripts/causal_tracing_study.py reads it): every subject maps
    to token positions, every answer is one token, and SmolLM2 answers at least 40 correctly
    (75 of 88 when written)."""
    facts = json.loads((Path(__file__).parent / "fixtures" / "facts.json").read_text())
    correct = 0
    for fact in facts:
        positions = subject_positions(wrapped, fact["prompt"], fact["subject"])
        assert positions == tuple(range(positions[0], positions[-1] + 1))
        (answer,) = wrapped.tokenizer.encode(fact["answer"], add_special_tokens=False)
        logits = wrapped.model(mx.array([wrapped.encode(fact["prompt"])]))[0, -1]
        correct += int(mx.argmax(logits).item()) == answer
    assert len(facts) >= 40 and correct >= 40


@pytest.mark.slow
def test_facts_trace_each_as_alone(wrapped):
    facts = [Fact(PROMPT, Noise(SUBJECT, samples=1), ANSWER),
             {"prompt": "The Eiffel Tower is located in the city of",
              "subject": Noise("The Eiffel Tower", samples=1)}]
    results = wrapped.causal_trace(pairs=facts, max_batch=64)
    alone = wrapped.causal_trace(PROMPT, Noise(SUBJECT, samples=1), answer=ANSWER)
    assert len(results) == 2 and results[0].labels == alone.labels
    # One fact through the same engine and layout as alone: equal to the float32 noise it reports.
    np.testing.assert_allclose(results[0].mean, alone.mean, atol=float(alone.noise.max()))
    assert results[1].clean[0].startswith("The Eiffel Tower")
    with pytest.raises(InputError, match=r"causal_trace .* does not use metric"):
        wrapped.causal_trace(PROMPT, SUBJECT, metric="kl")
    with pytest.raises(InputError, match="facts carry their own answers"):
        wrapped.causal_trace(pairs=facts, answer=ANSWER)
    with pytest.raises(InputTypeError, match="give a Fact, a dict or a tuple"):
        wrapped.causal_trace(pairs=[3])


def test_token_classes_follow_the_paper():
    classes = token_classes((1, 2, 3), 8)  # a BOS, a three-token subject, four more tokens
    assert classes == {"first subject token": [1], "middle subject tokens": [2], "last subject token": [3],
                       "first subsequent token": [4], "further tokens": [5, 6], "last token": [7]}
    one = token_classes((0,), 2)  # a one-token subject right before the last token
    assert one["first subject token"] == one["last subject token"] == [0] and one["further tokens"] == []


@pytest.mark.slow
def test_the_summary_over_facts_averages_each_class_as_computed_by_hand(wrapped, tmp_path):
    facts = [Fact(PROMPT, Noise(SUBJECT, samples=2), ANSWER),
             Fact("The Eiffel Tower is located in the city of", Noise("The Eiffel Tower", samples=2))]
    results = wrapped.causal_trace(pairs=facts, kind="hidden")
    summary = token_class_summary(results)
    assert summary.classes == list(TOKEN_CLASSES) and summary.samples == 2 and len(summary.prompts) == 2
    for f, result in enumerate(results):  # by hand: the effect at each class's positions, averaged
        effect = result.effect.mean(axis=0).reshape(len(summary.layers), len(result.tokens[0]))
        classes = token_classes(result.corruption["positions"], effect.shape[1])
        for c, positions in enumerate(classes.values()):
            expected = effect[:, positions].mean(axis=1) if positions else np.full(effect.shape[0], np.nan)
            np.testing.assert_array_equal(summary.effect[f, c], expected)
    low, high = summary.interval()
    finite = np.isfinite(summary.mean)
    assert np.all(low[finite] <= summary.mean[finite] + 1e-12)
    assert np.all(summary.mean[finite] <= high[finite] + 1e-12)
    again = TokenClassSummary.from_json(summary.to_json())
    np.testing.assert_array_equal(again.effect, summary.effect)
    fig = plot_token_classes([summary], tmp_path / "facts.png")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "first subject token (2)"
    with pytest.raises(InputError, match="summarises causal traces"):
        token_class_summary([wrapped.patching_sweep("The capital of France is", "The capital of Italy is")])


def test_answered_facts_keep_what_the_model_knows(wrapped):
    facts = [Fact("The capital of France is", "France", " Paris"),
             Fact("The capital of France is", "France", " Rome")]
    assert answered_facts(wrapped, facts) == facts[:1]
    with pytest.raises(InputError, match="has no answer"):
        answered_facts(wrapped, [Fact("The capital of France is", "France")])
