"""The model as a graph of nodes and edges, and the runner that executes it with chosen edges
carrying another run's values.

Nodes. Upstream nodes write into the residual stream: the token embeddings (the first block's
input), every attention head (its term of the output projection, W_O[:, head] @ z_head, with its
share of the bias) and every MLP. Downstream inputs read the stream: each query head's query
input, each key/value group's key and value inputs, every MLP's input and the logits (the final
norm's input). With grouped-query attention a group's heads share one key and one value input,
because the model computes one key and one value per group: an edge into a group's key is one
edge, counted once (`L5.G1.k`), not once per query head. Gemma 3 normalises the sum of the
heads after attention (`post_attention_layernorm`): a head's output is then its term times that
norm's weight and the inverse rms of the sum, so that the heads still add up to exactly what
the block adds.

An edge u -> i joins an upstream node to a later input: the heads of block l read the blocks
before it, the MLP of block l reads its heads too, and the logits read every node.

The runner. In a run of the graph, input i is

    in_i = resid_i + sum_u W[u, i] * (A_u - out_u) + delta_i

where resid_i is the sum of this run's node outputs before i (what the model computes), A_u is
node u's output in another run (the donor), W holds one weight in [0, 1] per edge and row, and
delta is zero (its gradient is dm/d in_i, for every input at once). W = 0 is the plain forward;
W = 1 on one edge patches that edge alone (path patching; on Gemma 3 the other heads of the
block the edge enters are rescaled with it, as the model's norm of their sum does); W = 1 on
every edge outside a circuit runs the circuit.

The blocks are rebuilt from the model's own modules (the block's norms, projections, rotary
embedding, q/k norms and MLP), each block standing in for the model's through the one
interception mechanism, so the model's embedding, masks, final norm and unembedding run as they
are. Every runner checks its first plain forward against the model's own logits, so a block that
is not this formula is refused, not given wrong numbers.

Example:
    >>> runner = EdgeRunner(model)
    >>> runner.graph.edge_count, runner.graph.upstream[:3]
    (70651, ['embed', 'L0.H0', 'L0.H1'])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention

from mlxterp.errors import AttentionCaptureError, GraphError
from mlxterp.experiments.pipeline.metrics import evaluate, measure
from mlxterp.experiments.pipeline.plan import CLEAN, CORRUPTED, Plan, SweepValues
from mlxterp.experiments.runners.gradient import check_gradients
from mlxterp.tracing.attention import attention_layouts, mixing_tolerance
from mlxterp.tracing.intercept import call_parameters, intercepted


@dataclass(frozen=True)
class Graph:
    """The nodes and edges of a model with `layers` blocks of `heads` query heads in `groups`
    key/value groups.

    Upstream nodes, in order: `embed`, then per block `L{l}.H{h}` and `L{l}.mlp`. Inputs, in
    order: per block `L{l}.H{h}.q`, `L{l}.G{g}.k`, `L{l}.G{g}.v`, `L{l}.mlp`; then `logits`.

    Example:
        >>> graph = Graph(layers=30, heads=9, groups=3)
        >>> graph.edge_names[0], graph.edge_count
        ('embed->L0.H0.q', 70651)
    """

    layers: int
    heads: int
    groups: int
    # Gemma 3: a block's heads are scaled by the rms of their sum, so changing one head's input
    # changes every head's output in that block
    coupled_heads: bool = False

    @property
    def block_nodes(self) -> int:
        """Upstream nodes per block: its heads and its MLP."""
        return self.heads + 1

    @property
    def block_inputs(self) -> int:
        """Inputs per block: a query per head, a key and a value per group, the MLP's input."""
        return self.heads + 2 * self.groups + 1

    @cached_property
    def upstream(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.layers):
            names += [f"L{layer}.H{h}" for h in range(self.heads)] + [f"L{layer}.mlp"]
        return names

    @cached_property
    def inputs(self) -> list[str]:
        names = []
        for layer in range(self.layers):
            names += [f"L{layer}.H{h}.q" for h in range(self.heads)]
            names += [f"L{layer}.G{g}.{kind}" for kind in "kv" for g in range(self.groups)]
            names.append(f"L{layer}.mlp")
        return names + ["logits"]

    def node_count(self, layer: int, with_heads: bool = False) -> int:
        """How many upstream nodes come before block `layer`'s heads (with its heads: before its
        MLP)."""
        return 1 + layer * self.block_nodes + (self.heads if with_heads else 0)

    def attention_inputs(self, layer: int) -> slice:
        start = layer * self.block_inputs
        return slice(start, start + self.block_inputs - 1)

    def mlp_input(self, layer: int) -> int:
        return (layer + 1) * self.block_inputs - 1

    @property
    def logits_input(self) -> int:
        return self.layers * self.block_inputs

    @cached_property
    def valid(self) -> np.ndarray:
        """(upstream, inputs) bool: which pairs are edges (the upstream node runs first)."""
        up_order = np.array([-1] + [2 * layer + (h == self.heads) for layer in range(self.layers)
                                    for h in range(self.block_nodes)])
        in_order = np.array([2 * layer + (i == self.block_inputs - 1) for layer in range(self.layers)
                             for i in range(self.block_inputs)] + [2 * self.layers])
        return up_order[:, None] < in_order[None, :]

    @cached_property
    def edges(self) -> np.ndarray:
        """(edges, 2): (upstream index, input index) of every edge, upstream-major."""
        return np.argwhere(self.valid)

    @property
    def edge_count(self) -> int:
        return len(self.edges)

    @cached_property
    def edge_names(self) -> list[str]:
        return [f"{self.upstream[u]}->{self.inputs[i]}" for u, i in self.edges]

    @cached_property
    def _edge_number(self) -> dict[str, int]:
        return {name: n for n, name in enumerate(self.edge_names)}

    def edge_index(self, name: str) -> int:
        """The number of edge `name` ('L3.H4->L5.H2.q') among `edges`, checked.

        Raises:
            GraphError: a name that is no edge of this graph, saying why.
        """
        if not isinstance(name, str):
            raise GraphError(f"edge {name!r}: give an edge by name, e.g. 'L0.H1->L2.mlp'.")
        if name in self._edge_number:
            return self._edge_number[name]
        upstream, _, downstream = name.partition("->")
        if upstream not in self.upstream or downstream not in self.inputs:
            raise GraphError(
                f"edge {name!r} is not in this model's graph: give 'UPSTREAM->INPUT' with an upstream node "
                f"(embed, L0.H0 .. L{self.layers - 1}.H{self.heads - 1}, L0.mlp ..) and an input (L0.H0.q, "
                f"L0.G0.k, L0.G0.v, L0.mlp, .., logits), e.g. {self.edge_names[-1]!r}."
            )
        raise GraphError(f"edge {name!r} runs from a later node into an earlier input ({upstream} is "
                         f"computed after {downstream} is read); an edge goes forward through the model.")

    @cached_property
    def changed_by(self) -> list[tuple[int, ...]]:
        """For each input, the upstream numbers of the nodes whose output it changes (the logits
        are number `len(upstream)`): its readers, and with coupled heads every head of the
        block it enters."""
        number = {name: n for n, name in enumerate(self.upstream)}
        number["logits"] = len(self.upstream)
        changed = []
        for i in range(len(self.inputs)):
            nodes = self.readers(i)
            if self.coupled_heads and ".H" in nodes[0]:
                layer = nodes[0].split(".")[0]
                nodes = [f"{layer}.H{h}" for h in range(self.heads)]
            changed.append(tuple(number[node] for node in nodes))
        return changed

    def readers(self, i: int) -> list[str]:
        """The nodes that input `i` feeds: its head, its group's heads, its MLP or 'logits'."""
        if i == self.logits_input:
            return ["logits"]
        layer, slot = divmod(i, self.block_inputs)
        if slot < self.heads:
            return [f"L{layer}.H{slot}"]
        if slot == self.block_inputs - 1:
            return [f"L{layer}.mlp"]
        group = (slot - self.heads) % self.groups
        size = self.heads // self.groups
        return [f"L{layer}.H{h}" for h in range(group * size, (group + 1) * size)]


