"""The guide's code, run as written against the bundled model.

Each block below is copied verbatim from `shared/spec/activation-patching-guide.txt` (a test
checks that, when the guide is present beside the repository). The only change made when
running them: the hub download `load('mlx-community/...')` becomes `mlxterp.load("smollm2-135m")`.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest

import mlxterp
from mlxterp import interventions as iv

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "activation-patching-guide.txt"
HUB_LOAD = "base_model, tokenizer = load('mlx-community/Llama-3.2-1B-Instruct-4bit')"
OFFLINE_LOAD = 'base_model, tokenizer = mlxterp.load("smollm2-135m")'

QUICK_START = r'''
from mlxterp import InterpretableModel
from mlx_lm import load

# Load model
base_model, tokenizer = load('mlx-community/Llama-3.2-1B-Instruct-4bit')
model = InterpretableModel(base_model, tokenizer=tokenizer)

# Find important layers - that's it!
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    component="mlp",
    plot=True
)

# Analyze
sorted_results = sorted(results.items(), key=lambda x: x[1], reverse=True)
print("Top 3 most important layers:")
for layer_idx, recovery in sorted_results[:3]:
    print(f"  Layer {layer_idx}: {recovery:.1f}% recovery")
'''

L2_EXAMPLE = r'''
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    metric="l2"  # Default
)
'''

COSINE_EXAMPLE = r'''
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    metric="cosine"
)
'''

MSE_EXAMPLE = r'''
# Recommended for Qwen (151k vocab), GPT-4 scale models
results = model.activation_patching(
    clean_text="Paris is the capital of France",
    corrupted_text="London is the capital of France",
    metric="mse"  # Most stable
)
'''

QUICK_EXAMPLE = r'''
import mlx.core as mx
from mlxterp import InterpretableModel, interventions as iv
from mlx_lm import load

# Load model
base_model, tokenizer = load('mlx-community/Llama-3.2-1B-Instruct-4bit')
model = InterpretableModel(base_model, tokenizer=tokenizer)

# Define clean vs corrupted inputs
clean_text = "Paris is the capital of France"
corrupted_text = "London is the capital of France"

# Get baseline outputs
with model.trace(clean_text):
    clean_output = model.output.save()

with model.trace(corrupted_text):
    corrupted_output = model.output.save()

mx.eval(clean_output, corrupted_output)

# Helper function to measure distance
def l2_distance(a, b):
    return float(mx.sqrt(mx.sum((a - b) ** 2)))

baseline = l2_distance(corrupted_output[0, -1], clean_output[0, -1])
print(f"Baseline L2 distance: {baseline:.2f}")

# Patch MLP at layer 10
with model.trace(clean_text) as trace:
    clean_mlp = trace.activations["model.model.layers.10.mlp"]

mx.eval(clean_mlp)

with model.trace(corrupted_text,
                interventions={"layers.10.mlp": iv.replace_with(clean_mlp)}):
    patched_output = model.output.save()

mx.eval(patched_output)

dist = l2_distance(patched_output[0, -1], clean_output[0, -1])
recovery = (baseline - dist) / baseline * 100
print(f"Layer 10 MLP: {recovery:.1f}% recovery")
'''

STEP_1 = r'''
# Factual knowledge task
clean_text = "Paris is the capital of France"
corrupted_text = "London is the capital of France"

# Sentiment task
clean_text = "This movie was amazing"
corrupted_text = "This movie was terrible"

# Grammatical task
clean_text = "The cat sits on the mat"
corrupted_text = "The cat sit on the mat"
'''

STEP_2 = r'''
# Get clean output
with model.trace(clean_text):
    clean_output = model.output.save()

# Get corrupted output
with model.trace(corrupted_text):
    corrupted_output = model.output.save()

mx.eval(clean_output, corrupted_output)

# Measure baseline distance
def l2_distance(a, b):
    """L2 (Euclidean) distance between output logits"""
    return float(mx.sqrt(mx.sum((a - b) ** 2)))

baseline = l2_distance(corrupted_output[0, -1], clean_output[0, -1])
'''

STEP_3 = r'''
results = {}

for layer_idx in range(len(model.layers)):
    # Get clean activation for this component
    with model.trace(clean_text) as trace:
        clean_mlp = trace.activations[f"model.model.layers.{layer_idx}.mlp"]

    mx.eval(clean_mlp)

    # Patch into corrupted run
    with model.trace(corrupted_text,
                    interventions={f"layers.{layer_idx}.mlp": iv.replace_with(clean_mlp)}):
        patched_output = model.output.save()

    mx.eval(patched_output)

    # Measure recovery
    dist = l2_distance(patched_output[0, -1], clean_output[0, -1])
    recovery = (baseline - dist) / baseline * 100
    results[layer_idx] = recovery

    print(f"Layer {layer_idx:2d}: {recovery:6.1f}% recovery")
'''

STEP_4 = r'''
# Sort by importance
sorted_results = sorted(results.items(), key=lambda x: x[1], reverse=True)

print("\nMost important layers:")
for layer_idx, recovery in sorted_results[:5]:
    print(f"  Layer {layer_idx:2d}: {recovery:5.1f}% recovery")
'''

PITFALL_LAYER_OUTPUT = r'''
# WRONG - patches entire residual stream
with model.trace(corrupted_text,
                interventions={"layers.10": iv.replace_with(clean_act)}):
    pass
'''

PITFALL_LAMBDA = r'''
# WRONG - lambda closure bug
for i in range(num_layers):
    with model.trace(clean_text):
        clean_act = model.layers[i].output.save()

    # Bug: all interventions use the SAME activation
    with model.trace(corrupted_text,
                    interventions={f"layers.{i}": lambda x: clean_act}):
        pass
'''

DO_REPLACE_WITH = r'''
# CORRECT
with model.trace(corrupted_text,
                interventions={"layers.10.mlp": iv.replace_with(clean_mlp)}):
    pass
'''

POSITION_SPECIFIC = r'''
# Patch only the last token's MLP activation
with model.trace(clean_text) as trace:
    clean_mlp = trace.activations["model.model.layers.10.mlp"]

# Create patched activation: clean for last token, corrupted for others
def selective_patch(corrupted_activation):
    patched = corrupted_activation.copy()
    patched[0, -1, :] = clean_mlp[0, -1, :]  # Patch last token only
    return patched

with model.trace(corrupted_text,
                interventions={"layers.10.mlp": selective_patch}):
    patched_output = model.output.save()
'''

L2_IMPL = r'''
def l2_distance(a, b):
    diff = a - b
    # Use float32 for accumulation to prevent overflow
    diff_f32 = diff.astype(mx.float32)
    squared_sum = mx.sum(diff_f32 * diff_f32)

    # Check for overflow
    if mx.isinf(squared_sum):
        # Fallback to MSE-based calculation
        mse = mx.mean(diff_f32 * diff_f32)
        return float(mx.sqrt(mse) * mx.sqrt(float(diff.size)))

    return float(mx.sqrt(squared_sum))
'''

COSINE_IMPL = r'''
def cosine_distance(a, b):
    a_f32 = a.astype(mx.float32)
    b_f32 = b.astype(mx.float32)

    a_norm = mx.sqrt(mx.sum(a_f32 * a_f32))
    b_norm = mx.sqrt(mx.sum(b_f32 * b_f32))

    if mx.isinf(a_norm) or mx.isinf(b_norm):
        # Fallback: normalize by mean instead of sum
        a_normalized = a_f32 / mx.sqrt(mx.mean(a_f32 * a_f32))
        b_normalized = b_f32 / mx.sqrt(mx.mean(b_f32 * b_f32))
        return float(1.0 - mx.mean(a_normalized * b_normalized))

    a_normalized = a_f32 / a_norm
    b_normalized = b_f32 / b_norm
    return float(1.0 - mx.sum(a_normalized * b_normalized))
'''

MSE_IMPL = r'''
def mse_distance(a, b):
    diff = a.astype(mx.float32) - b.astype(mx.float32)
    return float(mx.mean(diff * diff))
'''

KL_IMPL = r'''
# KL Divergence (NOT recommended)
def kl_divergence(p, q):
    p = mx.softmax(p, axis=-1)
    q = mx.softmax(q, axis=-1)
    return mx.sum(p * (mx.log(p) - mx.log(q)))  # NaN from log(0)!
'''

ALL_BLOCKS = [QUICK_START, L2_EXAMPLE, COSINE_EXAMPLE, MSE_EXAMPLE, QUICK_EXAMPLE, STEP_1, STEP_2,
              STEP_3, STEP_4, PITFALL_LAYER_OUTPUT, PITFALL_LAMBDA,
              DO_REPLACE_WITH, POSITION_SPECIFIC, L2_IMPL, COSINE_IMPL, MSE_IMPL, KL_IMPL]


def run(block: str, namespace: dict) -> dict:
    exec(compile(block.replace(HUB_LOAD, OFFLINE_LOAD), "<guide>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def quick_example():
    """The namespace left by the guide's Quick Example (model loaded, layer 10 patched)."""
    return run(QUICK_EXAMPLE, {"mlxterp": mlxterp})


