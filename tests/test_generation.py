"""Generation with interventions: mlx-lm's tokens, absolute positions, a clean model after."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import SMOLLM2_VOCAB, assert_model_untouched, parameters_snapshot, tiny_model
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

import mlxterp
from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.errors import (
    GenerationError,
    InputTypeError,
    InstalledInterventionError,
    NotReachedError,
    TraceError,
)

PROMPT = "The capital of France is"


def mlx_lm_tokens(model: InterpretableModel, prompt: str, max_tokens: int, temperature: float,
                  seed: int | None) -> list[int]:
    """mlx-lm's own loop on the bare model, up to its end-of-sequence token: the reference."""
    if seed is not None:
        mx.random.seed(seed)
    steps = generate_step(mx.array(model.encode(prompt)), model.model, max_tokens=max_tokens,
                          sampler=make_sampler(temp=temperature))
    tokens = [token for token, _ in steps]
    stops = [i for i, t in enumerate(tokens) if t in model.tokenizer.eos_token_ids]
    return tokens[:stops[0]] if stops else tokens


@pytest.fixture(scope="module")
def gemma3() -> InterpretableModel:
    return InterpretableModel(*mlxterp.load("gemma3-270m"))


@pytest.mark.parametrize("temperature, seed", [(0.0, None), pytest.param(0.8, 7, marks=pytest.mark.slow)])
def test_no_intervention_writes_what_mlx_lm_writes(wrapped, temperature, seed):
    out = wrapped.generate(PROMPT, max_tokens=16, temperature=temperature, seed=seed)
    assert out.tokens == mlx_lm_tokens(wrapped, PROMPT, 16, temperature, seed)
    assert len(out.tokens) == 16 and out.finish_reason == "length"
    assert out.prompt_tokens == wrapped.encode(PROMPT)
    if seed is not None:
        mx.random.seed(seed)
    # mlx-lm's `generate` streams the same text, less the first token's leading space
    assert mlx_lm_generate(wrapped.model, wrapped.tokenizer, PROMPT, max_tokens=16,
                           sampler=make_sampler(temp=temperature)) == out.text.removeprefix(" ")


@pytest.mark.slow
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 3)])
def test_no_intervention_writes_what_mlx_lm_writes_on_gemma3(gemma3, temperature, seed):
    """Gemma 3 has sliding-window layers (a rotating KV cache) and a 262k vocabulary."""
    out = gemma3.generate(PROMPT, max_tokens=16, temperature=temperature, seed=seed)
    assert out.tokens == mlx_lm_tokens(gemma3, PROMPT, 16, temperature, seed)
    assert len(out.tokens) > 0


def test_sampling_depends_on_the_seed(wrapped):
    """The seeded comparison above means something only if another seed writes other text."""
    texts = {wrapped.generate(PROMPT, max_tokens=8, temperature=1.0, seed=s).text for s in range(3)}
    assert len(texts) > 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_positions_are_absolute_in_every_cached_step(smollm2, family):
    """An intervention at prompt position 2 and generated position L+3 during cached generation
    gives, at every step, the log-probabilities of one uncached traced forward pass over the
    whole generated sequence with the same intervention. Gemma 3's sliding-window layers (window
    4 here) keep a rotating KV cache, which wraps during these 15 tokens.

    Tolerance: the cached steps and the one forward pass compute the same sums in different
    matmul shapes; in float32 their log-probabilities differ by float noise. Measured without an
    intervention (the same comparison, bare model), and the intervention's own effect must be
    far above it."""
    model = InterpretableModel(tiny_model(family, seed=1, vocab_size=SMOLLM2_VOCAB), smollm2[1])
    prompt = model.encode(PROMPT)
    length = len(prompt)
    width = model.model.model.embed_tokens.weight.shape[1]
    direction = mx.random.normal((width,), key=mx.random.key(0))
    interventions = {"layers.0": iv.at_positions([2, length + 3], iv.add_vector(3.0 * direction)),
                     "layers.1.mlp": iv.at_positions(length + 5, iv.zero_out)}

    def cached_and_full(interventions):
        steps = list(model.generate(prompt, max_tokens=10, interventions=interventions, stream=True))
        sequence = prompt + [s.token for s in steps]
        with model.trace([sequence], interventions=interventions, capture=[]) as trace:
            full = trace.output[0, length - 1:-1].astype(mx.float32)
        full = full - mx.logsumexp(full, axis=-1, keepdims=True)
        cached = mx.stack([s.logprobs for s in steps]).astype(mx.float32)
        return np.array(cached), np.array(full)

    noise = np.abs(np.subtract(*cached_and_full(None))).max()
    cached, full = cached_and_full(interventions)
    tolerance = max(10 * noise, 1e-5)  # noise: 1.9e-6 (llama), 1.6e-5 (gemma3_text), float32
    assert np.abs(cached - full).max() <= tolerance
    plain, _ = cached_and_full(None)
    # the intervention changes every step after the prompt position 2 (the KV cache carries it)
    assert np.abs(cached - plain).max(axis=-1).min() > 100 * tolerance


