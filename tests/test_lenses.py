"""The logit lens and the tuned lens, checked against the model's own computation.

References: at the last block the lens must be the model's own logits (any head mlxterp found
wrongly - a missing soft cap, the wrong norm - would fail that); at other blocks a lens cell is
recomputed here in float64 numpy from the norm and unembedding weights.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model

from mlxterp import InterpretableModel
from mlxterp.errors import InputError, InputTypeError, LensError, SiteError
from mlxterp.experiments.analyses.lenses import LensResult, Unembedding, largest
from mlxterp.experiments.analyses.tuned_lens import TunedLens, lens_kl, train_tuned_lens
from mlxterp.experiments.data.corpus import token_windows

PROMPT = "The Eiffel Tower is located in the city of"
# KL at the last block, where the lens is the model: float32 rounding of log-softmax over
# 49,152 (SmolLM2) or 262,144 (Gemma 3) logits, measured at most 4e-7 nats (SkylakeX, reference
# BLAS); 1e-5 allows for other kernels' layouts (2e-6 of max |logit| per element).
KL_AT_THE_MODEL = 1e-5
# Probabilities carry the error of MLX's float32 logsumexp, which sums the vocabulary's exps in
# one pass: measured up to 2e-4 relative to float64 on SmolLM2's 49,152 logits.
PROB_RTOL = 5e-4


def softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)


def check_last_layer(model: InterpretableModel, result: LensResult, tokens) -> None:
    logits = np.array(model(tokens)[0].astype(mx.float32), dtype=np.float64)
    probs = softmax64(logits)
    assert np.abs(result.kl[-1]).max() < KL_AT_THE_MODEL
    np.testing.assert_array_equal(result.top_ids[-1, :, 0], logits.argmax(-1))
    np.testing.assert_allclose(result.top_probs[-1, :, 0], probs.max(-1), rtol=PROB_RTOL)
    if result.target_id is not None:
        np.testing.assert_allclose(result.target_prob[-1], probs[:, result.target_id], rtol=PROB_RTOL)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_last_layer_is_the_model(model_name, request):
    base, tokenizer = request.getfixturevalue(model_name)
    model = InterpretableModel(base, tokenizer)
    result = model.logit_lens(PROMPT, target=" Paris")
    check_last_layer(model, result, [tokenizer.encode(PROMPT)])
    assert result.head == {"norm": "model.model.norm", "unembedding": "model.model.embed_tokens",
                           "tied": True, "softcap": None}
    assert result.top_tokens[-1][-1][0] == " Paris" and result.target_rank[-1, -1] == 0
    # The early layers of both models do not know the answer yet.
    assert result.target_rank[0, -1] > 100


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_heads_of_other_families(family):
    """Untied (llama's lm_head), tied (qwen3) and soft-capped (gemma2, cap 2.0) heads."""
    model = InterpretableModel(tiny_model(family))
    tokens = [[1, 5, 9, 13, 2]]
    result = model.logit_lens(tokens, target=7)
    check_last_layer(model, result, tokens)
    head = Unembedding.of(model)
    assert (head.unembedding, head.tied, head.softcap) == {
        "llama": ("model.lm_head", False, None), "qwen3": ("model.model.embed_tokens", True, None),
        "gemma2": ("model.model.embed_tokens", True, 2.0)}[family]


def test_a_middle_layer_against_numpy(wrapped):
    layer, tokens = 12, [wrapped.encode(PROMPT)]
    result = wrapped.logit_lens(tokens, layers=[layer], positions=[3, -1], top=3, target=" Paris")
    base = wrapped.model
    with wrapped.trace(tokens, capture=[f"layers.{layer}", "output"]) as trace:
        residual = np.array(trace.activations[f"layers.{layer}"][0], dtype=np.float64)
        final = np.array(trace.output[0], dtype=np.float64)
    norm = np.array(base.model.norm.weight, dtype=np.float64)
    embedding = np.array(base.model.embed_tokens.weight, dtype=np.float64)
    for j, position in enumerate([3, len(tokens[0]) - 1]):
        h = residual[position]
        logits = embedding @ (h / np.sqrt((h * h).mean() + base.model.norm.eps) * norm)
        probs, final_probs = softmax64(logits), softmax64(final[position])
        order = np.argsort(-probs)[:3]
        np.testing.assert_array_equal(result.top_ids[0, j], order)
        np.testing.assert_allclose(result.top_probs[0, j], probs[order], rtol=PROB_RTOL)
        kl = (final_probs * (np.log(final_probs) - np.log(probs))).sum()
        np.testing.assert_allclose(result.kl[0, j], kl, rtol=PROB_RTOL)
        assert result.target_rank[0, j] == (probs > probs[result.target_id]).sum()
    assert result.layers == [layer] and result.positions == [3, len(tokens[0]) - 1]


def test_result_round_trip_and_table(tiny_smol):
    result = tiny_smol.logit_lens("Hello world, again", target=" again")
    again = LensResult.from_json(result.to_json())
    for name in ("top_ids", "top_probs", "kl", "target_prob", "target_rank"):
        np.testing.assert_array_equal(getattr(again, name), getattr(result, name))
    assert again.top_tokens == result.top_tokens and again.tokens == result.tokens
    frame = result.to_dataframe()
    assert len(frame) == len(result.layers) * len(result.positions)
    assert list(frame.token[:len(result.positions)]) == result.tokens


def test_bad_input(tiny_smol):
    with pytest.raises(InputTypeError, match="unembed must be a function"):
        tiny_smol.logit_lens("Hello world", unembed=3)
    with pytest.raises(InputError, match=r"target ' the city' is 2 tokens"):
        tiny_smol.logit_lens("Hello world", target=" the city")
    with pytest.raises(SiteError, match=r"layer \[2\] out of range: valid layers are 0 to 1"):
        tiny_smol.logit_lens("Hello world", layers=[2])
    with pytest.raises(SiteError, match=r"position \[-9\] out of range"):
        tiny_smol.logit_lens("Hello world", positions=[-9])


class NoFinalNorm(nn.Module):
    """A model whose head is a bare linear layer after a scale: nothing mlxterp can find."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.layers = [nn.Linear(8, 8) for _ in range(2)]
        self.out = nn.Linear(8, 11)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.out(h) * 3.0


def test_a_head_that_cannot_be_found_and_one_given():
    model = InterpretableModel(NoFinalNorm())
    with pytest.raises(LensError, match=r"(?s)does not reproduce the model's logits.*unembed=lambda h"):
        model.logit_lens([[1, 2, 3]])
    result = model.logit_lens([[1, 2, 3]], unembed=lambda h: model.model.out(h) * 3.0)
    assert np.abs(result.kl[-1]).max() < KL_AT_THE_MODEL and result.head == {"unembed": "given"}


# -- the tuned lens -------------------------------------------------------------------------------

def test_an_untrained_tuned_lens_is_the_logit_lens(tiny_smol):
    lens = train_tuned_lens(tiny_smol, ["Hello world. " * 40], steps=1, learning_rate=0.0, progress=False)
    tuned = tiny_smol.logit_lens("Hello world, again", lens=lens)
    plain = tiny_smol.logit_lens("Hello world, again")
    assert tuned.lens == "tuned" and plain.lens == "logit"
    np.testing.assert_array_equal(tuned.top_ids, plain.top_ids)
    np.testing.assert_allclose(tuned.kl, plain.kl, atol=1e-6)


def test_save_and_load(tiny_smol, tmp_path):
    lens = train_tuned_lens(tiny_smol, ["Hello world. " * 40], steps=1, learning_rate=0.0, progress=False)
    for i, translator in enumerate(lens.translators):  # distinct weights: a swap would show
        translator.weight = mx.random.normal(translator.weight.shape, key=mx.random.key(i))
        translator.bias = mx.random.normal(translator.bias.shape, key=mx.random.key(100 + i))
    path = lens.save(tmp_path / "lens.safetensors")
    loaded = TunedLens.load(path)
    assert loaded.model_sha256 == lens.model_sha256 and loaded.trained_on["steps"] == 1
    for a, b in zip(loaded.translators, lens.translators, strict=True):
        assert mx.array_equal(a.weight, b.weight) and mx.array_equal(a.bias, b.bias)
    residual = mx.random.normal((2, 32))
    assert mx.array_equal(loaded.translate(0, residual), lens.translate(0, residual))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LensError, match="cannot read a tuned lens"):
        TunedLens.load(path)


def test_training_lowers_the_kl(tiny_smol):
    text = ["The cat sat on the mat. The dog sat on the log. " * 30]
    lens = train_tuned_lens(tiny_smol, text, steps=12, batch=2, length=16, progress=False)
    assert lens.trained_on["last_loss"] < 0.8 * lens.trained_on["first_loss"]
    head, windows = Unembedding.of(tiny_smol), token_windows(tiny_smol, text, 16)[:4]
    tuned = lens_kl(tiny_smol, lens, head, windows)[:, :, 1:].mean().item()
    plain = lens_kl(tiny_smol, None, head, windows)[:, :, 1:].mean().item()
    assert tuned < 0.8 * plain


def test_a_lens_for_another_model_is_refused(tiny_smol, wrapped, tmp_path):
    lens = train_tuned_lens(tiny_smol, ["Hello world. " * 40], steps=1, progress=False)
    path = lens.save(tmp_path / "lens.safetensors")
    with pytest.raises(LensError, match=r"trained for .* \(2 layers.*not for smollm2-135m \(30 layers"):
        wrapped.logit_lens("Hello", lens=TunedLens.load(path))
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"w": mx.zeros(3)})
    with pytest.raises(LensError, match="not a tuned lens written by mlxterp"):
        TunedLens.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("vocab", [101, 5000, 49152])
def test_largest_logits_against_a_sort(vocab):
    logits = mx.random.normal((3, 4, vocab), key=mx.random.key(vocab))
    found = np.sort(np.array(largest(logits, 5)), axis=-1)
    expected = np.sort(np.argsort(-np.array(logits), axis=-1)[..., :5], axis=-1)
    np.testing.assert_array_equal(found, expected)
