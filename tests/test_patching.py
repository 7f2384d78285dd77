"""Activation patching: the engine equals the naive one-forward-per-site procedure, and bad
input is refused clearly."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mlxterp.errors import BaselineError, InputError, MetricError, NotReachedError, SiteError
from mlxterp.experiments.pipeline.plan import Plan
from mlxterp.experiments.pipeline.results import PatchingResult
from mlxterp.tracing import Site

PARIS = ("Paris is the capital of France", "London is the capital of France")
NAMES = ("When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to")


def total_abs_sum(logits: mx.array, reference: mx.array) -> mx.array:
    """A user metric: batched L1 distance."""
    return mx.sum(mx.abs(logits - reference), axis=-1)


def assert_same_recovery(ours, reference) -> None:
    """Recoveries agree to 0.01 percentage points, or to the float32 noise each result reports
    beside each recovery where that is larger (`SweepValues.recovery_noise`: batch layouts and
    BLAS kernels move logits by up to ~1.6e-6 of max |logit|, scripts/measure_noise_floor.py)."""
    tolerance = np.maximum(0.01, np.maximum(ours.noise, reference.noise))
    difference = np.abs(ours.recovery - reference.recovery)
    assert np.all(difference <= tolerance), (difference.max(), tolerance[difference > tolerance])


def assert_same_values(ours, reference) -> None:
    """Raw metric values agree to the float32 noise both runs report for them."""
    for name in ("clean", "corrupted", "patched"):
        tolerance = getattr(ours, f"{name}_noise") + getattr(reference, f"{name}_noise")
        difference = np.abs(getattr(ours, name) - getattr(reference, name))
        assert np.all(difference <= tolerance), (name, difference.max())


CASES = {
    # id: (prompts, sweep options)
    "layer-mlp-l2": (PARIS, dict(component="mlp", layers=[0, 9, 14, 29])),
    "layer-mlp-cosine-noise": (PARIS, dict(component="mlp", layers=[0, 14, 29], metric="cosine",
                                           direction="noise")),
    "layer-down_proj-mse": (PARIS, dict(component="mlp.down_proj", layers=[1, 20], metric="mse")),
    "layer-q_proj-user-metric": (PARIS, dict(component="self_attn.q_proj", layers=[2, 28],
                                             metric=total_abs_sum)),
    "layer-position-input-kl": (NAMES, dict(component="input", over=("layer", "position"),
                                            layers=[0, 12, 29], positions=[0, 3, 5, 13],
                                            metric="kl")),
    "layer-position-mlp-kl-noise": (NAMES, dict(component="mlp", over=("layer", "position"),
                                                layers=[4, 20], positions=[1, 13], metric="kl",
                                                direction="noise")),
    "layer-head-logit-diff": (NAMES, dict(component="self_attn", over=("layer", "head"),
                                          layers=[16, 23, 29], heads=[0, 1, 3], metric="logit_diff",
                                          answer=" Mary", wrong_answer=" John")),
    "layer-kv-head-position-l2-noise": (NAMES, dict(component="self_attn.v_proj",
                                                    over=("layer", "head", "position"), layers=[3, 23],
                                                    positions=[2, 13], direction="noise")),
    "layer-output-l2": (PARIS, dict(component="output", layers=[0, 15, 29])),
    "measured-position-2": (PARIS, dict(component="self_attn", layers=[0, 1], position=2, metric="kl")),
}


@pytest.mark.kernels
@pytest.mark.parametrize("case", CASES)
def test_engine_equals_naive(wrapped, case):
    (clean, corrupted), options = CASES[case]
    engine = wrapped.patching_sweep(clean, corrupted, **options)
    naive = wrapped.patching_sweep(clean, corrupted, naive=True, **options)
    assert engine.sites == naive.sites
    assert np.all(np.isfinite(engine.recovery))
    assert_same_recovery(engine, naive)
    assert_same_values(engine.metric_values, naive.metric_values)
    # the noise estimate is small enough to say something: a fraction of a point
    assert engine.noise.max() < 0.5
    # something was patched: not every site left the corrupted run as it was
    assert np.abs(engine.recovery).max() > 0.1


@pytest.mark.kernels
def test_several_pairs_give_per_pair_and_mean(wrapped):
    clean = [PARIS[0], "Rome is the capital of Italy"]
    corrupted = [PARIS[1], "Paris is the capital of Italy"]
    both = wrapped.patching_sweep(clean, corrupted, layers=[0, 5], metric="kl")
    single = wrapped.patching_sweep(clean[1], corrupted[1], layers=[0, 5], metric="kl")
    assert both.recovery.shape == (2, 2)
    np.testing.assert_allclose(both.recovery[1], single.recovery[0],
                               atol=max(0.01, both.noise[1].max() + single.noise.max()))
    # the normalised mean: the pairs' recoveries weighted by their baselines
    np.testing.assert_allclose(both.mean, np.average(both.recovery, axis=0, weights=both.baseline))


@pytest.mark.kernels
def test_output_component_recovers_everything(wrapped):
    result = wrapped.patching_sweep(*PARIS, component="output", layers=[29])
    # The patched row holds the donor's last residual stream, computed in another batch row:
    # equal up to float32 noise, not bit for bit.
    assert abs(result.recovery[0, 0] - 100) <= result.noise[0, 0]
    assert sorted(wrapped.activation_patching(*PARIS, component="output")) == list(range(30))


def test_guide_quick_start(wrapped, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = wrapped.activation_patching(clean_text=PARIS[0], corrupted_text=PARIS[1],
                                          component="mlp", plot=True)
    sorted_results = sorted(results.items(), key=lambda x: x[1], reverse=True)
    lines = [f"  Layer {layer_idx}: {recovery:.1f}% recovery" for layer_idx, recovery in sorted_results[:3]]
    assert len(lines) == 3 and all(math.isfinite(r) for r in results.values())
    assert list(tmp_path.glob("*.png"))  # a script saves the plot instead of blocking
    assert "plot saved to" in capsys.readouterr().out
    for metric in ("l2", "mse", "cosine"):
        assert len(wrapped.activation_patching(*PARIS, metric=metric, layers=[3])) == 1


def test_result_round_trips_and_tables(wrapped):
    result = wrapped.patching_sweep(*NAMES, component="input", over=("layer", "position"),
                                    layers=[0, 1], positions=[0, 13], metric="kl")
    again = PatchingResult.from_json(result.to_json())
    np.testing.assert_array_equal(again.recovery, result.recovery)
    assert again.sites == result.sites and again.tokens == result.tokens
    frame = result.to_dataframe()
    assert list(frame.columns) == ["pair", "clean", "corrupted", "layer", "position", "recovery",
                                   "token", "corrupted_token", "noise"]
    assert frame.loc[frame.position == 13, "token"].iloc[0] == " to"
    assert result.grid().shape == (2, 2)
    label, value = result.top(1)[0]
    assert value == result.mean.max() and label.startswith("L")


def test_explicit_sites(wrapped):
    sites = [Site("model.model.layers.3.mlp", positions=(5,)),
             Site("model.model.layers.3.self_attn.o_proj", is_input=True, head=2, n_heads=9)]
    engine = wrapped.patching_sweep(*PARIS, sites=sites, metric="kl")
    naive = wrapped.patching_sweep(*PARIS, sites=sites, metric="kl", naive=True)
    assert_same_recovery(engine, naive)
    assert engine.labels == [{"layer": 3, "component": "mlp", "position": 5},
                            {"layer": 3, "component": "self_attn.o_proj:input", "head": 2}]


@pytest.mark.kernels
def test_chunking_gives_the_same_numbers(wrapped):
    whole = wrapped.patching_sweep(*PARIS, layers=[0, 3, 7, 20, 29], metric="kl")
    chunked = wrapped.patching_sweep(*PARIS, layers=[0, 3, 7, 20, 29], metric="kl", max_batch=2)
    assert_same_recovery(whole, chunked)


@pytest.mark.kernels
@pytest.mark.parametrize("metric", ["kl", pytest.param("logit_diff", marks=pytest.mark.slow)])
def test_a_result_does_not_depend_on_batching(wrapped, metric):
    """The same site gives the same recovery swept alone, in a chunk of three, one row per
    forward, and in the full sweep; the engine's clean and corrupted values equal plain
    single-row forwards (the naive runner's) to their reported noise."""
    options = dict(component="input", over=("layer", "position"), metric=metric,
                   answer=" Mary", wrong_answer=" John") if metric == "logit_diff" else dict(
                   component="input", over=("layer", "position"), metric=metric)
    full = wrapped.patching_sweep(*NAMES, layers=[8, 12, 16], **options)
    site = full.labels.index({"layer": 12, "position": 5})
    for layout in (dict(layers=[12], positions=[5]), dict(layers=[12], positions=[4, 5, 6]),
                   dict(layers=[12], max_batch=1), dict(layers=[8, 12, 16], max_batch=5)):
        part = wrapped.patching_sweep(*NAMES, **options, **layout)
        here = part.labels.index({"layer": 12, "position": 5})
        tolerance = max(0.01, full.noise[0, site] + part.noise[0, here])
        assert abs(part.recovery[0, here] - full.recovery[0, site]) <= tolerance
    single = wrapped.patching_sweep(*NAMES, **options, layers=[12], positions=[5], naive=True)
    values, reference = full.metric_values, single.metric_values
    for name in ("clean", "corrupted"):
        tolerance = getattr(values, f"{name}_noise") + getattr(reference, f"{name}_noise")
        assert np.all(np.abs(getattr(values, name) - getattr(reference, name)) <= tolerance)


def test_bad_input(wrapped):
    with pytest.raises(InputError, match=r"(?s)same number of tokens.*'Paris'.*Patching compares"):
        wrapped.patching_sweep("Paris is the capital of France", "The city of London is the capital")
    with pytest.raises(InputError, match="non-empty"):
        wrapped.patching_sweep("", "")
    with pytest.raises(SiteError, match="valid layers are 0 to 29"):
        wrapped.patching_sweep(*PARIS, layers=[30])
    with pytest.raises(SiteError, match="valid positions are 0 to 5"):
        wrapped.patching_sweep(*PARIS, over=("layer", "position"), positions=[6])
    with pytest.raises(SiteError, match="valid heads are 0 to 8"):
        wrapped.patching_sweep(*PARIS, component="self_attn", over=("layer", "head"), heads=[9])
    with pytest.raises(SiteError, match="valid heads are 0 to 2"):  # GQA: 3 key/value heads
        wrapped.patching_sweep(*PARIS, component="self_attn.k_proj", over=("layer", "head"), heads=[3])
    with pytest.raises(SiteError, match="unknown component 'mpl'.*'mlp'"):
        wrapped.patching_sweep(*PARIS, component="mpl")
    with pytest.raises(SiteError, match="heads apply to attention"):
        wrapped.patching_sweep(*PARIS, component="mlp", over=("layer", "head"))
    with pytest.raises(MetricError, match="unknown metric 'l3'"):
        wrapped.patching_sweep(*PARIS, metric="l3")
    with pytest.raises(MetricError, match="takes answer= and wrong_answer="):
        wrapped.patching_sweep(*PARIS, metric="logit_diff")
    with pytest.raises(InputError, match="must be one token"):
        wrapped.patching_sweep(*PARIS, metric="logit_diff", answer=" Parisians", wrong_answer=" London")
    with pytest.raises(BaselineError, match="same tokens"):
        wrapped.patching_sweep(PARIS[0], PARIS[0])
    with pytest.raises(BaselineError, match="same tokens"):
        wrapped.patching_sweep(PARIS[0], PARIS[0], naive=True)
    with pytest.raises(BaselineError, match="pair 1: .*same tokens"):
        wrapped.patching_sweep([PARIS[0]] * 2, [PARIS[1], PARIS[0]])
    with pytest.raises(BaselineError, match="same tokens"):
        wrapped.activation_patching(PARIS[0], PARIS[0])
    with pytest.raises(InputError, match="position 6 is out of range"):
        wrapped.patching_sweep(*PARIS, position=6)


def test_a_patch_that_never_runs_is_an_error():
    import mlx.nn as nn
    from conftest import tiny_model

    from mlxterp import InterpretableModel
    from mlxterp.experiments.pipeline.metrics import METRICS
    from mlxterp.experiments.runners.engine import run_engine
    from mlxterp.experiments.runners.naive import run_naive

    base = tiny_model("llama")
    base.model.layers[1].unused = nn.Linear(32, 32)  # exists, never called
    model = InterpretableModel(base)
    site = Site("model.model.layers.1.unused")
    clean, corrupted = mx.array([[1, 2, 3]]), mx.array([[4, 2, 3]])
    plan = Plan(clean, corrupted, (site,), METRICS["l2"], position=2)
    with pytest.raises(NotReachedError, match="never reached"):
        run_engine(model, plan)
    with pytest.raises(NotReachedError, match="never reached"):
        run_naive(model, plan)


@pytest.mark.kernels
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2", "ministral3", "gptj"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_engine_equals_naive_across_families(family, direction):
    """Families whose blocks take other arguments (ministral3's attn_scale), take them by
    keyword (gptj), or use sliding-window masks (gemma3_text): the engine still agrees."""
    from conftest import tiny_model

    from mlxterp import InterpretableModel
    from mlxterp.experiments.pipeline.metrics import METRICS
    from mlxterp.experiments.pipeline.sites import sweep_sites
    from mlxterp.experiments.runners.engine import run_engine
    from mlxterp.experiments.runners.naive import run_naive

    model = InterpretableModel(tiny_model(family, seed=3))
    # Two pairs that first differ at positions 2 and 4, so rows start at several positions.
    clean = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 20, 10, 11, 12, 13, 14]])
    corrupted = mx.array([[5, 6, 30, 8, 9, 10, 11, 12, 13, 14], [5, 6, 7, 8, 40, 10, 11, 12, 13, 3]])
    n_layers = len(model.layers)
    for over, position in ((("layer",), 9), (("layer", "position"), 7)):
        sites, _ = sweep_sites(model, "input", over, 10, layers=[0, n_layers - 1],
                               positions=[0, 3, 5, 9] if "position" in over else None)
        plan = Plan(clean, corrupted, tuple(sites), METRICS["kl"], direction, position)
        engine, naive = run_engine(model, plan, max_batch=3), run_naive(model, plan)
        assert_same_values(engine, naive)
        receiver = naive.corrupted if direction == "denoise" else naive.clean
        assert np.abs(naive.patched - receiver[:, None]).max() > 1e-3 * np.abs(naive.gap(direction)).max()


