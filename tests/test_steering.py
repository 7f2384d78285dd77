"""Steering vectors: the mean difference they claim, what adding one does, saving, bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_model_untouched, parameters_snapshot

from mlxterp import InterpretableModel
from mlxterp.errors import InputTypeError, InstalledInterventionError, SiteError, SteeringVectorError
from mlxterp.experiments.analyses.steering import SteeringVector
from mlxterp.presentation.cli import main

POSITIVE = ["I love weddings", "The bride and the groom"]
NEGATIVE = ["I love meetings", "The clerk and the boss"]


@pytest.fixture(scope="module")
def vector(smollm2) -> SteeringVector:
    return InterpretableModel(*smollm2).steering_vector(POSITIVE, NEGATIVE, layer=6)


def last_token(model, prompt: str, key: str) -> np.ndarray:
    with model.trace(prompt, capture=[key]) as trace:
        return np.array(trace.activations[key][0, -1])


def test_the_vector_is_the_mean_difference_at_the_last_token(wrapped, vector):
    """Recomputed with numpy from each prompt's own trace."""
    key = "model.model.layers.6"
    expected = np.mean([last_token(wrapped, p, key) - last_token(wrapped, n, key)
                        for p, n in zip(POSITIVE, NEGATIVE, strict=True)], axis=0)
    assert vector.key() == key and vector.width == 576 and vector.pairs == 2
    np.testing.assert_allclose(np.array(vector.vector), expected, rtol=1e-5, atol=1e-5)
    mlp = wrapped.steering_vector(POSITIVE[0], NEGATIVE[0], layer=3, component="mlp", position=1)
    assert mlp.key() == "model.model.layers.3.mlp" and mlp.pairs == 1
    assert mlp.key(layer=-1 % 30) == "model.model.layers.29.mlp"


def test_its_interventions_add_alpha_times_the_vector_at_every_position(wrapped, vector):
    key = vector.key()
    with wrapped.trace("Today I went", capture=[key]) as trace:
        plain = np.array(trace.activations[key])
    with wrapped.trace("Today I went", interventions=vector.interventions(alpha=2.5), capture=[key]) as trace:
        steered = np.array(trace.activations[key])
    np.testing.assert_allclose(steered - plain, np.broadcast_to(2.5 * np.array(vector.vector), plain.shape),
                               atol=1e-4)  # float32 sums of activations of size ~10
    assert list(vector.interventions(1.0, layer=8)) == ["model.model.layers.8"]


def test_steering_changes_generation_and_alpha_zero_does_not(wrapped, vector):
    plain = wrapped.generate("Today I went to the", max_tokens=12)
    assert wrapped.generate("Today I went to the", max_tokens=12,
                            interventions=vector.interventions(0.0)).tokens == plain.tokens
    assert wrapped.generate("Today I went to the", max_tokens=12,
                            interventions=vector.interventions(4.0, layer=4)).tokens != plain.tokens


def test_save_and_load_keep_everything_and_check_the_model(wrapped, vector, tiny_smol, tmp_path):
    path = vector.save(tmp_path / "weddings.safetensors")
    loaded = SteeringVector.load(path, wrapped)
    assert mx.array_equal(loaded.vector, vector.vector) and loaded.vector.dtype == mx.float32
    assert {**vars(loaded), "vector": None} == {**vars(vector), "vector": None}
    with pytest.raises(SteeringVectorError, match="was made on 'smollm2-135m'.*not on this model"):
        SteeringVector.load(path, tiny_smol)  # same tokenizer, other weights
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(SteeringVectorError, match="cannot read a steering vector"):
        SteeringVector.load(tmp_path / "junk.safetensors", wrapped)
    mx.save_safetensors(str(tmp_path / "other.safetensors"), {"vector": vector.vector})
    with pytest.raises(SteeringVectorError, match="not a steering vector saved by mlxterp"):
        SteeringVector.load(tmp_path / "other.safetensors", wrapped)


def test_bad_vectors_and_layers_are_clear_errors(wrapped, vector):
    fields = {**vars(vector)}
    with pytest.raises(SteeringVectorError, match="holds floating-point numbers; got dtype mlx.core.int32"):
        SteeringVector(**{**fields, "vector": mx.arange(576)})
    with pytest.raises(SteeringVectorError, match=r"1-D mx.array .* got shape \(1, 576\)"):
        SteeringVector(**{**fields, "vector": mx.zeros((1, 576))})
    with pytest.raises(SteeringVectorError, match=r"layer 30 is out of range: .* 30 layers \(0 to 29\)"):
        vector.interventions(1.0, layer=30)
    with pytest.raises(SiteError, match="layer .30. out of range: valid layers are 0 to 29"):
        wrapped.steering_vector(POSITIVE, NEGATIVE, layer=30)
    with pytest.raises(SteeringVectorError, match="2 positive and 1 negative"):
        wrapped.steering_vector(POSITIVE, NEGATIVE[:1], layer=3)
    with pytest.raises(SteeringVectorError, match="position 9 is out of range"):
        wrapped.steering_vector(POSITIVE, NEGATIVE, layer=3, position=9)
    with pytest.raises(InputTypeError, match="alpha must be a finite number"):
        vector.interventions("4")
    with pytest.raises(SiteError, match="unknown component 'mlpp'"):
        wrapped.steering_vector(POSITIVE, NEGATIVE, layer=3, component="mlpp")


def test_a_vector_of_another_width_fails_clearly_and_leaves_the_model_clean(wrapped, vector):
    """A vector for a model of another width (a hand-made one; a saved one is refused on load)."""
    narrow = SteeringVector(**{**vars(vector), "vector": mx.ones(32)})
    before = parameters_snapshot(wrapped.model)
    with pytest.raises(InstalledInterventionError, match=r"shape \(32,\) does not broadcast"):
        wrapped.generate("Today I went to the", max_tokens=3, interventions=narrow.interventions(1.0))
    assert_model_untouched(wrapped.model, before)


@pytest.mark.slow
def test_cli_generate_streams_text_and_steers(wrapped, vector, tmp_path, capsys):
    assert main(["generate", "The capital of France is", "--max-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert plain.strip() == wrapped.generate("The capital of France is", max_tokens=6).text.strip()
    path = vector.save(tmp_path / "weddings.safetensors")
    assert main(["generate", "Today I went to the", "--max-tokens", "12", "--steer", str(path),
                 "--layer", "4", "--alpha", "4"]) == 0
    steered = capsys.readouterr().out
    expected = wrapped.generate("Today I went to the", max_tokens=12,
                                interventions=vector.interventions(4.0, layer=4)).text
    assert steered.strip() == expected.strip()
    (tmp_path / "junk.safetensors").write_bytes(b"junk")  # (another model's file: see above)
    assert main(["generate", "Hi", "--steer", str(tmp_path / "junk.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mlxterp generate: error: cannot read a steering vector")
    assert main(["generate", "Hi", "--alpha", "2"]) == 2
    assert "of --steer FILE to add" in capsys.readouterr().err
