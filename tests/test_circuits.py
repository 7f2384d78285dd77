"""Circuits: the graph's nodes add up to every input, exact edge patching equals a naive
procedure with hand-placed interventions, EAP is the derivative of the metric along an edge,
EAP-IG integrates to the whole effect, and faithfulness runs from the corrupted run (0 %) to
the clean one (100 %)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import SMOLLM2_VOCAB, assert_model_untouched, parameters_snapshot, tiny_model

import mlxterp
from mlxterp import (
    DisconnectedCircuitWarning,
    GraphError,
    InputError,
    InputTypeError,
    InterpretableModel,
    edge_attribution,
    edge_patching,
    faithfulness_curve,
    top_circuit,
)
from mlxterp.experiments.analyses.circuits import prune
from mlxterp.experiments.pipeline.metrics import METRICS, logit_diff, probability
from mlxterp.experiments.pipeline.plan import Plan
from mlxterp.experiments.runners.edges import EdgeRunner, GraphRun, edge_weights, run_edge_gradients

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWERS = dict(metric="logit_diff", answer=" Mary", wrong_answer=" John")
TOKENS = mx.array([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 30, 8, 9, 10, 11, 12]])


def _mlp_input_key(model) -> str:
    """The key of the module in front of block 0's MLP (its input is the MLP's input stream)."""
    block = model.model.layers[0]
    return "layers.0.pre_feedforward_layernorm" if hasattr(block, "pre_feedforward_layernorm") \
        else "layers.0.post_attention_layernorm"


@pytest.mark.kernels
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_the_nodes_add_up_to_every_input(family):
    """The embeddings plus every head and MLP before an input reproduce that input as the model
    computes it (block inputs, MLP inputs, the final norm's input). Measured: at most 3e-7 of the
    largest |input| in float32 (Gemma 3's normalised head sums included); the bound is 1e-5."""
    model = InterpretableModel(tiny_model(family, seed=2))
    runner = EdgeRunner(model)
    _, outputs = runner.node_outputs(TOKENS)
    graph = runner.graph
    keys = [f"layers.{layer}:input" for layer in range(graph.layers)]
    mlp_keys = [_mlp_input_key(model).replace("layers.0", f"layers.{layer}") + ":input"
                for layer in range(graph.layers)]
    with model.trace(TOKENS, capture=[*keys, *mlp_keys, "model.norm:input"]) as trace:
        seen = {key: trace.activations[key] for key in [*keys, *mlp_keys, "model.norm:input"]}
    for layer in range(graph.layers):
        for key, nodes in ((keys[layer], graph.node_count(layer)),
                           (mlp_keys[layer], graph.node_count(layer, with_heads=True))):
            total = outputs[:, :nodes].sum(axis=1)
            scale = mx.abs(seen[key]).max().item()
            assert mx.abs(total - seen[key]).max().item() <= 1e-5 * scale, (family, key)
    total = outputs.sum(axis=1)
    assert mx.abs(total - seen["model.norm:input"]).max().item() <= 1e-5 * mx.abs(total).max().item()


def test_the_graph_counts_edges_and_names_them():
    graph = EdgeRunner(InterpretableModel(tiny_model("llama"))).graph  # 3 blocks, 4 heads, 2 groups
    assert graph.upstream[:6] == ["embed", "L0.H0", "L0.H1", "L0.H2", "L0.H3", "L0.mlp"]
    assert graph.inputs[:9] == ["L0.H0.q", "L0.H1.q", "L0.H2.q", "L0.H3.q",
                                "L0.G0.k", "L0.G1.k", "L0.G0.v", "L0.G1.v", "L0.mlp"]
    # into block l's 8 attention inputs: 1 + 5 l nodes; into its MLP: 5 + 5 l; logits: all 16
    expected = sum(8 * (1 + 5 * layer) + 5 + 5 * layer for layer in range(3)) + 16
    assert graph.edge_count == expected == len(set(graph.edge_names))
    assert graph.readers(graph.inputs.index("L1.G1.k")) == ["L1.H2", "L1.H3"]
    with pytest.raises(GraphError, match="later node into an earlier input"):
        graph.edge_index("L2.mlp->L1.H0.q")
    with pytest.raises(GraphError, match="not in this model's graph"):
        graph.edge_index("L9.H0->logits")


def _node_output(model, trace_acts, layer, head, kind, tokens_row):
    """A node's output computed from a plain trace of the model (not from the graph runner)."""
    if kind == "embed":
        return trace_acts["layers.0:input"][tokens_row]
    if kind == "mlp":
        return trace_acts[f"layers.{layer}.mlp"][tokens_row]
    attention = model.model.layers[layer].self_attn
    mixed = trace_acts[f"layers.{layer}.self_attn.o_proj:input"][tokens_row]
    size = mixed.shape[-1] // attention.n_heads
    weight = attention.o_proj.weight[:, head * size:(head + 1) * size]
    return mixed[..., head * size:(head + 1) * size] @ weight.T


def _naive_edge(model, clean_ids, corrupted_ids, edge: str, metric):
    """The metric of the corrupted run with one edge carrying the clean run's value: one
    forward with interventions placed by hand on the module that reads the edge's input."""
    upstream, downstream = edge.split("->")
    layers = range(len(model.layers))
    keys = [*[f"layers.{n}.mlp" for n in layers], *[f"layers.{n}.self_attn.o_proj:input" for n in layers],
            *[f"layers.{n}:input" for n in layers]]
    runs = []
    for ids in (clean_ids, corrupted_ids):
        with model.trace(ids, capture=keys) as trace:
            runs.append(({key: trace.activations[key] for key in keys}, trace.output[0, -1]))
    (clean, clean_logits), (corrupted, _) = runs
    if upstream == "embed":
        kind, layer, head = "embed", 0, 0
    else:
        layer_text, part = upstream.split(".")
        layer, kind = int(layer_text[1:]), "mlp" if part == "mlp" else "head"
        head = 0 if part == "mlp" else int(part[1:])
    change = (_node_output(model, clean, layer, head, kind, 0)
              - _node_output(model, corrupted, layer, head, kind, 0))
    if downstream == "logits":
        interventions = {"model.norm:input": lambda x: x + change}
    elif downstream.endswith(".mlp"):
        target = int(downstream.split(".")[0][1:])
        interventions = {f"layers.{target}.post_attention_layernorm:input": lambda x: x + change}
    else:
        layer_text, head_text, which = downstream.split(".")
        target, index = int(layer_text[1:]), int(head_text[1:])
        block = model.model.layers[target]
        projection = getattr(block.self_attn, f"{which}_proj")
        moved = projection(block.input_layernorm(corrupted[f"layers.{target}:input"] + change))
        size = moved.shape[-1] // (block.self_attn.n_heads if which == "q" else block.self_attn.n_kv_heads)
        columns = slice(index * size, (index + 1) * size)

        def replace_columns(x):
            parts = [x[..., :columns.start], moved[..., columns], x[..., columns.stop:]]
            return mx.concatenate(parts, axis=-1)

        interventions = {f"layers.{target}.self_attn.{which}_proj": replace_columns}
    with model.trace(corrupted_ids, interventions=interventions) as trace:
        patched = trace.output[0, -1]
    return metric.fn(patched[None].astype(mx.float32), clean_logits)[0].item()


@pytest.mark.kernels
def test_edge_patching_equals_the_naive_procedure(wrapped):
    """Each edge type on SmolLM2, patched by the batched graph runner and by hand-placed
    interventions (one forward each): equal to 0.01 percentage points of recovery."""
    edges = ["embed->L2.H4.q", "L1.H3->L4.G1.k", "L3.mlp->L5.G2.v", "L2.H0->L2.mlp", "L0.mlp->L6.mlp",
             "L23.H3->logits", "embed->logits", "L29.mlp->logits", "L10.H8->L20.H7.q"]
    exact = edge_patching(wrapped, CLEAN, CORRUPTED, edges=edges, **ANSWERS)
    metric = logit_diff(*exact.answers[0])
    clean_ids, corrupted_ids = ([wrapped.encode(text)] for text in (CLEAN, CORRUPTED))
    gap = exact.metric_values.clean[0] - exact.metric_values.corrupted[0]
    for i, edge in enumerate(edges):
        naive = (_naive_edge(wrapped, clean_ids, corrupted_ids, edge, metric)
                 - exact.metric_values.corrupted[0]) / gap * 100
        assert abs(exact.recovery[0, i] - naive) <= 0.01, (edge, exact.recovery[0, i], naive)
    assert np.abs(exact.recovery).max() > 1  # some edge matters: the check compares real effects


@pytest.mark.kernels
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("metric", [logit_diff(3, 4), METRICS["kl"], probability(3)],
                         ids=["logit_diff", "kl", "prob"])
def test_eap_is_the_derivative_along_each_edge(family, metric):
    """An edge's EAP score equals the central finite difference of the metric along that edge
    (W = +-h on it), in float64 weights. The difference's own error is estimated from two step
    sizes, as in the attribution tests, plus the float32 rounding of the metric (which is always
    computed in float32): about 1e-7 of values near 1, over steps of 0.05, below 1e-5 (measured:
    the differences scatter by up to 6e-5 at h = 1e-3 and 1e-6 at h = 0.1). The bound adds 1e-3
    relative, as the attribution tests do."""
    model = InterpretableModel(tiny_model(family, seed=3))
    model.model.set_dtype(mx.float64)
    runner = EdgeRunner(model)
    graph = runner.graph
    chosen = list(range(0, graph.edge_count, max(1, graph.edge_count // 40)))
    plan = Plan(TOKENS[:1], TOKENS[1:], tuple((n,) for n in chosen), metric, "denoise")
    values = run_edge_gradients(runner, plan, "eap", 1)
    _, outputs = runner.node_outputs(TOKENS)
    reference = model.model(TOKENS[:1])[0, -1]

    def metric_at(n: int, h: float) -> float:
        weights = h * edge_weights(graph, [(n,)], complement=False).astype(mx.float64)
        logits = runner(TOKENS[1:], GraphRun(weights=weights, donor=outputs[:1]))
        return metric.fn(logits[:, -1], reference)[0].item()

    for column, n in enumerate(chosen):
        h = 0.1
        coarse = (metric_at(n, h) - metric_at(n, -h)) / (2 * h)
        fine = (metric_at(n, h / 2) - metric_at(n, -h / 2)) / h
        estimate = values.patched[0, column] - values.corrupted[0]
        assert abs(estimate - fine) <= 1e-3 * abs(fine) + 2 * abs(coarse - fine) + 1e-5, (
            family, graph.edge_names[n], estimate, fine)


@pytest.mark.slow
@pytest.mark.kernels
def test_eap_ig_integrates_to_the_whole_effect(wrapped):
    """EAP-IG integrates on the embeddings: its scores of the edges out of `embed` add up to the
    total effect of the embeddings, the clean-minus-corrupted metric, as the steps grow. Measured
    on this pair: 20 % of the gap with EAP's single gradient, 52 % at 2 steps, 87 % at 4, 100.04 %
    at 16; the bound at 16 steps is 1 point."""
    scores = {}
    for method, steps in (("eap", 1), ("eap-ig", 2), ("eap-ig", 4), ("eap-ig", 16)):
        result = edge_attribution(wrapped, CLEAN, CORRUPTED, method=method, steps=steps, **ANSWERS)
        out_of_embed = [i for i, site in enumerate(result.sites) if site["edge"].startswith("embed->")]
        scores[steps] = result.recovery[0, out_of_embed].sum()
    assert abs(scores[16] - 100) < 1
    assert abs(scores[16] - 100) < abs(scores[4] - 100) < abs(scores[2] - 100) < abs(scores[1] - 100)


@pytest.mark.kernels
def test_faithfulness_runs_from_corrupted_to_clean(wrapped):
    """Every edge in the circuit: the clean run (100 %); the circuit of one edge into an MLP
    that reaches nothing: pruned away, the corrupted run (0 %), with a warning. Pruning changes no
    faithfulness (checked on an unpruned top-40 circuit run by the runner directly)."""
    scores = edge_attribution(wrapped, CLEAN, CORRUPTED, **ANSWERS)
    every = len(scores.sites)
    curve = faithfulness_curve(wrapped, scores, sizes=[40, every])
    assert abs(curve.mean[1] - 100) < 0.01
    assert curve.sites[1] == {"edges": every, "kept": every}
    assert curve.sites[0]["kept"] <= 40
    graph = EdgeRunner(wrapped).graph
    top = [graph.edge_index(scores.sites[i]["edge"]) for i in np.argsort(-np.abs(scores.mean))[:40]]
    tokens = mx.array([wrapped.encode(text) for text in (CLEAN, CORRUPTED)])
    unpruned = _faithfulness(wrapped, top, tokens, *curve.answers[0])
    assert abs(unpruned - curve.mean[0]) < 0.01, (unpruned, curve.mean[0])
    lonely = scores.sites.index({"edge": "embed->L0.mlp"})
    lonely_scores = scores
    lonely_scores.metric_values.patched[0] = lonely_scores.metric_values.corrupted[0]
    lonely_scores.metric_values.patched[0, lonely] += 1.0
    with pytest.warns(DisconnectedCircuitWarning, match="no path from the embeddings"):
        empty = faithfulness_curve(wrapped, lonely_scores, sizes=[1])
    assert abs(empty.mean[0]) < 0.01


def _faithfulness(model, edge_numbers: list[int], tokens: mx.array, answer: int, wrong: int) -> float:
    """The logit-difference faithfulness (percent) of a circuit given as edge numbers, without
    pruning; `tokens` (2, L) holds the clean and the corrupted prompt."""
    runner = EdgeRunner(model)
    logits, outputs = runner.node_outputs(tokens)
    weights = edge_weights(runner.graph, [edge_numbers], complement=True)
    patched = runner(tokens[:1], GraphRun(weights=weights, donor=outputs[1:]))
    clean, corrupted, circuit = ((row[answer] - row[wrong]).item()
                                 for row in (logits[0, -1], logits[1, -1], patched[0, -1]))
    return (circuit - corrupted) / (clean - corrupted) * 100


@pytest.mark.kernels
def test_pruning_changes_no_faithfulness_on_gemma3_whose_heads_are_coupled(smollm2):
    """Gemma 3 scales a block's heads by the rms of their sum: an edge into one head changes
    its siblings too, and pruning keeps their edges (4 key/value groups, so that each head has
    inputs of its own; SmolLM2's tokenizer and vocabulary)."""
    model = InterpretableModel(tiny_model("gemma3_text", seed=4, num_key_value_heads=4,
                                          vocab_size=SMOLLM2_VOCAB), tokenizer=smollm2[1])
    graph = EdgeRunner(model).graph
    number = graph.edge_index
    chosen = [number(e) for e in ("embed->L5.G0.k", "embed->L5.G0.v", "L5.H0->logits", "L5.H1->logits")]
    assert graph.coupled_heads and prune(graph, chosen) == chosen
    scores = edge_attribution(model, CLEAN, CORRUPTED, **ANSWERS)
    curve = faithfulness_curve(model, scores, sizes=[40, 200])
    tokens = mx.array([model.encode(text) for text in (CLEAN, CORRUPTED)])
    top = [number(scores.sites[i]["edge"]) for i in np.argsort(-np.abs(scores.mean), kind="stable")]
    for column, size in enumerate((40, 200)):
        unpruned = _faithfulness(model, top[:size], tokens, *curve.answers[0])
        assert abs(unpruned - curve.mean[column]) < 0.01, (size, unpruned, curve.mean[column])


def test_pruning_keeps_only_paths_from_embeddings_to_logits():
    graph = EdgeRunner(InterpretableModel(tiny_model("llama"))).graph
    number = graph.edge_index
    path = [number("embed->L0.H1.q"), number("L0.H1->L2.mlp"), number("L2.mlp->logits")]
    dead_end = number("embed->L1.mlp")  # L1.mlp feeds nothing in the circuit
    no_source = number("L1.H0->logits")  # nothing in the circuit feeds L1.H0
    assert prune(graph, [*path, dead_end, no_source]) == path
    shared_key = number("L0.mlp->L1.G1.k")  # feeds L1.H2 and L1.H3
    assert number("L1.H3->logits") in prune(graph, [number("embed->L0.mlp"), shared_key,
                                                    number("L1.H3->logits")])


def test_circuit_json_and_nodes(wrapped, tmp_path):
    scores = edge_attribution(wrapped, CLEAN, CORRUPTED, **ANSWERS)
    circuit = top_circuit(scores, edges=30)
    assert 0 < len(circuit.edges) <= 30 and circuit.requested == 30
    assert circuit.nodes[0] == "embed" and circuit.nodes[-1] == "logits"
    back = mlxterp.Circuit.from_json(circuit.to_json(tmp_path / "circuit.json"))
    assert back == circuit
    by_threshold = top_circuit(scores, threshold=abs(scores.mean).max() / 2)
    assert set(by_threshold.edges) <= set(top_circuit(scores, edges=len(scores.sites)).edges)


@pytest.mark.parametrize("family, found", [("gpt2", "children"), ("gemma2", "soft-caps")])
def test_families_that_are_not_a_plain_sum_are_refused(family, found):
    model = InterpretableModel(tiny_model(family))
    with pytest.raises(GraphError, match=found):
        EdgeRunner(model)


def test_bad_input(wrapped, tiny_smol):
    before = parameters_snapshot(wrapped.model)
    with pytest.raises(GraphError, match="later node"):
        edge_patching(wrapped, CLEAN, CORRUPTED, edges=["L5.mlp->L2.H0.q"], **ANSWERS)
    with pytest.raises(InputError, match="list of edge names"):
        edge_patching(wrapped, CLEAN, CORRUPTED, edges="L0.mlp->logits", **ANSWERS)
    with pytest.raises(InputError, match="steps=0"):
        edge_attribution(wrapped, CLEAN, CORRUPTED, method="eap-ig", steps=0, **ANSWERS)
    with pytest.raises(InputError, match="'eap' or 'eap-ig'"):
        edge_attribution(wrapped, CLEAN, CORRUPTED, method="acdc", **ANSWERS)
    with pytest.raises(InputError, match="does not use component"):
        edge_attribution(wrapped, CLEAN, CORRUPTED, component="self_attn", **ANSWERS)
    with pytest.raises(InputError, match="prompt pairs"):
        edge_attribution(wrapped, CLEAN, mlxterp.Noise("Mary"), **ANSWERS)
    with pytest.raises(InputTypeError, match="edge scores"):
        faithfulness_curve(wrapped, wrapped.patching_sweep(CLEAN, CORRUPTED, **ANSWERS))
    scores = edge_patching(wrapped, CLEAN, CORRUPTED, edges=["L0.mlp->logits"], **ANSWERS)
    with pytest.raises(InputError, match="from 1 to 1 edges"):
        faithfulness_curve(wrapped, scores, sizes=[2])
    with pytest.raises(InputError, match="does not use direction"):
        faithfulness_curve(wrapped, scores, direction="noise")
    with pytest.raises(InputError, match="one of them"):
        top_circuit(scores)
    with pytest.raises(InputError, match="no edge has"):
        top_circuit(scores, threshold=1e9)
    with pytest.raises(InputError, match="a number >= 0"):
        top_circuit(scores, threshold="high")
    with pytest.raises(InputTypeError, match="list of circuit sizes"):
        faithfulness_curve(wrapped, scores, sizes=1)
    with pytest.raises(InputTypeError, match="random_seed"):
        faithfulness_curve(wrapped, scores, sizes=[1], random_seed="x")
    with pytest.raises(InputTypeError, match="edge_patching result"):
        top_circuit(scores, edges=1).to_html("c.html", exact=scores.metric_values)
    tiny_scores = edge_patching(tiny_smol, CLEAN, CORRUPTED, edges=["L0.mlp->logits"], **ANSWERS)
    with pytest.raises(InputError, match="score this model's edges first"):
        faithfulness_curve(wrapped, tiny_scores, sizes=[1])
    assert_model_untouched(wrapped.model, before)


def test_the_circuit_figure_and_page(wrapped, tmp_path):
    """The figure is written in each format; the page draws one line per (edge, reader) with
    the edge's name, its score and, given the exact result, its exact recovery on hover."""
    scores = edge_attribution(wrapped, CLEAN, CORRUPTED, **ANSWERS)
    circuit = top_circuit(scores, edges=20)
    for suffix in (".png", ".svg"):
        circuit.plot(tmp_path / f"circuit{suffix}")
        assert (tmp_path / f"circuit{suffix}").stat().st_size > 1000
    exact = edge_patching(wrapped, CLEAN, CORRUPTED, edges=list(circuit.edges), **ANSWERS)
    page = circuit.to_html(tmp_path / "circuit.html", exact=exact).read_text()
    edge = circuit.edges[0]
    assert f'data-edge="{edge.replace(">", "&gt;")}"' in page
    assert f"exact recovery {exact.mean[0]:.2f}%" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing from other hosts


@pytest.mark.slow
def test_cli_circuit_prints_the_top_edges_and_writes_the_files(tmp_path, capsys, monkeypatch, wrapped):
    from mlxterp.presentation import cli

    monkeypatch.setattr(cli, "_model", lambda name: wrapped)
    code = cli.main(["circuit", CLEAN, CORRUPTED, "--metric", "logit_diff", "--answer", " Mary",
                     "--wrong-answer", " John", "--edges", "50", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "L23.H3->logits" in out and "faithfulness (%)" in out and "70651 edges of the model" in out
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["circuit-smollm2-135m-eap-logit_diff-faithfulness.json",
                     "circuit-smollm2-135m-eap-logit_diff-faithfulness.png",
                     "circuit-smollm2-135m-eap-logit_diff.json", "circuit-smollm2-135m-eap-logit_diff.png"]
    circuit = mlxterp.Circuit.from_json(tmp_path / "circuit-smollm2-135m-eap-logit_diff.json")
    assert circuit.requested == 50 and circuit.provenance["model"] == "smollm2-135m"