def test_sites_and_options_are_checked(wrapped):
    site = Site("layers.3.mlp")  # a short key resolves
    assert wrapped.patching_sweep(*PARIS, sites=[site], metric="kl").labels == [
        {"layer": 3, "component": "mlp"}]
    assert wrapped.patching_sweep(*PARIS, sites=["layers.3", "layers.4:input"], metric="kl").labels == [
        {"layer": 3, "component": "output"}, {"layer": 4, "component": "input"}]
    for bad, message in (("model.model.norm", "not inside a block"),
                         ("layers.3.mlp#1", "drop the #k"),
                         ("layers.3.mpl", "Closest names"),
                         (3, "list of Site or activation keys")):
        with pytest.raises(Exception, match=message):
            wrapped.patching_sweep(*PARIS, sites=[bad])
    with pytest.raises(SiteError, match="same thing"):
        wrapped.patching_sweep(*PARIS, sites=[site, "model.model.layers.3.mlp"])
    with pytest.raises(SiteError, match="positions is empty"):
        Site("layers.3.mlp", positions=())
    with pytest.raises(InputError, match="does not sweep over positions"):
        wrapped.patching_sweep(*PARIS, positions=[3])
    with pytest.raises(InputError, match="sweep over one of"):
        wrapped.patching_sweep(*PARIS, over=("position", "layer"))
    with pytest.raises(MetricError, match="apply to metrics"):
        wrapped.patching_sweep(*PARIS, metric="kl", answer=" Paris")
    with pytest.raises(InputError, match="direction=.sideways."):
        wrapped.patching_sweep(*PARIS, direction="sideways")
    with pytest.raises(InputError, match="max_batch=0"):
        wrapped.patching_sweep(*PARIS, max_batch=0)
    for naive in (False, True):  # rope is called twice per block (queries, keys) on 4-d arrays
        with pytest.raises(SiteError, match="called more than once|patch sites must be"):
            wrapped.patching_sweep(*PARIS, component="self_attn.rope", layers=[2], naive=naive)


