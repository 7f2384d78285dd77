"""Shared fixtures: the bundled real model (loaded once) and tiny random models of each family."""

from __future__ import annotations

import functools
import importlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import HealthCheck, settings

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
    # soft-caps its attention scores and its logits (set low so that the cap matters)
    "gemma2": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, vocab_size=101,
                   attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
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
    # mixtures of experts: softmax then top-k (qwen3_moe, olmoe), top-k then softmax (mixtral)
    "qwen3_moe": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                      moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=101, num_key_value_heads=2,
                      head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
                      max_position_embeddings=128, norm_topk_prob=True),
    "mixtral": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=101),
    "olmoe": dict(hidden_size=32, num_hidden_layers=3, intermediate_size=32, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101, num_experts=8,
                  num_experts_per_tok=2, head_dim=8),
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


def tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised mlx-lm model of `family`, evaluated; `overrides` change its config."""
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(model_type=family, **{**FAMILY_CONFIGS[family], **overrides}))
    mx.eval(model.parameters())
    return model


# Set on a machine the bundled models cannot travel to (the lent GPU machine, whose runs carry
# 64 MiB): tests that need them are skipped there instead of failing. Never set in CI.
WITHOUT_BUNDLED = os.environ.get("MLXTERP_TESTS_WITHOUT_BUNDLED_MODELS") == "1"


def bundled(name: str):
    if WITHOUT_BUNDLED:
        pytest.skip("MLXTERP_TESTS_WITHOUT_BUNDLED_MODELS=1: the bundled models are not here")
    return mlxterp.load(name, dtype="float32")


@pytest.fixture(scope="session")
def smollm2():
    """(bare model, tokenizer) of the bundled SmolLM2-135M in float32."""
    return bundled("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """(bare model, tokenizer) of the bundled Gemma 3 270M in float32."""
    return bundled("gemma3-270m")


SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="session")
def tiny_smol(smollm2) -> InterpretableModel:
    """A random 2-layer llama (hidden 32) whose vocabulary is SmolLM2's, wrapped with SmolLM2's
    real tokenizer: real text runs through it at a thousandth of SmolLM2's cost."""
    _, tokenizer = smollm2
    base = tiny_model("llama", seed=1, vocab_size=SMOLLM2_VOCAB, num_hidden_layers=2)
    return InterpretableModel(base, tokenizer=tokenizer)


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


@contextmanager
def hooked_calls(model: nn.Module, hook: Callable) -> Iterator[None]:
    """Route every call of every module of `model` through `hook(name, run, args, kwargs)`, where
    `name` is the module's full name as mlxterp gives it (`model.model.layers.0.mlp`) and
    `run(*args, **kwargs)` calls the module itself.

    It patches `__call__` on the modules' classes, not on the instances: independent of mlxterp's
    probes (instance attributes), so a test can build a reference forward, or inject a fault,
    without using the mechanism it tests. Restored on exit, whatever happened inside.
    """
    names = {id(m): f"model.{path}" if path else "model" for path, m in model.named_modules()}
    classes = {type(m) for _, m in model.named_modules()}
    # Each class's own __call__ (None: inherited), and the one it resolves to before patching,
    # so a subclass is never wrapped around its already-wrapped base.
    own = {cls: cls.__dict__.get("__call__") for cls in classes}
    resolved = {cls: cls.__call__ for cls in classes}

    def wrapper(original):
        @functools.wraps(original)  # keeps the signature, which the engine reads
        def __call__(self, *args, **kwargs):
            name = names.get(id(self))
            if name is None:  # a module of another model
                return original(self, *args, **kwargs)
            return hook(name, lambda *a, **k: original(self, *a, **k), args, kwargs)

        return __call__

    try:
        for cls in classes:
            cls.__call__ = wrapper(resolved[cls])
        yield
    finally:
        for cls, method in own.items():
            if method is None:
                del cls.__call__
            else:
                cls.__call__ = method


# -- hypothesis: property-based tests (tests/test_generated_inputs.py) --------------------------

# The "ci" profile runs by default: derandomized, so every run generates the same inputs, and no
# deadline, since a sweep's time varies with its sites. "long" generates 10x the examples:
#   .venv/bin/python -m pytest tests/test_generated_inputs.py --hypothesis-profile=long
CI_EXAMPLES = 100
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=CI_EXAMPLES, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("long", settings.get_profile("ci"), max_examples=10 * CI_EXAMPLES)
settings.load_profile("ci")  # hypothesis's --hypothesis-profile option, if given, loads another

# Calls made by the property tests, how many passed, and what the passing ones gave (a result
# equal to the reference, or which MlxterpError); reported after the run.
GENERATED_CALLS = {"generated": 0, "passed": 0, "outcomes": Counter()}


def pytest_terminal_summary(terminalreporter) -> None:
    if GENERATED_CALLS["generated"]:
        outcomes = ", ".join(f"{name} {count}" for name, count in
                             GENERATED_CALLS["outcomes"].most_common())
        terminalreporter.write_line(
            f"generated inputs (hypothesis profile {settings.get_current_profile_name()!r}): "
            f"generated {GENERATED_CALLS['generated']}, passed {GENERATED_CALLS['passed']} "
            f"({outcomes})"
        )
