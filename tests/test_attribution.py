"""Attribution patching: the gradient against finite differences, integrated gradients against
the exact patch, the estimates against the exact engine, and bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from mlxterp import InterpretableModel
from mlxterp.errors import GradientError, MetricError, NotReachedError
from mlxterp.experiments.analyses.attribution import verify_top
from mlxterp.experiments.pipeline.metrics import METRICS, logit_diff
from mlxterp.experiments.pipeline.plan import Plan
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.experiments.pipeline.sites import sweep_sites
from mlxterp.experiments.runners.gradient import run_gradient
from mlxterp.presentation.cli import main
from mlxterp.tracing import Site

NAMES = ("When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to")
MARY = dict(answer=" Mary", wrong_answer=" John")
CLEAN_IDS = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
CORRUPTED_IDS = mx.array([[5, 6, 30, 8, 9, 10, 11, 12]])


@pytest.mark.kernels
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("metric", [METRICS["kl"], logit_diff(3, 4), METRICS["l2"], METRICS["cosine"]],
                         ids=["kl", "logit_diff", "l2", "cosine"])
def test_atp_is_the_directional_derivative(family, metric):
    """Each site's AtP estimate equals the central finite difference of the metric along
    (a_donor - a_receiver) restricted to the site, to 1e-3 relative, in float64.

    The finite difference's own error is estimated from two step sizes (|D(h) - D(h/2)|: its
    truncation and rounding, which MLX's float32 kernels inside a float64 model keep near 1e-9
    per metric value); the tolerance adds twice that. Over these cases that estimate is below
    1e-3 relative for 85% of the sites, so the 1e-3 bound is what most sites are held to.
    """
    model = InterpretableModel(tiny_model(family, seed=1))
    model.model.set_dtype(mx.float64)
    for direction in ("denoise", "noise"):
        for component, over in (("mlp", ("layer",)), ("input", ("layer", "position")),
                                ("self_attn", ("layer", "head"))):
            sites, _ = sweep_sites(model, component, over, 8, layers=[0, len(model.layers) - 1])
            plan = Plan(CLEAN_IDS, CORRUPTED_IDS, tuple(sites), metric, direction)
            values = run_gradient(model, plan)
            receiver_value = (values.clean, values.corrupted)[plan.receiver][0]
            donor_tokens, receiver_tokens = (plan.tokens(0)[i:i + 1] for i in (plan.donor, plan.receiver))
            for i, site in enumerate(sites):
                with model.trace(donor_tokens) as trace:
                    donor, reference = trace.activations[site.key], trace.output[0, -1]
                with model.trace(receiver_tokens) as trace:
                    receiver = trace.activations[site.key]
                step = site.patch(receiver, donor) - receiver

                def metric_at(h, key=site.key, step=step, reference=reference, tokens=receiver_tokens):
                    with model.trace(tokens, interventions={key: lambda x: x + h * step}) as trace:
                        return metric.fn(trace.output[:, -1], reference)[0].item()

                h = 2e-2
                coarse = (metric_at(h) - metric_at(-h)) / (2 * h)
                fine = (metric_at(h / 2) - metric_at(-h / 2)) / h
                estimate = values.patched[0, i] - receiver_value
                assert abs(estimate - fine) <= 1e-3 * abs(fine) + 2 * abs(coarse - fine), (
                    family, metric.name, direction, component, i, estimate, fine)


@pytest.mark.slow
@pytest.mark.kernels
def test_integrated_gradients_converge_to_the_exact_patch(wrapped):
    """At the first block's input, IG's straight path is the patch itself, so the midpoint rule
    converges to the exact recovery (error falling about 16-fold for 4x the steps), while AtP's
    single gradient is far off where the metric curves."""
    exact = wrapped.patching_sweep(*NAMES, component="input", layers=[0], metric="logit_diff", **MARY)
    errors = {}
    for steps in (16, 64):
        ig = wrapped.attribution_patching(*NAMES, component="input", layers=[0], metric="logit_diff",
                                          method="ig", steps=steps, **MARY)
        errors[steps] = abs(ig.recovery[0, 0] - exact.recovery[0, 0])
    atp = wrapped.attribution_patching(*NAMES, component="input", layers=[0], metric="logit_diff", **MARY)
    assert errors[64] < 0.05 and errors[64] < errors[16] / 8
    assert abs(atp.recovery[0, 0] - exact.recovery[0, 0]) > 10  # measured: 32.6% against 100%


@pytest.mark.kernels
def test_estimates_track_the_exact_engine_and_say_they_are_estimates(wrapped, tmp_path):
    options = dict(component="self_attn", over=("layer", "head"), metric="logit_diff", **MARY)
    estimate = wrapped.attribution_patching(*NAMES, **options)
    exact = wrapped.patching_sweep(*NAMES, **options)
    assert estimate.sites == exact.sites and estimate.method == "atp" and exact.method == "exact"
    ranks = [np.argsort(np.argsort(r.mean)) for r in (estimate, exact)]
    assert np.corrcoef(*ranks)[0, 1] > 0.9  # measured Spearman 0.969 (docs/attribution.md)
    assert estimate.top(1)[0][0] == exact.top(1)[0][0] == "L23 H3"
    again = PatchingResult.from_json(estimate.to_json())
    assert again.method == "atp" and again.sites == estimate.sites
    fig = estimate.plot(tmp_path / "estimate.png")
    assert "Attribution patching (AtP) estimate" in fig.get_suptitle().replace("\n", " ")
    checked = verify_top(wrapped, estimate, 3)
    np.testing.assert_allclose(checked.mean, [exact.mean[exact.labels.index(s)] for s in
                                              [estimate.labels[i] for i in np.argsort(-estimate.mean)[:3]]],
                               atol=0.01 + checked.noise.max())


@pytest.mark.slow
def test_several_pairs_and_noising(wrapped):
    """A pair's estimate does not depend on the pairs beside it; noising estimates the same
    first-order quantity with the runs' roles swapped (against the exact engine: heads agree,
    Pearson 0.90 measured; MLP layer 0 is AtP's known failure, docs/attribution.md)."""
    clean = [NAMES[0], "When Anna and Tom went to the park, Tom gave a ball to"]
    corrupted = [NAMES[1], "When Tom and Anna went to the park, Anna gave a ball to"]
    both = wrapped.attribution_patching(clean, corrupted, component="mlp", metric="kl")
    alone = wrapped.attribution_patching(clean[1], corrupted[1], component="mlp", metric="kl")
    np.testing.assert_allclose(both.recovery[1], alone.recovery[0], atol=1e-6)
    # the normalised mean: the pairs' recoveries weighted by their baselines
    np.testing.assert_allclose(both.mean, np.average(both.recovery, axis=0, weights=both.baseline))
    options = dict(component="self_attn", over=("layer", "head"), metric="kl", direction="noise")
    noise = wrapped.attribution_patching(*NAMES, **options)
    exact = wrapped.patching_sweep(*NAMES, **options)
    assert noise.top(1)[0][0] == exact.top(1)[0][0] == "L23 H3"
    assert np.corrcoef(noise.mean, exact.mean)[0, 1] > 0.8


