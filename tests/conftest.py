"""Shared fixtures: the bundled real model (loaded once) and tiny random models of each family."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlxterp
from mlxterp import InterpretableModel

# Small random configs of the mlx-lm families mlxterp is tested on.
FAMILY_CONFIGS = {
    "llama": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=101, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  vocab_size=101),
    "qwen3": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  vocab_size=101, max_position_embeddings=128, head_dim=8,
                  tie_word_embeddings=True, rope_theta=10000.0),
    "gemma3_text": dict(hidden_size=32, num_hidden_layers=7, intermediate_size=64,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                        vocab_size=101, sliding_window=4, query_pre_attn_scalar=8),
    "gpt2": dict(n_ctx=64, n_embd=32, n_head=4, n_layer=3, n_positions=64,
                 layer_norm_epsilon=1e-5, vocab_size=101),
    # calls its blocks as block(h, attn_scale, mask, cache=c)
    "ministral3": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                       vocab_size=101, max_position_embeddings=128, rope_parameters={
                           "rope_theta": 10000.0, "llama_4_scaling_beta": 0.5,
                           "original_max_position_embeddings": 4, "rope_type": "default"}),
    # calls its blocks with keywords only: block(inputs=h, mask=mask, cache=c)
    "gptj": dict(n_embd=32, vocab_size=101, n_positions=64, n_head=4, rotary_dim=4, n_layer=3),
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A randomly initialised mlx-lm model of `family`, evaluated."""
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(model_type=family, **FAMILY_CONFIGS[family]))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def smollm2():
    """(bare model, tokenizer) of the bundled SmolLM2-135M in float32."""
    return mlxterp.load("smollm2-135m")


@pytest.fixture
def wrapped(smollm2) -> InterpretableModel:
    base, tokenizer = smollm2
    return InterpretableModel(base, tokenizer=tokenizer)


def parameters_snapshot(model: nn.Module) -> dict:
    """Parameter arrays by name: a test compares these before and after a call."""
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def assert_model_untouched(model: nn.Module, before: dict) -> None:
    """The module tree has no probes left and every parameter is the same array as before."""
    from mlx.utils import tree_flatten

    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    for _, module in model.named_modules():
        # A probe is an instance attribute shadowing one of the module's own children.
        leftovers = [k for k in vars(module) if k in module]
        assert not leftovers, f"probes left on {type(module).__name__}: {leftovers}"