@pytest.mark.kernels
def test_noising_recovery_moves_toward_the_corrupted_run(wrapped):
    """Recovery means the same in both directions: how far the patch moves the receiving run
    toward the donor's output. Checked by hand from traces for logit difference and KL."""
    from mlxterp import interventions as iv
    from mlxterp.experiments.pipeline.metrics import METRICS

    site, position = "layers.5", 9  # the residual stream leaving block 5, at ' John' / ' Mary'
    with wrapped.trace(NAMES[1]) as trace:
        corrupted_act, corrupted = trace.activations[site], trace.output[0, -1]
    with wrapped.trace(NAMES[0]) as trace:
        clean = trace.output[0, -1]
    patch = {site: iv.replace_with(corrupted_act, positions=[position])}
    with wrapped.trace(NAMES[0], interventions=patch):
        patched = wrapped.output.save()[0, -1]
    mary, john = wrapped.encode(" Mary")[0], wrapped.encode(" John")[0]
    ld = {name: (x[mary] - x[john]).item() for name, x in
          (("clean", clean), ("corrupted", corrupted), ("patched", patched))}
    kl = {name: METRICS["kl"].fn(x[None], corrupted)[0].item() for name, x in
          (("clean", clean), ("patched", patched))}
    expected = {"logit_diff": (ld["patched"] - ld["clean"]) / (ld["corrupted"] - ld["clean"]) * 100,
                "kl": (kl["clean"] - kl["patched"]) / kl["clean"] * 100}
    for metric, value in expected.items():
        answers = dict(answer=" Mary", wrong_answer=" John") if metric == "logit_diff" else {}
        result = wrapped.patching_sweep(*NAMES, component="output", over=("layer", "position"),
                                        layers=[5], direction="noise", metric=metric, **answers)
        at = result.labels.index({"layer": 5, "position": position})
        assert abs(result.recovery[0, at] - value) <= max(0.01, 2 * result.noise[0, at])
        # the token that names the other person carries the corruption: ranked first, far up
        label, best = result.top(1)[0]
        assert label.startswith(f"L5 pos {position}") and best == result.mean.max() > 50
        # a position where the prompts agree moves nothing
        assert abs(result.recovery[0, 0]) <= max(0.01, result.noise[0, 0])