def _weight(linear: nn.Module) -> mx.array:
    """A projection's (out, in) weight, dequantized where the model is quantized."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size,
                             linear.bits, mode=getattr(linear, "mode", "affine"))
    if not isinstance(linear, nn.Linear):
        raise GraphError(f"a projection of type {type(linear).__name__} is neither nn.Linear nor "
                         "nn.QuantizedLinear; mlxterp splits only those into heads.")
    return linear.weight


def _bias(linear: nn.Module) -> mx.array | None:
    return linear.get("bias")


@dataclass(frozen=True)
class _Block:
    """What a block computes with, split into heads: (H, d, Dh) query weights, (G, d, Dh) key and
    value weights, (H, Dh, d) output weights, and the modules used whole."""

    module: nn.Module
    attention: nn.Module
    wq: mx.array
    wk: mx.array
    wv: mx.array
    wo: mx.array
    biases: tuple  # of q, k, v, o (None where the model has none)
    mlp_norm: nn.Module  # the norm in front of the MLP
    attention_out_norm: nn.Module | None  # Gemma 3: normalises the heads' sum
    attention_out_weight: mx.array | None  # that norm's effective weight, (d,)
    mlp_out_norm: nn.Module | None  # Gemma 3: normalises the MLP's output


PRE_NORM = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma 3's extra norms


def _block(tree, index: int, layout) -> _Block:
    name = tree.blocks[index]
    module = tree.modules[name]
    missing = [child for child in PRE_NORM if f"{name}.{child}" not in tree.modules]
    if missing or layout.module != f"{name}.self_attn":
        children = sorted({n[len(name) + 1:].split(".")[0] for n in tree.modules if n.startswith(name + ".")})
        raise GraphError(
            f"block {index} ({name}) has the children {children}; mlxterp splits into heads and MLPs "
            f"only blocks whose residual stream is a plain sum, x + attention(norm(x)) then + "
            f"mlp(norm(x)), with the children {', '.join(PRE_NORM)} (Llama, Qwen 2/3, Gemma 3)."
        )
    if "mask" not in call_parameters(type(module)):
        raise GraphError(f"block {index} ({name}) takes no mask argument; mlxterp rebuilds blocks "
                         "called as block(x, mask, cache).")
    attention = module.self_attn
    heads, groups = layout.n_heads, layout.n_kv_heads
    wq, wk, wv, wo = (_weight(getattr(attention, p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    d = wq.shape[1]
    sandwich = all(hasattr(module, child) for child in SANDWICH)
    out_norm = module.post_attention_layernorm if sandwich else None
    out_weight = None
    if out_norm is not None:  # the effective weight w' of norm(x) = w' * x / rms(x): norm(1) * rms(1)
        eps = getattr(out_norm, "eps", None)
        if eps is None:
            raise GraphError(f"{name}.post_attention_layernorm has no eps; mlxterp splits a normalised "
                             "sum of heads only for RMS norms.")
        out_weight = out_norm(mx.ones((d,), dtype=mx.float32)) * (1 + eps) ** 0.5
    return _Block(
        module=module, attention=attention,
        wq=wq.reshape(heads, -1, d).swapaxes(1, 2), wk=wk.reshape(groups, -1, d).swapaxes(1, 2),
        wv=wv.reshape(groups, -1, d).swapaxes(1, 2), wo=wo.reshape(d, heads, -1).transpose(1, 2, 0),
        biases=tuple(_bias(getattr(attention, p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        mlp_norm=module.pre_feedforward_layernorm if sandwich else module.post_attention_layernorm,
        attention_out_norm=out_norm, attention_out_weight=out_weight,
        mlp_out_norm=module.post_feedforward_layernorm if sandwich else None,
    )


# Node groups (a block's heads, a block's MLP) whose differences from the donor are stacked into
# one array at a time: a product per group costs many small products, stacking after every group
# copies the growing stack 61 times. Measured on SmolLM2, 20 patched rows of 15 tokens: 5.5 s
# stacking after every group; 2.9, 2.5 and 2.7 s stacking every 4, 8 and 16 groups.
STACK_EVERY = 8


def wide(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype differences and gradients are kept in: float32, or float64 for a float64 model."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def _project(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    """(B, n, L, d) inputs through per-head weights (n, d, Dh): (B, n, L, Dh)."""
    out = x @ weight
    return out if bias is None else out + bias.reshape(weight.shape[0], 1, -1)


def _heads(block: _Block, norm: nn.Module, q_in: mx.array, k_in: mx.array, v_in: mx.array,
           mask) -> mx.array:
    """Each head's output (B, H, L, d) from its query input (B, H, L, d) and its group's key and
    value inputs (B, G, L, d): the attention module's own computation, head by head."""
    attention = block.attention
    q_bias, k_bias, v_bias, o_bias = block.biases
    queries = _project(norm(q_in), block.wq, q_bias)
    keys = _project(norm(k_in), block.wk, k_bias)
    values = _project(norm(v_in), block.wv, v_bias)
    if "q_norm" in attention:  # Qwen 3, Gemma 3: a norm of each head's vector
        queries, keys = attention.q_norm(queries), attention.k_norm(keys)
    queries, keys = attention.rope(queries), attention.rope(keys)
    mixed = scaled_dot_product_attention(queries, keys, values, cache=None, scale=attention.scale, mask=mask)
    out = mixed @ block.wo
    if o_bias is not None:
        out = out + o_bias / block.wo.shape[0]
    if block.attention_out_norm is not None:
        total = out.astype(mx.float32).sum(axis=1, keepdims=True)
        mean_square = mx.mean(mx.square(total), axis=-1, keepdims=True)
        inverse_rms = mx.rsqrt(mean_square + block.attention_out_norm.eps)
        out = (out * (block.attention_out_weight * inverse_rms)).astype(out.dtype)
    return out


