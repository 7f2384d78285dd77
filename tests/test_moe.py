"""Mixtures of experts: three of mlx-lm's MoE families, in float32 and quantized to 4 bits,
traced bit for bit, swept by the engine as by the naive procedure, and run through the guide's
calls."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import MOE_FAMILIES, SMOLLM2_VOCAB, tiny_model

from mlxterp import InterpretableModel

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"
# The MoE block's name in each family's decoder layer.
MOE_BLOCK = {"qwen3_moe": "mlp", "olmoe": "mlp", "mixtral": "block_sparse_moe"}


def _moe(family: str, bits: int | None, tokenizer) -> InterpretableModel:
    base = tiny_model(family, vocab_size=SMOLLM2_VOCAB)
    if bits:
        nn.quantize(base, group_size=32, bits=bits)  # the experts become QuantizedSwitchLinear
    return InterpretableModel(base, tokenizer)


def _routing_margin(model: InterpretableModel, family: str, text: str) -> float:
    """The smallest gap, over tokens and layers, between the k-th and (k+1)-th router logit: a
    gap far above float32 noise means no batch layout can route a token differently."""
    keys = [f"{block}.{MOE_BLOCK[family]}.gate" for block in model.tree.blocks]
    with model.trace(text, capture=keys) as trace:
        logits = [np.sort(np.array(trace.activations[key].astype(mx.float32)), axis=-1) for key in keys]
    top_k = 2  # every tiny config routes each token to 2 experts
    return float(min((gates[..., -top_k] - gates[..., -top_k - 1]).min() for gates in logits))


@pytest.mark.parametrize("bits", [None, 4], ids=["float32", "4-bit"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_traced_moe_computes_what_the_bare_model_computes(family, bits, smollm2):
    model = _moe(family, bits, smollm2[1])
    tokens = mx.array([smollm2[1].encode(CLEAN)])
    bare = model.model(tokens)
    block = MOE_BLOCK[family]
    with model.trace(tokens) as trace:
        traced = model.output.save()
        # the router's logits and the experts' input are read like any module's
        router = trace.activations[f"layers.1.{block}.gate"]
        recorded = set(trace.activations)
    assert mx.array_equal(bare, traced).item()
    assert router.shape[-1] == model.tree.modules[f"{model.tree.blocks[1]}.{block}.gate"].weight.shape[0]
    assert f"{model.tree.blocks[1]}.{block}.switch_mlp:input" in recorded


@pytest.mark.kernels
@pytest.mark.parametrize("bits", [None, 4], ids=["float32", "4-bit"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_engine_sweeps_a_moe_as_the_naive_procedure_does(family, bits, smollm2):
    model = _moe(family, bits, smollm2[1])
    # Routing is discontinuous: a tie in the router could send a token elsewhere in one batch
    # layout than in another. These prompts' smallest top-k gap is far above float32 noise.
    for text in (CLEAN, CORRUPTED):
        assert _routing_margin(model, family, text) > 1e-4
    options = {"component": MOE_BLOCK[family], "over": ("layer", "position"), "metric": "kl"}
    fast = model.patching_sweep(CLEAN, CORRUPTED, **options)
    naive = model.patching_sweep(CLEAN, CORRUPTED, naive=True, **options)
    assert len(fast.sites) == 3 * len(smollm2[1].encode(CLEAN))
    assert np.abs(fast.mean - naive.mean).max() <= 0.01


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_guides_calls_run_on_a_quantized_moe(family, smollm2):
    model = _moe(family, 4, smollm2[1])
    block = MOE_BLOCK[family]
    with model.trace(CLEAN) as trace:
        hidden = model.layers[1].output.save()
        moe_out = trace.activations[f"layers.1.{block}"]
    assert hidden.shape[-1] == 32 and moe_out.shape == hidden.shape
    results = model.activation_patching(CLEAN, CORRUPTED, component=block)
    assert len(results) == 3 and all(np.isfinite(v) for v in results.values())
    whole = model.patching_sweep(CLEAN, CORRUPTED, component="output", metric="kl")
    assert whole.mean[-1] == pytest.approx(100.0, abs=0.01)  # the last block's output is everything
