"""The engine's two strategies: both equal the naive procedure, the cost model sees the calls
the engine really makes, and it picks FLAT where calls or shapes are dear (a GPU) and GROW where
arithmetic is (a CPU)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import hooked_calls, tiny_model
from test_patching import NAMES, assert_same_values

from mlxterp import InterpretableModel
from mlxterp.errors import InputError
from mlxterp.experiments.pipeline.metrics import METRICS
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.plan import Plan
from mlxterp.experiments.pipeline.sites import sweep_sites
from mlxterp.experiments.pipeline.sweep import prepare_sweeps
from mlxterp.experiments.runners import costs as costs_module
from mlxterp.experiments.runners import engine
from mlxterp.experiments.runners.costs import SHAPES_KEPT, BlockCosts, block_costs
from mlxterp.experiments.runners.engine import FLAT, GROW, run_engine
from mlxterp.experiments.runners.naive import run_naive

# Measured with costs.block_costs: SmolLM2 float32 on this project's 2-core CPU, and its shape in
# bfloat16 on an H200, where rows cost nothing measurable (bench/results/h200-2026-12-02/).
CPU_LIKE = BlockCosts(fixed=1.5e-3, per_position=7.8e-5, per_shape=3e-4)
GPU_LIKE = BlockCosts(fixed=3e-4, per_position=0.0, per_shape=0.04)


@pytest.mark.kernels
@pytest.mark.parametrize("sweep", [pytest.param(dict(component="mlp", over="layer", metric="kl"),
                                                marks=pytest.mark.slow),
                                   pytest.param(dict(component="input", over=("layer", "position"),
                                                     layers=[0, 14, 29], metric="kl"),
                                                marks=pytest.mark.slow),
                                   dict(component="self_attn", over=("layer", "head"), layers=[16, 23],
                                        metric="logit_diff", answer=" Mary", wrong_answer=" John")])
def test_flat_equals_naive(wrapped, sweep):
    plan = prepare_sweeps(wrapped, *NAMES, SweepOptions(**sweep))[0].plan
    flat, naive = run_engine(wrapped, plan, strategy=FLAT), run_naive(wrapped, plan)
    assert_same_values(flat, naive)
    assert np.abs(naive.patched - naive.corrupted[:, None]).max() > 0.01 * abs(naive.gap("denoise")[0])


@pytest.mark.kernels
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "gptj"])
def test_both_strategies_equal_naive_across_families(family):
    model = InterpretableModel(tiny_model(family, seed=3))
    clean = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    corrupted = mx.array([[5, 6, 30, 8, 9, 10, 11, 12, 13, 14]])
    sites, _ = sweep_sites(model, "input", ("layer", "position"), 10, positions=[0, 3, 5, 9])
    plan = Plan(clean, corrupted, tuple(sites), METRICS["kl"], "denoise", 9)
    naive = run_naive(model, plan)
    for strategy in (GROW, FLAT):
        assert_same_values(run_engine(model, plan, max_batch=5, strategy=strategy), naive)


def block_input_shapes(model: InterpretableModel, run) -> list[tuple[int, int]]:
    """(rows, positions) of every call of the model's blocks while `run()` runs."""
    blocks, shapes = set(model.tree.blocks), []

    def record(name, call, args, kwargs):
        if name in blocks:
            x = args[0] if args else next(iter(kwargs.values()))
            shapes.append(tuple(x.shape[:2]))
        return call(*args, **kwargs)

    with hooked_calls(model.model, record):
        run()
    return shapes


@pytest.mark.parametrize("strategy", [GROW, FLAT])
def test_the_cost_model_sees_the_calls_the_engine_makes(strategy):
    model = InterpretableModel(tiny_model("llama", seed=1, num_hidden_layers=4))
    clean = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    corrupted = mx.array([[5, 6, 30, 8, 9, 10, 11, 12]])
    sites, _ = sweep_sites(model, "input", ("layer", "position"), 8)
    plan = Plan(clean, corrupted, tuple(sites), METRICS["kl"], "denoise", 7)
    forward = engine._BatchedForward(model, plan, 0, list(sites), strategy)
    made = block_input_shapes(model, lambda: mx.eval(forward.run()))
    assert sorted(made) == sorted(forward.block_calls())