@pytest.mark.skipif(not GUIDE.is_file(), reason="the guide is not beside the repository")
def test_blocks_are_verbatim_from_the_guide():
    text = GUIDE.read_text()
    assert HUB_LOAD in text
    for block in ALL_BLOCKS:
        assert block.strip() in text


def test_quick_example(quick_example, capsys):
    ns = quick_example
    assert 0 < ns["baseline"] < math.inf
    assert math.isfinite(ns["recovery"]) and ns["recovery"] != 0.0
    assert ns["clean_mlp"].shape == (1, 6, 576)


@pytest.mark.slow
@pytest.mark.kernels
def test_manual_procedure_is_finite_and_reproducible(quick_example):
    ns = dict(quick_example)
    run(STEP_1, ns)
    assert ns["clean_text"] == "The cat sits on the mat"  # the last task of Step 1 wins
    ns.update(clean_text="Paris is the capital of France",
              corrupted_text="London is the capital of France")
    run(STEP_2, ns)
    run(STEP_3, ns)
    first = dict(ns["results"])
    run(STEP_3, ns)
    run(STEP_4, ns)
    assert sorted(first) == list(range(30))
    assert all(math.isfinite(r) for r in first.values())
    assert ns["results"] == first  # a second run reproduces every recovery exactly
    assert ns["results"][10] == pytest.approx(quick_example["recovery"], abs=1e-9)