@pytest.mark.kernels
@pytest.mark.parametrize("cores", [2, 3, 7])
def test_measuring_in_parts_per_core_gives_each_row_what_one_part_gives(monkeypatch, cores):
    """On a CPU, `measure` splits the rows over one stream per core; each row's value and noise
    come from that row, the reference and the same draws alone. Measured equal bit for bit here;
    asserted to 1e-6 relative, since a reduction's kernel may treat a part's shape differently."""
    from mlxterp.experiments.pipeline import metrics

    rows = 5 * mx.random.normal((9, 4096), key=mx.random.key(1))
    reference = 5 * mx.random.normal((4096,), key=mx.random.key(2))
    for metric in (metrics.METRICS["kl"], metrics.METRICS["cosine"], metrics.logit_diff(3, 4)):
        monkeypatch.setattr(metrics, "available_cores", lambda: 1)
        whole = metrics.measure(metric, rows, reference)
        monkeypatch.setattr(metrics, "available_cores", lambda cores=cores: cores)
        assert len(metrics._parts(9)) == (cores if mx.default_device() == mx.cpu else 1)
        for single, split in zip(whole, metrics.measure(metric, rows, reference), strict=True):
            np.testing.assert_allclose(split, single, rtol=1e-6, atol=1e-12)
        assert np.all(whole[1] > 0)  # every row has a noise bound


