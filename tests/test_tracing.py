"""Tracing: names, recording, interventions, and the model left exactly as it was."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FAMILY_CONFIGS, assert_model_untouched, parameters_snapshot, tiny_model

from mlxterp import InterpretableModel, Site
from mlxterp import interventions as iv
from mlxterp.errors import (
    InputError,
    NotReachedError,
    NotRecordedError,
    SiteError,
    TraceError,
    UnknownModuleError,
)

TOKENS = mx.array([[1, 5, 7, 9, 2, 3]])


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_traced_logits_equal_bare_and_every_module_is_named(family):
    base = tiny_model(family)
    model = InterpretableModel(base)
    bare = base(TOKENS)
    wrapped = model(TOKENS)
    with model.trace(TOKENS) as trace:
        traced = model.output.save()
        recorded = set(trace.activations)
    mx.eval(bare, wrapped, traced)
    assert mx.array_equal(bare, wrapped).item()
    assert mx.array_equal(bare, traced).item()
    # Every named module's own path is the model's path, and a called module is recorded.
    for path, module in base.named_modules():
        if path:
            assert model.tree.modules[f"model.{path}"] is module
    blocks = {"gpt2": "model.model.h", "gptj": "model.model.h"}.get(
        family, "model.model.layers")
    assert model.tree.blocks_name == blocks
    assert len(model.layers) == FAMILY_CONFIGS[family].get(
        "num_hidden_layers", FAMILY_CONFIGS[family].get("n_layer"))
    assert f"{blocks}.0" in recorded and f"{blocks}.0:input" in recorded


def test_gpt2_uses_its_own_names():
    model = InterpretableModel(tiny_model("gpt2"))
    assert model.resolve("h.1.attn") == "model.model.h.1.attn"
    with pytest.raises(UnknownModuleError, match="no module matches 'layers.1.self_attn'"):
        model.resolve("layers.1.self_attn")


def test_user_module_in_a_list_is_traced_and_patched():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4) for _ in range(3)]

        def __call__(self, x):
            for layer in self.layers:
                x = nn.relu(layer(x))
            return x

    mx.random.seed(1)
    stack = Stack()
    model = InterpretableModel(stack)
    x = mx.random.normal((2, 4))
    with model.trace(x):
        first = model.layers[0].output.save()
    with model.trace(x, interventions={"layers.1": iv.zero_out}):
        out = model.output.save()
    assert len(model.layers) == 3
    assert mx.array_equal(first, stack.layers[0](x)).item()
    assert mx.array_equal(out, nn.relu(stack.layers[2](mx.zeros((2, 4))))).item()


def test_short_keys_and_errors(wrapped):
    assert wrapped.resolve("layers.10.mlp") == "model.model.layers.10.mlp"
    assert wrapped.resolve("10.mlp.down_proj") == "model.model.layers.10.mlp.down_proj"
    with pytest.raises(UnknownModuleError, match="Closest names: layers.1.mlp"):
        wrapped.resolve("layers.1.mpl")
    with pytest.raises(UnknownModuleError, match="matches several modules"):
        wrapped.resolve("mlp")


def test_activation_values_match_a_manual_forward(wrapped):
    base = wrapped.model
    ids = mx.array([wrapped.encode("The capital of France is")])
    with wrapped.trace(ids) as trace:
        emb = trace.activations["embed_tokens"]
        block0 = trace.activations["model.model.layers.0"]
        mlp_in = trace.activations["layers.0.mlp:input"]
        o_in = trace.activations["layers.0.self_attn.o_proj:input"]
        layer0_out = wrapped.layers[0].output.save()
        mlp0 = wrapped.layers[0].mlp.output.save()
        attn0 = wrapped.layers[0].self_attn.output.save()
    layer = base.model.layers[0]
    assert mx.array_equal(emb, base.model.embed_tokens(ids)).item()
    assert mx.array_equal(layer0_out, block0).item()
    assert mx.array_equal(mlp0, layer.mlp(mlp_in)).item()
    h = emb + attn0
    assert mx.allclose(mlp_in, layer.post_attention_layernorm(h)).item()
    assert mx.allclose(layer0_out, h + mlp0).item()
    assert mx.allclose(attn0, layer.self_attn.o_proj(o_in)).item()
    assert o_in.shape == (1, ids.shape[1], 576)  # 9 heads x 64, concatenated


def test_capture_restricts_what_is_kept(wrapped):
    with wrapped.trace("Paris is the capital of France", capture=["layers.3.mlp"]) as trace:
        assert set(trace.activations) == {"model.model.layers.3.mlp", "output"}
        with pytest.raises(NotRecordedError, match="capture"):
            trace.activations["layers.4.mlp"]


def test_intervention_changes_only_what_it_should(wrapped):
    text = "Paris is the capital of France"
    with wrapped.trace(text) as trace:
        clean = trace.output
    with wrapped.trace(text, interventions={"layers.29.mlp": iv.zero_out}) as trace:
        zeroed_mlp = trace.activations["layers.29.mlp"]
        before = trace.activations["layers.28"]
        out = trace.output
    with wrapped.trace(text) as trace:
        before_clean = trace.activations["layers.28"]
    assert float(mx.abs(zeroed_mlp).max()) == 0.0
    assert mx.array_equal(before, before_clean).item()
    assert not mx.allclose(out, clean).item()


def test_input_intervention_on_o_proj_heads(wrapped):
    """Zeroing all head outputs at o_proj's input zeroes the attention output."""
    with wrapped.trace("Paris is", interventions={"layers.2.self_attn.o_proj:input": iv.zero_out}
                       ) as trace:
        attn = trace.activations["layers.2.self_attn"]
    assert float(mx.abs(attn).max()) == 0.0


