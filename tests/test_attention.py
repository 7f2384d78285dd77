"""Attention probabilities: checked against the model's own attention output, family by family.

The reference is independent of how mlxterp rebuilds the probabilities: the attention module's
output before `o_proj` (its input, `o_proj:input`) is what `mx.fast.scaled_dot_product_attention`
computed, and it must equal pattern @ V for every head, with V read from `v_proj` and each key
head repeated for its query heads.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from mlx_lm.models import llama

from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.errors import AttentionCaptureError, InputTypeError, NotRecordedError
from mlxterp.tracing.attention import attention_layouts

# |pattern @ V - o_proj input| measured at exactly 0 for every family here, random and real,
# with OpenBLAS (SkylakeX) and the reference BLAS: MLX's CPU attention computes the same float32
# products. A fused GPU kernel rounds differently; 1e-5, the bound, leaves room for that
# and is far below any real error (a wrong scale, mask or head order moves the output by 1e-2).
TOLERANCE = 1e-5


def attention_outputs(model: InterpretableModel, layout, trace) -> tuple[mx.array, mx.array]:
    """(pattern @ V, the attention output before o_proj), both (batch, seq, heads * head_dim)."""
    pattern = trace.activations[layout.key]
    values = trace.activations[f"{layout.module}.v_proj"]
    batch, length, _ = values.shape
    values = values.reshape(batch, length, layout.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = mx.repeat(values, layout.n_heads // layout.n_kv_heads, axis=1)
    mixed = (pattern @ values.astype(mx.float32)).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    return mixed, trace.activations[f"{layout.module}.o_proj:input"].astype(mx.float32)


def check_every_layer(model: InterpretableModel, tokens) -> list[np.ndarray]:
    """Check every layer's pattern against its attention output; return the patterns."""
    plain = model(tokens)
    patterns = []
    with model.trace(tokens, capture_attention=True) as trace:
        assert mx.array_equal(trace.output, plain)  # reading the attention changes nothing
        for layout in attention_layouts(model.tree):
            mixed, reference = attention_outputs(model, layout, trace)
            assert mx.abs(mixed - reference).max().item() < TOLERANCE, layout.module
            pattern = np.array(trace.activations[layout.key])
            length = len(tokens[0]) if isinstance(tokens[0], list) else tokens.shape[1]
            assert pattern.shape == (1, layout.n_heads, length, length)
            np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-6)
            assert np.all(np.triu(pattern, k=1) == 0)  # causal: no query sees a later key
            patterns.append(pattern)
    return patterns


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_pattern_times_values_is_the_attention_output(family):
    model = InterpretableModel(tiny_model(family))
    tokens = mx.array([[1, 7, 3, 9, 12, 4, 8, 2, 5, 30]])
    patterns = check_every_layer(model, tokens)
    if family == "gemma3_text":
        # Sliding-window layers (window 4, all but every sixth) see only the last 4 keys.
        layouts = attention_layouts(model.tree)
        sliding = [i for i, layout in enumerate(layouts) if model.tree.modules[layout.module].is_sliding]
        assert sliding == [0, 1, 2, 3, 4, 6]
        for i, pattern in enumerate(patterns):
            assert np.all(np.tril(pattern, k=-4) == 0) == (i in sliding)


def test_real_models(smollm2, gemma3):
    for base, tokenizer in (smollm2, gemma3):
        model = InterpretableModel(base, tokenizer)
        check_every_layer(model, [tokenizer.encode("When Mary and John went to the store, John gave")])


def test_one_layer_by_key_and_errors(tiny_smol):
    with tiny_smol.trace("Hello world", capture=["layers.1.self_attn:pattern"]) as trace:
        assert list(trace.activations) == ["model.model.layers.1.self_attn:pattern", "output"]
        with pytest.raises(NotRecordedError, match="capture_attention=True"):
            trace.activations["layers.0.self_attn:pattern"]
    with pytest.raises(AttentionCaptureError, match=r"'model.model.layers.1.mlp:pattern'.*attention modules"):
        tiny_smol.trace("Hello", capture=["layers.1.mlp:pattern"])
    with pytest.raises(InputTypeError, match="True or False"):
        tiny_smol.trace("Hello", capture_attention="yes")


def test_a_family_without_rope_is_refused():
    model = InterpretableModel(tiny_model("gpt2"))
    with pytest.raises(AttentionCaptureError, match=r"(?s)block 0.*children rope.*children are \['attn'"):
        model.trace([[1, 2, 3]], capture_attention=True)


def test_soft_capped_scores_are_refused():
    model = InterpretableModel(tiny_model("gemma2"))
    with pytest.raises(AttentionCaptureError, match=r"layers.0.self_attn soft-caps its attention scores"):
        model.trace([[1, 2, 3, 4, 5]], capture_attention=True)


class Bidirectional(llama.Attention):
    """Attention that ignores the block's causal mask: every query sees every key."""

    def __call__(self, x, mask=None, cache=None):
        return super().__call__(x, None, cache)


def test_another_formula_is_caught_by_the_check():
    """A model whose attention is not what mlxterp rebuilds (here: bidirectional, while the
    block passes "causal") fails the check of pattern @ V against its own output."""
    base = tiny_model("llama")
    for block in base.model.layers:
        block.self_attn.__class__ = Bidirectional
    model = InterpretableModel(base)
    with pytest.raises(AttentionCaptureError, match=r"layers.0.self_attn do not reproduce its output"):
        with model.trace([[1, 2, 3, 4, 5]], capture_attention=True):
            pass


def test_half_precision_and_a_head_ablation():
    """bfloat16 rounds the model's own attention (relative error about 1e-2 on SmolLM2): the
    check allows 16 epsilons of the dtype. Ablating a head at o_proj's input changes the output,
    not the probabilities, and is no reason to refuse them."""
    base = tiny_model("llama")
    base.set_dtype(mx.bfloat16)
    model = InterpretableModel(base)
    tokens = [[1, 7, 3, 9, 12, 4]]
    with model.trace(tokens, capture_attention=True) as trace:
        plain = trace.activations["layers.1.self_attn:pattern"]
    ablate = {"layers.1.self_attn.o_proj:input": iv.zero_out}
    with model.trace(tokens, capture_attention=True, interventions=ablate) as trace:
        assert mx.array_equal(trace.activations["layers.1.self_attn:pattern"], plain)
        assert plain.dtype == mx.float32


def test_a_failed_capture_leaves_the_model_as_it_was(tiny_smol):
    from conftest import assert_model_untouched, parameters_snapshot

    before = parameters_snapshot(tiny_smol.model)
    plain = tiny_smol("Hello world")

    def fail(x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        with tiny_smol.trace("Hello world", capture_attention=True, interventions={"layers.1.mlp": fail}):
            pass
    assert_model_untouched(tiny_smol.model, before)
    assert mx.array_equal(tiny_smol("Hello world"), plain)