def _kl64(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(row)) per row, in float64 (numpy, not MLX)."""
    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    log_p, log_q = log_softmax(reference), log_softmax(rows)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def test_kl_noise_from_derivatives_bounds_the_perturbations_it_stands_for():
    """KL's noise comes from its derivatives in one pass (five evaluations per row before). Checked
    in float64 against the perturbations themselves: the aligned step along each row's difference
    from the reference, both signs, exactly; independent draws on row and reference, 64 of them,
    whose root mean square change the bound (2 standard deviations) must exceed 1.5-fold."""
    from mlxterp.experiments.pipeline import metrics

    vocabulary = 4096
    reference = 4 * mx.random.normal((vocabulary,), key=mx.random.key(3))
    rows = reference + mx.array([[0.0], [1e-3], [0.1], [1.0], [4.0]]) * mx.random.normal(
        (5, vocabulary), key=mx.random.key(4))  # the reference itself, then further and further
    rows = mx.concatenate([rows, 4 * mx.random.normal((1, vocabulary), key=mx.random.key(5))])
    values, noise = metrics.measure(metrics.METRICS["kl"], rows, reference)
    x, r = np.array(rows, dtype=np.float64), np.array(reference, dtype=np.float64)
    # MLX's float32 sum of 4,096 exponentials is off by up to 8.5e-6 relative here (1e-4 at
    # 49,152; measured against float64), and KL inherits it through the normalisers.
    np.testing.assert_allclose(values, _kl64(x, r), rtol=5e-5, atol=2e-6)
    scale = np.abs(r).max() * metrics.LOGIT_NOISE
    direction = (x - r) / np.maximum(np.linalg.norm(x - r, axis=-1, keepdims=True), 1e-30)
    for sign in (1, -1):
        moved = np.abs(_kl64(x + sign * scale * vocabulary ** 0.5 * direction, r) - _kl64(x, r))
        assert np.all(moved <= noise), (moved / noise).max()
    draws = np.random.default_rng(0).normal(scale=scale, size=(64, 2, vocabulary))
    changes = np.stack([_kl64(x + row_noise, r + reference_noise) - _kl64(x, r)
                        for row_noise, reference_noise in draws])
    assert np.all(1.5 * np.sqrt(np.mean(changes ** 2, axis=0)) <= noise)


def test_kl_noise_bounds_what_five_evaluations_per_row_measured(wrapped):
    """On SmolLM2's rows of a sweep, the derivative bound is at least the perturbation noise it
    replaced, row by row, and at most 15x it (the largest, 11x, at the clean row itself, where
    the bound is the rounding of the normaliser's sum, 2e-6)."""
    from mlxterp.experiments.pipeline import metrics
    from mlxterp.experiments.pipeline.options import SweepOptions
    from mlxterp.experiments.pipeline.sweep import prepare_sweeps
    from mlxterp.experiments.runners.engine import _BatchedForward

    plan = prepare_sweeps(wrapped, *NAMES, SweepOptions(metric="kl", component="mlp"))[0].plan
    forward = _BatchedForward(wrapped, plan, 0, list(plan.sites), "grow")
    logits = forward.run()
    rows = logits[mx.array([0, 1, *(forward.index[i] for i in range(len(plan.sites)))])]
    derived = metrics.measure(metrics.METRICS["kl"], rows, logits[plan.donor])
    perturbed = metrics.measure(metrics.Metric("kl", metrics.METRICS["kl"].fn), rows, logits[plan.donor])
    np.testing.assert_array_equal(derived[0], perturbed[0])
    assert np.all(derived[1] >= 0.99 * perturbed[1]) and np.all(derived[1] <= 15 * perturbed[1])


@pytest.mark.slow  # over 15 s here: CI's slow round runs it
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_metrics_stay_finite_on_a_262k_vocabulary_in_half_precision(dtype):
    """The guide's L2 overflows and its KL gives NaN only when computed in half precision;
    mlxterp's metrics are float32 whatever the model's dtype (Gemma 3, 262,144 tokens)."""
    from conftest import bundled

    from mlxterp import InterpretableModel

    base, tokenizer = bundled("gemma3-270m")  # float32 from the cache, then cast
    base.set_dtype(getattr(mx, dtype))
    model = InterpretableModel(base, tokenizer)
    with model.trace(PARIS[0]) as trace:
        clean = trace.output[0, -1]
    with model.trace(PARIS[1]) as trace:
        corrupted = trace.output[0, -1]
    assert clean.dtype == getattr(mx, dtype) and clean.shape == (262144,)
    if dtype == "float16":  # the guide's formulas in the model's dtype
        assert math.isinf(mx.sum((corrupted - clean) ** 2).item())
        assert math.isnan(mx.sum(mx.softmax(clean) * (mx.log(mx.softmax(clean))
                                                    - mx.log(mx.softmax(corrupted)))).item())
    for metric in ("l2", "cosine", "mse", "kl"):
        result = model.patching_sweep(*PARIS, component="mlp", layers=[0, 17], metric=metric)
        assert np.all(np.isfinite(result.recovery)) and np.all(np.isfinite(result.baseline))
        assert result.baseline[0] > 0


def test_token_ids_are_accepted_as_traces_accept_them(wrapped):
    text = wrapped.patching_sweep(*PARIS, layers=[0, 5], metric="kl")
    ids = [wrapped.encode(prompt) for prompt in PARIS]
    for clean, corrupted in ((ids[0], ids[1]), ([ids[0]], [ids[1]]), (mx.array(ids[0]), mx.array(ids[1])),
                             (np.array([ids[0]]), np.array([ids[1]]))):
        result = wrapped.patching_sweep(clean, corrupted, layers=[0, 5], metric="kl")
        np.testing.assert_array_equal(result.recovery, text.recovery)  # the same tokens, the same batch
        assert result.clean == [PARIS[0]]
    with pytest.raises(InputError, match="whole numbers"):
        wrapped.patching_sweep([1.5, 2.0], [3, 4])
    with pytest.raises(InputError, match=r"token ids must lie in \[0, 49152\)"):
        wrapped.patching_sweep([1, 2], [3, 49152])