def test_a_site_is_an_intervention_key_narrowed_to_its_positions_and_head(wrapped):
    """A Site key applies the intervention to the site's part only, as iv.at_positions does
    for positions (both go through positions_mask; the same ops on the same rows, so equal)."""
    text = "Paris is the capital of France"
    with wrapped.trace(text, interventions={Site("layers.3.mlp", positions=(2, -1)): iv.zero_out}) as trace:
        by_site = trace.activations["layers.3.mlp"]
        site_output = trace.output
    with wrapped.trace(text, interventions={"layers.3.mlp": iv.at_positions([2, -1], iv.zero_out)}) as trace:
        by_positions = trace.activations["layers.3.mlp"]
        positions_output = trace.output
    assert mx.array_equal(by_site, by_positions).item()
    assert mx.array_equal(site_output, positions_output).item()
    assert float(mx.abs(by_site[0, 2]).max()) == 0.0 and float(mx.abs(by_site[0, 1]).max()) > 0

    head = Site("layers.2.self_attn.o_proj", is_input=True, head=1, n_heads=9)
    with wrapped.trace(text, interventions={head: iv.zero_out}) as trace:
        heads = trace.activations["layers.2.self_attn.o_proj:input"]
    width = heads.shape[-1] // 9
    assert float(mx.abs(heads[..., width:2 * width]).max()) == 0.0
    assert float(mx.abs(heads[..., :width]).max()) > 0  # head 0 untouched

    before = parameters_snapshot(wrapped.model)
    with pytest.raises(SiteError, match=r"positions \[9\] are out of range for 6 tokens"):
        with wrapped.trace(text, interventions={Site("layers.3.mlp", positions=(9,)): iv.zero_out}):
            pass
    assert_model_untouched(wrapped.model, before)


def test_module_called_several_times():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def __call__(self, x):
            return self.proj(self.proj(x))

    mx.random.seed(2)
    net = Shared()
    model = InterpretableModel(net)
    x = mx.random.normal((1, 3))
    with model.trace(x) as trace:
        first, second = trace.activations["proj"], trace.activations["proj#1"]
        assert mx.array_equal(trace.activations["proj#0"], first).item()
    assert mx.allclose(first, net.proj(x)).item()
    assert mx.allclose(second, net.proj(net.proj(x))).item()
    with model.trace(x, interventions={"proj#1": iv.zero_out}):
        out = model.output.save()
    assert float(mx.abs(out).max()) == 0.0
    with model.trace(x, interventions={"proj": iv.scale(0.0)}) as trace:
        # without #k the intervention applies to every call: proj(0) is the bias
        assert mx.array_equal(trace.activations["proj"], mx.zeros((1, 3))).item()
    with pytest.raises(NotReachedError, match="never ran"):
        with model.trace(x, interventions={"proj#2": iv.zero_out}):
            pass
    assert_model_untouched(net, parameters_snapshot(net))


def test_steering_vector_keeps_the_model_dtype():
    half = InterpretableModel(tiny_model("llama"))
    half.model.set_dtype(mx.bfloat16)
    vec = mx.ones((32,), dtype=mx.float32)
    with half.trace(mx.array([[1, 2, 3]]), interventions={"layers.0": iv.add_vector(vec)}) as t:
        assert t.activations["layers.0"].dtype == mx.bfloat16
        assert t.activations["layers.1"].dtype == mx.bfloat16


def test_gradients_flow_through_a_traced_forward():
    base = tiny_model("llama")
    model = InterpretableModel(base)

    def loss(params):
        base.update(params)
        with model.trace(TOKENS, interventions={"layers.1.mlp": iv.scale(2.0)}) as trace:
            return trace.output[0, -1, 0]

    value, grads = mx.value_and_grad(loss)(base.trainable_parameters())
    mx.eval(value, grads)
    grad = grads["model"]["layers"][1]["mlp"]["down_proj"]["weight"]
    assert float(mx.abs(grad).sum()) > 0
    # nn.value_and_grad and mx.compile over the bare model work after the trace
    compiled = mx.compile(lambda x: base(x))
    assert mx.allclose(compiled(TOKENS), base(TOKENS)).item()
    nn.value_and_grad(base, lambda x: base(x).sum())(TOKENS)


# -- bad input: each a clear error, the model untouched ------------------------------------------