def test_intervening_counts_positions_across_calls(tiny_smol):
    """Outside generation too: two calls of 4 and 3 tokens are positions 0-3 and 4-6."""
    model = tiny_smol
    seen = []

    class Starts(iv.PositionAware):
        def __call__(self, x, start=None):
            seen.append((start, x.shape[1]))
            return x

    with model.intervening({"layers.1": Starts()}) as installed:
        model([[1, 2, 3, 4]])
        model([[5, 6, 7]])
    assert seen == [(0, 4), (4, 3)] and installed.tokens_seen == 7


def test_a_stream_closed_early_or_interrupted_leaves_the_model_clean(wrapped):
    model = wrapped
    before = parameters_snapshot(model.model)
    reference = model(PROMPT)
    steer = {"layers.6": iv.add_vector(mx.ones(576))}
    stream = model.generate(PROMPT, max_tokens=20, interventions=steer, stream=True)
    next(stream)
    # between the tokens a stream hands out, the model is the bare model
    assert_model_untouched(model.model, before)
    assert mx.array_equal(model(PROMPT), reference)  # the same batch layout: bit-identical
    stream.close()
    assert_model_untouched(model.model, before)

    calls = 0

    def interrupt(x):
        nonlocal calls
        calls += 1
        if calls == 3:  # the prompt, the first decode step, then Ctrl-C in the second
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        for _ in model.generate(PROMPT, max_tokens=20, interventions={"layers.6": interrupt}, stream=True):
            pass
    assert calls == 3
    assert_model_untouched(model.model, before)
    assert mx.array_equal(model(PROMPT), reference)


def test_a_prompt_length_value_fails_clearly_and_leaves_the_model_clean(wrapped):
    model = wrapped
    before = parameters_snapshot(model.model)
    with model.trace(PROMPT, capture=["layers.6"]) as trace:
        whole_prompt = trace.activations["layers.6"]  # (1, 5, 576): one row per prompt token
    with pytest.raises(InstalledInterventionError, match=r"one token per forward pass") as err:
        model.generate(PROMPT, max_tokens=5, interventions={"layers.6": iv.replace_with(whole_prompt)})
    assert "(1, 5, 576)" in str(err.value)
    assert_model_untouched(model.model, before)
    # the working form: one position's value at that absolute position; its own value changes
    # nothing, another position's value changes the text
    own = model.generate(PROMPT, max_tokens=5, interventions={
        "layers.6": iv.at_positions(4, iv.replace_with(whole_prompt[:, 4:5]))})
    other = model.generate(PROMPT, max_tokens=5, interventions={
        "layers.6": iv.at_positions(4, iv.replace_with(whole_prompt[:, 1:2]))})
    plain = model.generate(PROMPT, max_tokens=5).text
    assert own.text == plain and other.text != plain


def test_negative_positions_are_refused_in_generation(tiny_smol):
    with pytest.raises(InstalledInterventionError, match="no fixed end while the model generates"):
        tiny_smol.generate(PROMPT, max_tokens=3, interventions={"layers.0": iv.at_positions(-1, iv.zero_out)})


@pytest.mark.parametrize("options, error, message", [
    (dict(max_tokens="5"), InputTypeError, "max_tokens must be an int"),
    (dict(max_tokens=0), GenerationError, "give at least 1"),
    (dict(max_tokens=True), InputTypeError, "max_tokens must be an int"),
    (dict(temperature="hot"), InputTypeError, "temperature must be a number"),
    (dict(temperature=-1.0), GenerationError, "give 0 .greedy. or a finite positive"),
    (dict(temperature=float("nan")), GenerationError, "finite positive"),
    (dict(seed=1.5), InputTypeError, "seed must be an int"),
    (dict(stream="yes"), InputTypeError, "stream must be True or False"),
    (dict(max_token=5), InputTypeError, "did you mean 'max_tokens'"),
    (dict(interventions={"layers.99": iv.zero_out}), Exception, "no module matches 'layers.99'"),
    (dict(interventions={"layers.0#5": iv.zero_out}), NotReachedError, "never ran"),
])
def test_bad_options_are_clear_errors(tiny_smol, options, error, message):
    before = parameters_snapshot(tiny_smol.model)
    with pytest.raises(error, match=message):
        tiny_smol.generate(PROMPT, **{"max_tokens": 3, **options})
    assert_model_untouched(tiny_smol.model, before)


def test_bad_prompts_are_clear_errors(tiny_smol):
    with pytest.raises(InputTypeError, match="one prompt"):
        tiny_smol.generate(["a b", "c d"])
    with pytest.raises(InputTypeError, match="one prompt"):
        tiny_smol.generate(3)


def test_installed_interventions_and_traces_do_not_nest(tiny_smol):
    """Two sets of probes on one module would remove each other's: nesting is refused, and the
    model is clean after."""
    model = tiny_smol
    before = parameters_snapshot(model.model)
    with model.intervening({"layers.0": iv.zero_out}), pytest.raises(TraceError, match="cannot be nested"):
        with model.trace("Hello there"):
            pass
    with model.trace("Hello there"), pytest.raises(TraceError, match="a trace is already active"):
        model.generate("Hello there", max_tokens=2)
    assert_model_untouched(model.model, before)
    with model.trace("Hello there"):  # and both work again
        pass
    assert len(model.generate("Hello there", max_tokens=2).tokens) == 2