def test_cli_attribute_verifies_the_top_sites(tmp_path, capsys):
    args = ["attribute", *NAMES, "--component", "self_attn", "--over", "layer,head", "--metric",
            "logit_diff", "--answer", " Mary", "--wrong-answer", " John", "--verify", "3",
            "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "method: attribution patching (AtP)" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert [row[1:3] for row in rows] == [["L23", "H3"], ["L29", "H1"], ["L23", "H0"]]
    assert rows[0][3:] == ["36.3%", "57.8%"]  # estimate, exact
    saved = PatchingResult.from_json(tmp_path / "attribute-smollm2-135m-self_attn-layer-head-logit_diff.json")
    assert saved.method == "atp" and len(saved.sites) == 270


def test_bad_input(wrapped):
    def argmax_metric(logits, reference):
        return (mx.argmax(logits, axis=-1) == mx.argmax(reference)).astype(mx.float32)

    def numpy_metric(logits, reference):  # leaves MLX: no gradient reaches the model
        return mx.array(np.abs(np.array(logits) - np.array(reference)).sum(axis=-1))

    for metric in (argmax_metric, numpy_metric):
        with pytest.raises(MetricError, match="zero gradient at every site"):
            wrapped.attribution_patching(*NAMES, layers=[3, 4], metric=metric)
    with pytest.raises(Exception, match="method='exact'"):
        wrapped.attribution_patching(*NAMES, method="exact")
    with pytest.raises(Exception, match="steps=0"):
        wrapped.attribution_patching(*NAMES, method="ig", steps=0)


def test_a_site_the_gradient_never_reaches():
    import mlx.nn as nn

    base = tiny_model("llama")
    base.model.layers[1].unused = nn.Linear(32, 32)  # exists, never called
    model = InterpretableModel(base)
    plan = Plan(CLEAN_IDS, CORRUPTED_IDS, (Site("model.model.layers.1.unused"),), METRICS["kl"])
    with pytest.raises(NotReachedError, match="never reached"):
        run_gradient(model, plan)


def test_a_backward_pass_that_overflows_is_an_error():
    """float16 gradients overflow past 65,504: a metric scaled to 1e30 (finite in float32, where
    metrics are computed) sends inf back into a float16 model."""
    base = tiny_model("llama")
    base.set_dtype(mx.float16)
    model = InterpretableModel(base)
    huge = METRICS["l2"]
    plan = Plan(CLEAN_IDS, CORRUPTED_IDS, tuple(sweep_sites(model, "mlp", ("layer",), 8)[0]),
                type(huge)("huge", lambda logits, reference: huge.fn(logits, reference) * 1e30))
    with pytest.raises(GradientError, match="float16"):
        run_gradient(model, plan)


@pytest.mark.slow  # over 15 s here: CI's slow round runs it
def test_half_precision_on_a_262k_vocabulary():
    """Gemma 3 in bfloat16: metrics are float32, the backward stays finite, and the estimate
    ranks the layers as the float32 model's does at the top."""
    import mlxterp

    base, tokenizer = mlxterp.load("gemma3-270m")
    model = InterpretableModel(base, tokenizer)
    pair = ("Paris is the capital of France", "London is the capital of France")
    full = model.attribution_patching(*pair, component="mlp", metric="kl")
    base.set_dtype(mx.bfloat16)
    half = model.attribution_patching(*pair, component="mlp", metric="kl")
    assert np.all(np.isfinite(half.recovery))
    assert half.top(1)[0][0] == full.top(1)[0][0]