def _bad_calls(model: InterpretableModel):
    good = "Paris is the capital of France"
    return {
        "unknown key": (lambda: model.trace(good, interventions={"layers.1.mpl": iv.zero_out}),
                        UnknownModuleError, "Closest names"),
        "ambiguous key": (lambda: model.trace(good, interventions={"mlp": iv.zero_out}),
                          UnknownModuleError, "several"),
        "not callable": (lambda: model.trace(good, interventions={"layers.1.mlp": 3.0}),
                         TypeError, "not a function"),
        "unequal lengths": (lambda: model.trace([good, "Hi"]), InputError, "same number"),
        "id out of range": (lambda: model.trace([[1, 2, 999999]]), InputError, r"\[0, 49152\)"),
        "empty": (lambda: model.trace([]), InputError, r"type list \(empty\); give a string"),
        "empty text": (lambda: model.trace(""), InputError, "no tokens"),
    }


@pytest.mark.parametrize("case", ["unknown key", "ambiguous key", "not callable",
                                  "unequal lengths", "id out of range", "empty", "empty text"])
def test_bad_input_gives_clear_error_and_leaves_model(wrapped, case):
    before = parameters_snapshot(wrapped.model)
    call, error, message = _bad_calls(wrapped)[case]
    with pytest.raises(error, match=message):
        with call():
            pass
    assert_model_untouched(wrapped.model, before)
    with wrapped.trace("Paris is") as trace:  # the model still traces
        assert trace.output.shape[1] == 2


def test_errors_inside_the_forward_restore_the_model(wrapped):
    before = parameters_snapshot(wrapped.model)
    shapes = r"returned shape \(1, 2, 2\); the activation has shape \(1, 2, 576\)"
    with pytest.raises(TraceError, match=shapes):
        with wrapped.trace("Paris is", interventions={"layers.5.mlp": lambda x: x[:, :, :2]}):
            pass
    with pytest.raises(ZeroDivisionError):
        with wrapped.trace("Paris is", interventions={"layers.5.mlp": lambda x: 1 / 0}):
            pass
    with pytest.raises(KeyError):
        with wrapped.trace("Paris is") as trace:
            trace.activations["layers.5.mlp"]
            raise KeyError("user code fails inside the block")
    assert_model_untouched(wrapped.model, before)
    ids = mx.array([wrapped.encode("Paris is")])
    assert mx.array_equal(wrapped(ids), wrapped.model(ids)).item()


def test_text_without_tokenizer():
    model = InterpretableModel(tiny_model("llama"))
    with pytest.raises(InputError, match="needs a tokenizer"):
        model.trace("hello")


def test_nested_trace_and_use_after_block(wrapped):
    with wrapped.trace("Paris is") as trace:
        with pytest.raises(TraceError, match="cannot be nested"):
            with wrapped.trace("Paris is"):
                pass
        saved = wrapped.output.save()
        kept = trace.activations
    with pytest.raises(TraceError, match="only available inside"):
        _ = trace.activations
    with pytest.raises(TraceError, match="only available inside"):
        wrapped.output.save()
    with pytest.raises(TraceError, match="already run"):
        with trace:
            pass
    assert saved.shape == (1, 2, 49152)  # saved arrays outlive the block
    assert len(kept) == 0  # a view kept past the block holds nothing alive
    unused = wrapped.trace("Paris is")  # made but never entered: blocks nothing
    with wrapped.trace("London is") as trace:
        assert trace.output.shape == (1, 2, 49152)
    del unused
    with pytest.raises(IndexError, match="30 layers"):
        wrapped.layers[30]
    with pytest.raises(UnknownModuleError, match="sub-modules are"):
        _ = wrapped.layers[0].mlpp


def test_tokenizer_helpers(wrapped):
    assert wrapped.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert wrapped.to_str_tokens("The capital of France is") == [
        "The", " capital", " of", " France", " is"]
    assert wrapped.token_to_str(7042) == " Paris"
    assert wrapped.decode([504, 3575]) == "The capital"
    assert wrapped.vocab_size == 49152


def test_inputs_forms_agree(wrapped):
    ids = wrapped.encode("Paris is the capital")
    outs = []
    for inputs in ("Paris is the capital", ids, [ids], mx.array(ids), mx.array([ids]), np.array([ids])):
        with wrapped.trace(inputs) as trace:
            outs.append(trace.output)
    assert all(np.array_equal(np.array(outs[0]), np.array(o)) for o in outs[1:])
    with wrapped.trace(["Paris is the capital", "London is the capital"]) as trace:
        assert trace.output.shape[0] == 2


def test_a_module_replaced_after_wrapping_is_reported():
    from mlxterp.errors import MlxterpError

    base = tiny_model("llama")
    model = InterpretableModel(base)
    base.model.layers[1].mlp = nn.Identity()  # surgery after wrapping
    with pytest.raises(MlxterpError, match="was replaced after the model was wrapped"):
        with model.trace(TOKENS):
            pass
    assert_model_untouched(base, parameters_snapshot(base))
    rewrapped = InterpretableModel(base)
    with rewrapped.trace(TOKENS) as trace:
        assert mx.array_equal(trace.output, base(TOKENS)).item()