@pytest.mark.kernels
def test_patching_whole_layer_output_recovers_everything(quick_example):
    ns = dict(quick_example)
    with ns["model"].trace(ns["clean_text"]):
        ns["clean_act"] = ns["model"].layers[10].output.save()
    run(PITFALL_LAYER_OUTPUT, ns)  # runs as written
    model = ns["model"]
    with model.trace(ns["corrupted_text"], interventions={"layers.10": iv.replace_with(ns["clean_act"])}):
        patched = model.output.save()
    dist = ns["l2_distance"](patched[0, -1], ns["clean_output"][0, -1])
    assert (ns["baseline"] - dist) / ns["baseline"] * 100 == pytest.approx(100.0, abs=1e-6)


def test_lambda_pitfall_is_harmless_as_written(quick_example):
    """Each lambda runs in the iteration that made it (DESIGN.md errata); late binding bites
    only when interventions are built first and run later."""
    ns = dict(quick_example, num_layers=3)
    run(PITFALL_LAMBDA, ns)
    run(DO_REPLACE_WITH, ns)
    model, clean, corrupted = ns["model"], ns["clean_text"], ns["corrupted_text"]
    acts = []
    for i in range(3):
        with model.trace(clean):
            acts.append(model.layers[i].output.save())
    late = {}
    for i in range(3):
        clean_act = acts[i]
        late[i] = lambda x: clean_act  # noqa: B023 - the late-binding bug, on purpose
    bound = {i: iv.replace_with(acts[i]) for i in range(3)}
    with model.trace(corrupted, interventions={"layers.0": late[0]}) as trace:
        late_layer0 = trace.activations["layers.0"]
    with model.trace(corrupted, interventions={"layers.0": bound[0]}) as trace:
        bound_layer0 = trace.activations["layers.0"]
    assert mx.array_equal(late_layer0, acts[2]).item()  # the bug: layer 2's activation
    assert mx.array_equal(bound_layer0, acts[0]).item()  # replace_with binds its value