def test_flat_builds_at_most_two_shapes_whatever_the_sweep():
    """The cause of the 17 s bfloat16 sweep on CUDA: GROW's layer x position sweep of a 14-token
    pair made 391 distinct attention shapes, more than MLX's cache of cuDNN graphs holds, so every
    call rebuilt one (bench/bench_strategies.py). FLAT makes one shape per chunk size, and chunks
    are made equal, so at most two."""
    model = InterpretableModel(tiny_model("llama", seed=1, num_hidden_layers=6))
    clean = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    corrupted = mx.array([[5, 6, 30, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    sites, _ = sweep_sites(model, "input", ("layer", "position"), 14)  # 84 sites
    plan = Plan(clean, corrupted, tuple(sites), METRICS["kl"], "denoise", 13)
    for max_batch in (None, 10, 25):
        flat = block_input_shapes(model, lambda m=max_batch: run_engine(model, plan, m, strategy=FLAT))
        assert len(set(flat)) <= 2
    grow = block_input_shapes(model, lambda: run_engine(model, plan, strategy=GROW))
    assert len(set(grow)) > 30  # what the choice of strategy must weigh


def test_predict_counts_calls_and_shapes():
    costs = BlockCosts(fixed=1.0, per_position=0.5, per_shape=10.0)
    assert costs.predict([(2, 3), (2, 3), (1, 4)]) == 3 * 1.0 + 0.5 * (6 + 6 + 4) + 2 * 10.0


def test_a_shape_is_charged_until_built_and_while_the_backend_keeps_it():
    costs = BlockCosts(fixed=1.0, per_position=0.5, per_shape=10.0)
    calls = [(2, 3), (2, 3), (1, 4)]
    costs.record(calls)
    assert costs.predict(calls) == 3 * 1.0 + 0.5 * (6 + 6 + 4)  # built: no shape charged
    assert costs.predict([(5, 5)]) == 1.0 + 0.5 * 25 + 10.0  # a new shape is
    # More shapes than the back end keeps: each call evicts one the next needs, so all are charged.
    many = [(rows, 1) for rows in range(1, SHAPES_KEPT + 2)]
    costs.record(many)
    assert len(costs.built) == SHAPES_KEPT and (2, 3) not in costs.built  # the least recent went
    assert costs.predict(many) == sum(1.0 + 0.5 * rows for rows, _ in many) + 10.0 * len(many)


def test_the_chosen_strategys_shapes_are_recorded_as_built(wrapped, monkeypatch):
    costs = BlockCosts(fixed=3e-4, per_position=5e-6, per_shape=0.04)  # shapes dear, rows not free
    monkeypatch.setattr(engine, "block_costs", lambda model: costs)
    plan = prepare_sweeps(wrapped, *NAMES, SweepOptions(metric="kl", component="mlp", over="layer"))[0].plan
    forwards = both(wrapped, plan)
    assert engine.cheaper_strategy(wrapped, forwards) == FLAT
    assert set(costs.built) == set(forwards[FLAT][0].block_calls())
    costs.record(forwards[GROW][0].block_calls())  # as after a sweep run with strategy=GROW
    assert engine.cheaper_strategy(wrapped, forwards) == GROW  # its fewer positions, no new shapes


def test_measured_costs_are_stored_for_the_next_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(costs_module, "_measured", {})
    model = InterpretableModel(tiny_model("llama", seed=5))
    measured = block_costs(model)
    entries = json.loads((tmp_path / costs_module.STORE_NAME).read_text())
    (key, entry), = entries.items()
    assert "TransformerBlock" in key and "float32" in key and entry["measured"]
    # The next process reads them instead of measuring.
    monkeypatch.setattr(costs_module, "_measured", {})
    monkeypatch.setattr(costs_module, "_calibrate", lambda *a: pytest.fail("measured again"))
    assert block_costs(model) == measured
    # A measurement older than STORE_DAYS is taken again.
    store = tmp_path / costs_module.STORE_NAME
    store.write_text(json.dumps({key: {**entry, "measured": "2000-01-01"}}))
    monkeypatch.setattr(costs_module, "_measured", {})
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        block_costs(model)
    # A broken store is only a cache: measured again, and written whole.
    monkeypatch.undo()
    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(costs_module, "_measured", {})
    (tmp_path / costs_module.STORE_NAME).write_text("[1, 2")
    assert block_costs(model).per_position >= 0
    assert list(json.loads((tmp_path / costs_module.STORE_NAME).read_text())) == [key]


def both(model, plan) -> dict:
    """Each strategy's forward of the plan's first pair, all sites in one chunk."""
    return {s: [engine._BatchedForward(model, plan, 0, list(plan.sites), s)] for s in (GROW, FLAT)}


@pytest.mark.parametrize("costs, expected", [(CPU_LIKE, GROW), (GPU_LIKE, FLAT)])
def test_the_cheaper_strategy_follows_the_device(wrapped, monkeypatch, costs, expected):
    monkeypatch.setattr(engine, "block_costs", lambda model: costs)
    for sweep in (dict(component="mlp", over="layer"), dict(component="input", over=("layer", "position"))):
        plan = prepare_sweeps(wrapped, *NAMES, SweepOptions(metric="kl", **sweep))[0].plan
        assert engine.cheaper_strategy(wrapped, both(wrapped, plan)) == expected


def test_measured_costs_on_a_cpu_grow_with_rows_and_are_remembered(wrapped):
    default = mx.default_device()
    mx.set_default_device(mx.cpu)  # on Apple silicon the default is the GPU
    try:
        costs = block_costs(wrapped)
        assert block_costs(wrapped) is costs  # measured once per block, device and dtype
    finally:
        mx.set_default_device(default)
    assert costs.fixed >= 0 and costs.per_shape >= 0
    # A CPU's block time grows with its rows: 16 rows of 16 positions cost well over one row's.
    assert costs.per_position * 16 * 16 > 0.1 * costs.fixed


def test_costs_of_a_quantized_model_are_measured_at_its_width():
    model = tiny_model("llama", seed=4)
    nn.quantize(model, group_size=32, bits=4)
    costs = block_costs(InterpretableModel(model))
    assert costs.per_position >= 0 and costs.fixed >= 0


def test_blocks_that_cannot_be_timed_alone_grow():
    model = InterpretableModel(tiny_model("ministral3"))  # block(h, attn_scale, mask, cache)
    assert block_costs(model) is None
    sites, _ = sweep_sites(model, "input", ("layer",), 4)
    plan = Plan(mx.array([[5, 6, 7, 8]]), mx.array([[5, 9, 7, 8]]), tuple(sites), METRICS["kl"], "denoise", 3)
    assert engine.cheaper_strategy(model, both(model, plan)) == GROW


def test_an_unknown_strategy_is_refused(wrapped):
    plan = prepare_sweeps(wrapped, *NAMES, SweepOptions(metric="kl"))[0].plan
    with pytest.raises(InputError, match="strategy='fast'"):
        run_engine(wrapped, plan, strategy="fast")


@pytest.mark.parametrize("given, expected", [(None, "0"), ("1", "1")])
def test_float32_stays_float32_unless_the_user_asks_for_tf32(given, expected):
    """On an H200 TF32 products made engine and naive values differ 230x past their float32 noise;
    with MLX_ENABLE_TF32=0 every engine-vs-naive test passed there. A user's own setting stands."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "MLX_ENABLE_TF32"}
    if given is not None:
        env["MLX_ENABLE_TF32"] = given
    script = "import mlx.core, os, mlxterp; print(os.environ['MLX_ENABLE_TF32'])"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.split()[-1] == expected


class _LayersReversed(nn.Module):
    """A language model that runs its blocks last to first: the engine cannot grow rows."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __call__(self, tokens: mx.array) -> mx.array:
        h = self.inner.model.embed_tokens(tokens)
        for layer in reversed(self.inner.model.layers):
            h = layer(h, "causal", None)
        return self.inner.lm_head(self.inner.model.norm(h))


def test_blocks_out_of_order_fall_back_once_for_every_chunk():
    model = InterpretableModel(_LayersReversed(tiny_model("llama", seed=2)))
    clean, corrupted = mx.array([[5, 6, 7, 8, 9]]), mx.array([[5, 6, 30, 8, 9]])
    sites, _ = sweep_sites(model, "input", ("layer", "position"), 5, positions=[2, 4])
    plan = Plan(clean, corrupted, tuple(sites), METRICS["kl"], "denoise", 4)
    with pytest.warns(UserWarning, match="does not call its blocks once each in order") as caught:
        values = run_engine(model, plan, max_batch=2)  # three chunks
    assert len([w for w in caught if "in order" in str(w.message)]) == 1
    assert_same_values(values, run_naive(model, plan))