@dataclass
class GraphRun:
    """What one forward of the graph does beyond the plain model.

    `weights` (rows or 1, upstream, inputs): W, with `donor` (rows or 1, upstream, L, d) the
    other run's node outputs; `deltas`: added to each input (zeros, to take gradients), one array
    per group of inputs read together, in the order of `Graph.inputs` (`EdgeRunner.delta_shapes`);
    `start` (rows, L, d): the first block's input instead of the embeddings; `record`: keep every
    node's output in `outputs` (rows, upstream, L, d); `position`: compute the logits at this
    position only (rows, 1, V), sparing the unembedding of the others.
    """

    weights: mx.array | None = None
    donor: mx.array | None = None
    deltas: list[mx.array] | None = None
    start: mx.array | None = None
    record: bool = False
    position: int | None = None
    outputs: mx.array | None = None


class EdgeRunner:
    """Runs a model as its graph (see the module's docstring).

    Raises:
        GraphError: a model whose blocks are not a plain residual sum of heads and MLPs,
            naming what was found.

    Example:
        >>> runner = EdgeRunner(model)
        >>> logits, outputs = runner.node_outputs(tokens)   # outputs: (1, upstream, L, d)
    """

    def __init__(self, model):
        self.model = model
        try:
            layouts = attention_layouts(model.tree)
        except AttentionCaptureError as err:
            raise GraphError(f"mlxterp cannot split this model into heads: {err}") from None
        if len({(layout.n_heads, layout.n_kv_heads) for layout in layouts}) != 1:
            raise GraphError("the blocks have different numbers of heads; mlxterp's graph has one "
                             "head count for every block.")
        self.blocks = [_block(model.tree, i, layout) for i, layout in enumerate(layouts)]
        self.graph = Graph(len(layouts), layouts[0].n_heads, layouts[0].n_kv_heads,
                           coupled_heads=self.blocks[0].attention_out_norm is not None)
        self.width = self.blocks[0].wq.shape[1]  # of the residual stream
        self.dtype = self.blocks[0].wq.dtype
        self.block_index = {name: i for i, name in enumerate(model.tree.blocks)}
        self.checked = False

    def __call__(self, tokens: mx.array, run: GraphRun) -> mx.array:
        """Logits (rows, L, V) of one forward of the graph, `tokens` (rows, L)."""
        graph, state = self.graph, {"groups": [], "diffs": [], "stacked": None, "reads": 0}

        def differences() -> list[tuple[int, mx.array]]:
            """(first node, (rows, n, L * d) donor-minus-current outputs) of every upstream node
            so far (each input reads all of them): the stacked differences, then the groups
            added since."""
            parts = [] if state["stacked"] is None else [(0, state["stacked"])]
            start = 0 if state["stacked"] is None else state["stacked"].shape[1]
            for diff in state["diffs"]:
                parts.append((start, diff))
                start += diff.shape[1]
            return parts

        def patch(x: mx.array, slots: slice) -> mx.array:
            """Inputs `slots` (rows, s, L, d): x plus the patched edges from every upstream node
            so far, plus the deltas. The patch is summed in float32 (float64 for a float64
            model) and rounded to the model's dtype once."""
            rows, length, width = x.shape
            count = slots.stop - slots.start
            out = mx.broadcast_to(x[:, None], (rows, count, length, width))
            if run.weights is not None:
                moved = 0
                for start, diff in differences():
                    weights = run.weights[:, start:start + diff.shape[1], slots].swapaxes(1, 2)
                    moved = moved + weights @ diff
                out = (out.astype(wide(x.dtype)) + moved.reshape(-1, count, length, width)).astype(x.dtype)
            if run.deltas is not None:  # one array per read: a slice of one array costs its size to backprop
                out = out + run.deltas[state["reads"]]
            state["reads"] += 1
            return out

        def add_nodes(outputs: mx.array) -> None:
            start = sum(group.shape[1] for group in state["groups"])
            state["groups"].append(outputs)
            if run.weights is not None:
                donor = run.donor[:, start:start + outputs.shape[1]]
                kept = wide(outputs.dtype)
                difference = donor.astype(kept) - outputs.astype(kept)
                state["diffs"].append(difference.reshape(*outputs.shape[:2], -1))
                # Stacked every few blocks: one product per block over most nodes, few copies.
                if len(state["diffs"]) == STACK_EVERY:
                    previous = [] if state["stacked"] is None else [state["stacked"]]
                    state["stacked"] = mx.concatenate([*previous, *state["diffs"]], axis=1)
                    state["diffs"] = []

        def block_call(name: str, module: nn.Module, args: tuple, kwargs: dict) -> mx.array:
            layer = self.block_index[name]
            names = call_parameters(type(module))
            x = args[0] if args else kwargs[names[0]]
            mask = args[names.index("mask")] if len(args) > names.index("mask") else kwargs.get("mask")
            block = self.blocks[layer]
            if layer == 0:
                if run.start is not None:
                    x = run.start.astype(x.dtype)
                add_nodes(x[:, None])
            attention_in = patch(x, graph.attention_inputs(layer))
            heads, groups = graph.heads, graph.groups
            q_in, k_in, v_in = (attention_in[:, part] for part in
                                (slice(0, heads), slice(heads, heads + groups), slice(heads + groups, None)))
            head_outputs = _heads(block, module.input_layernorm, q_in, k_in, v_in, mask)
            add_nodes(head_outputs)
            middle = x + head_outputs.sum(axis=1)
            mlp_slot = graph.mlp_input(layer)
            mlp_in = patch(middle, slice(mlp_slot, mlp_slot + 1))[:, 0]
            mlp_out = module.mlp(block.mlp_norm(mlp_in))
            if block.mlp_out_norm is not None:
                mlp_out = block.mlp_out_norm(mlp_out)
            add_nodes(mlp_out[:, None])
            out = middle + mlp_out
            if layer == graph.layers - 1:
                if run.record:
                    run.outputs = mx.concatenate(state["groups"], axis=1)
                logits_slot = slice(graph.logits_input, graph.logits_input + 1)
                out = patch(out, logits_slot)[:, 0]
                return out if run.position is None else out[:, run.position][:, None]
            return out

        with intercepted(self.model.tree, self.model.tree.blocks, block_call):
            return self.model.model(tokens)

    def delta_shapes(self, rows: int, length: int) -> list[tuple[int, ...]]:
        """The shapes of `GraphRun.deltas` for `rows` rows of `length` tokens: per block its
        attention inputs, then its MLP input; last, the logits."""
        graph, width = self.graph, self.width
        per_block = [(rows, graph.block_inputs - 1, length, width), (rows, 1, length, width)]
        return per_block * graph.layers + [(rows, 1, length, width)]

    def node_outputs(self, tokens: mx.array, start: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """(logits (rows, L, V), every node's output (rows, upstream, L, d)) of a plain forward,
        checked against the model's own logits the first time.

        Raises:
            GraphError: the rebuilt blocks do not compute what the model does.
        """
        run = GraphRun(record=True, start=start)
        logits = self(tokens, run)
        if not self.checked and start is None:
            self.check(tokens, logits)
        return logits, run.outputs

    def check(self, tokens: mx.array, logits: mx.array) -> None:
        """Refuse a model whose rebuilt blocks do not give its own logits: relative to the
        largest logit, at most the tolerance of the rebuilt attention probabilities (1e-4 in
        float32, 16 machine epsilons of a half-precision dtype)."""
        own = self.model.model(tokens).astype(mx.float32)
        error = (mx.abs(logits.astype(mx.float32) - own).max() / mx.maximum(mx.abs(own).max(), 1.0)).item()
        if not error <= mixing_tolerance(logits.dtype):
            raise GraphError(
                f"the model's blocks, rebuilt as a sum of heads and MLPs, give logits {error:.2g} (relative) "
                "away from the model's own: its blocks compute something else (a soft cap, a parallel "
                "attention and MLP, extra terms). mlxterp refuses to split it into a graph."
            )
        self.checked = True


# Bytes one row of a patched graph forward holds per (node, position, width) element: each node's
# output, its difference from the donor's (float32) and the temporaries of the patch (measured on
# SmolLM2: about 3 float32 copies).
ROW_BYTES_PER_ELEMENT = 12


def rows_per_forward(graph: Graph, length: int, width: int, memory_budget: int, max_batch: int | None) -> int:
    """How many patched rows one forward takes: `max_batch`, else what `memory_budget` holds."""
    if max_batch is not None:
        return max_batch
    per_row = ROW_BYTES_PER_ELEMENT * len(graph.upstream) * length * width
    return max(1, memory_budget // per_row)


def _base(runner: EdgeRunner, plan: Plan, pair: int, values: SweepValues) -> tuple[mx.array, mx.array]:
    """The pair's two plain runs: (logits at the measured position (2, V), node outputs (2, upstream,
    L, d)), rows CLEAN and CORRUPTED; their metric values go into `values`."""
    logits, outputs = runner.node_outputs(plan.tokens(pair))
    logits = logits[:, plan.position]
    values.set_base(pair, *measure(plan.metric_of(pair), logits, logits[plan.donor]))
    values.check_baseline(plan, pair)
    return logits, outputs


def edge_weights(graph: Graph, edge_sets, complement: bool) -> mx.array:
    """(rows, upstream, inputs) W: 1 on each row's edges (on every other edge: `complement`)."""
    weights = np.zeros((len(edge_sets), *graph.valid.shape), dtype=np.float32)
    for row, edges in enumerate(edge_sets):
        chosen = graph.edges[list(edges)]
        weights[row, chosen[:, 0], chosen[:, 1]] = 1
    if complement:
        weights = np.where(graph.valid, 1 - weights, 0).astype(np.float32)
    return mx.array(weights)


def run_edge_patches(runner: EdgeRunner, plan: Plan, rows: int, circuits: bool = False) -> SweepValues:
    """Exact metric values of patched runs of the graph; `plan.sites` holds each run's edge numbers.

    Edge patching (`circuits=False`): the receiving run, its chosen edges carrying the donor's
    node outputs. Circuits (`circuits=True`, a denoising plan): the clean run with every edge
    outside the circuit carrying the corrupted run's node outputs, so that its recovery is the
    circuit's faithfulness (0: the corrupted run, 100: the clean run).

    Example:
        >>> run_edge_patches(runner, replace(plan, sites=((0,), (5, 9))), rows=32).patched
    """
    values = SweepValues.empty(plan.pairs, len(plan.sites))
    graph = runner.graph
    for pair in range(plan.pairs):
        logits, outputs = _base(runner, plan, pair, values)
        base, source = (CLEAN, CORRUPTED) if circuits else (plan.receiver, plan.donor)
        tokens = plan.tokens(pair)[base:base + 1]
        for start in range(0, len(plan.sites), rows):
            chunk = plan.sites[start:start + rows]
            weights = edge_weights(graph, chunk, complement=circuits)
            run = GraphRun(weights=weights, donor=outputs[source:source + 1], position=plan.position)
            patched = runner(mx.repeat(tokens, len(chunk), axis=0), run)
            measured, noise = measure(plan.metric_of(pair), patched[:, 0], logits[plan.donor])
            values.patched[pair, start:start + len(chunk)] = measured
            values.patched_noise[pair, start:start + len(chunk)] = noise
    return values


def _input_gradients(runner: EdgeRunner, plan: Plan, pair: int, tokens: mx.array, start: mx.array | None,
                     reference: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """dm/d(input) of the graph's run of `tokens`, averaged over its rows ((inputs, L * d), float32
    or float64), with the run's logits at the measured position (rows, V) and node outputs."""
    metric = plan.metric_of(pair)

    def total(deltas: list[mx.array]):
        run = GraphRun(deltas=deltas, start=start, record=True, position=plan.position)
        logits = runner(tokens, run)[:, 0]
        return mx.sum(evaluate(metric, logits, reference)), (logits, run.outputs)

    zeros = [mx.zeros(shape, dtype=runner.dtype) for shape in runner.delta_shapes(*tokens.shape)]
    (_, (logits, outputs)), gradients = mx.value_and_grad(total)(zeros)
    gradients = mx.concatenate(gradients, axis=1)
    check_gradients({"inputs": gradients}, plan, runner.dtype)
    gradients = gradients.astype(wide(runner.dtype)).mean(axis=0).reshape(len(runner.graph.inputs), -1)
    return gradients, logits, outputs


def run_edge_gradients(runner: EdgeRunner, plan: Plan, method: str, steps: int) -> SweepValues:
    """Estimated metric values of patching each edge of `plan.sites` (one edge number each):
    the receiver's value plus (donor's - receiver's upstream output) . dm/d(input).

    `method="eap"`: the gradient at the receiving run (a plain forward of the donor prompt, one
    forward and backward of the receiving prompt, per pair). `method="eap-ig"`: its mean over
    `steps` runs whose first-block input lies on the line from the receiver's embeddings to the
    donor's (midpoints), as EAP-IG integrates on the inputs (a plain forward of both prompts,
    then `steps` rows forward and backward, per pair).

    Example:
        >>> run_edge_gradients(runner, plan, "eap-ig", steps=8).patched
    """
    values = SweepValues.empty(plan.pairs, len(plan.sites))
    graph = runner.graph
    chosen = graph.edges[[edges[0] for edges in plan.sites]]
    for pair in range(plan.pairs):
        tokens = plan.tokens(pair)
        receiver_tokens = tokens[plan.receiver:plan.receiver + 1]
        if method == "eap":  # the receiver's plain run is the gradient pass itself
            donor_logits, outputs = runner.node_outputs(tokens[plan.donor:plan.donor + 1])
            donor, reference = outputs, donor_logits[0, plan.position]
            gradients, receiver_logits, receiver = _input_gradients(runner, plan, pair, receiver_tokens,
                                                                    None, reference)
            logits = mx.stack([reference, receiver_logits[0]])
            logits = logits if plan.donor == CLEAN else logits[::-1]
            values.set_base(pair, *measure(plan.metric_of(pair), logits, reference))
            values.check_baseline(plan, pair)
        else:
            logits, outputs = _base(runner, plan, pair, values)
            receiver, donor = outputs[plan.receiver:plan.receiver + 1], outputs[plan.donor:plan.donor + 1]
            alphas = ((mx.arange(steps) + 0.5) / steps)[:, None, None]
            start = receiver[0, 0] + alphas * (donor[0, 0] - receiver[0, 0])  # node 0: the embeddings
            gradients, _, _ = _input_gradients(runner, plan, pair, mx.repeat(receiver_tokens, steps, axis=0),
                                               start, logits[plan.donor])
        change = (donor[0] - receiver[0]).astype(gradients.dtype).reshape(len(graph.upstream), -1)
        scores = np.array(change @ gradients.T, dtype=np.float64)
        receiver_value = (values.clean, values.corrupted)[plan.receiver][pair]
        values.patched[pair] = receiver_value + scores[chosen[:, 0], chosen[:, 1]]
        values.patched_noise[pair] = (values.clean_noise, values.corrupted_noise)[plan.receiver][pair]
    return values