def test_position_specific_patching(quick_example):
    ns = dict(quick_example)
    with pytest.raises(AttributeError, match="copy"):
        run(POSITION_SPECIFIC, ns)  # erratum: MLX arrays have no .copy()
    model, clean_mlp = ns["model"], ns["clean_mlp"]
    corrupted_text = ns["corrupted_text"]

    def selective_patch(corrupted_activation):
        patched = mx.array(corrupted_activation)  # the working copy
        patched[0, -1, :] = clean_mlp[0, -1, :]
        return patched

    with model.trace(corrupted_text, interventions={"layers.10.mlp": selective_patch}):
        by_hand = model.output.save()
    with model.trace(corrupted_text,
                     interventions={"layers.10.mlp": iv.replace_with(clean_mlp, positions=[-1])}):
        helper = model.output.save()
    corrupted = ns["corrupted_output"]
    assert mx.array_equal(by_hand, helper).item()
    assert mx.allclose(helper[0, :-1], corrupted[0, :-1], atol=1e-5, rtol=0).item()
    assert not mx.allclose(helper[0, -1], corrupted[0, -1], atol=1e-3).item()


def test_component_keys_resolve(quick_example):
    model = quick_example["model"]
    components = ["mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn",
                  "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    for i in range(len(model.layers)):
        for component in components:
            assert model.resolve(f"layers.{i}.{component}") == f"model.model.layers.{i}.{component}"
    clean_mlp = quick_example["clean_mlp"]
    with model.trace(quick_example["corrupted_text"],
                     interventions={"layers.10.mlp.down_proj": iv.replace_with(clean_mlp)}) as t:
        assert mx.array_equal(t.activations["layers.10.mlp"], clean_mlp).item()


def test_distance_implementations_are_finite(quick_example):
    ns = dict(quick_example)
    for block in (L2_IMPL, COSINE_IMPL, MSE_IMPL, KL_IMPL):
        run(block, ns)
    a, b = ns["corrupted_output"][0, -1], ns["clean_output"][0, -1]
    assert ns["l2_distance"](a, b) == pytest.approx(ns["baseline"], rel=1e-5)
    for name in ("cosine_distance", "mse_distance"):
        assert 0 < ns[name](a, b) < math.inf
    assert 0 < float(ns["kl_divergence"](b, a)) < math.inf


def test_quick_start_helper(tmp_path, monkeypatch, capsys, quick_example):
    monkeypatch.chdir(tmp_path)  # plot=True in a script saves a PNG here
    ns = run(QUICK_START, {"mlxterp": mlxterp})
    printed = capsys.readouterr().out
    assert "Top 3 most important layers:" in printed
    top = ns["sorted_results"][:3]
    assert [f"  Layer {i}: {r:.1f}% recovery" for i, r in top] == printed.splitlines()[-3:]
    assert list(tmp_path.glob("*.png"))
    # the helper's numbers are the manual procedure's (Quick Example, layer 10)
    assert ns["results"][10] == pytest.approx(quick_example["recovery"], abs=0.01)


def test_metric_examples(quick_example):
    for block, metric in ((L2_EXAMPLE, "l2"), (COSINE_EXAMPLE, "cosine"), (MSE_EXAMPLE, "mse")):
        ns = run(block, {"model": quick_example["model"]})
        assert sorted(ns["results"]) == list(range(30)), metric
        assert all(math.isfinite(r) for r in ns["results"].values())
