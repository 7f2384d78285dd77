"""Mixtures of experts: three of mlx-lm's MoE families, in float32 and quantized to 4 bits,
traced bit for bit, swept by the engine as by the naive procedure, and run through the guide's
calls."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FAMILY_CONFIGS, MOE_FAMILIES, SMOLLM2_VOCAB, tiny_model

import mlxterp
from mlxterp import InterpretableModel
from mlxterp import interventions as iv
from mlxterp.experiments.pipeline.metrics import METRICS

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


# -- experts and routers as sites -----------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_exposed_experts_change_nothing_and_add_up_to_the_block(family, smollm2):
    model = _moe(family, None, smollm2[1])
    moe = model.with_experts()
    tokens = mx.array([smollm2[1].encode(CLEAN)])
    assert mx.array_equal(moe.model(tokens), model.model(tokens)).item()
    block = f"layers.1.{MOE_BLOCK[family]}"
    with moe.trace(tokens) as trace:
        output = trace.activations[block]
        routing = trace.activations[f"{block}.routing"]
        contributions = trace.activations[f"{block}.experts"]
    n_experts = routing.shape[-1]
    assert mx.all((routing > 0).sum(-1) == 2).item()  # each token's two experts
    per_expert = contributions.reshape(*output.shape[:-1], n_experts, -1)
    # the experts' contributions add up to the block's output (float32 sums of 2 terms: 1e-6)
    assert mx.abs(per_expert.sum(axis=-2) - output).max().item() <= 1e-6 * mx.abs(output).max().item() + 1e-7
    assert mx.array_equal((mx.abs(per_expert).sum(-1) > 0), routing > 0).item()
    assert not any("routing" in name for name in model.tree.modules)  # the model is as it was


@pytest.mark.kernels
def test_patching_an_expert_moves_the_block_by_its_contribution(smollm2):
    from mlxterp import expert_site

    moe = _moe("qwen3_moe", None, smollm2[1]).with_experts()
    clean, corrupted = (mx.array([smollm2[1].encode(t)]) for t in (CLEAN, CORRUPTED))
    block = "layers.1.mlp"
    recorded = {}
    for name, tokens in (("clean", clean), ("corrupted", corrupted)):
        with moe.trace(tokens) as trace:
            recorded[name] = (trace.activations[f"{block}.experts"], trace.activations[block])
    expert = int(mx.argmax(mx.abs(recorded["clean"][0] - recorded["corrupted"][0]).reshape(-1)).item()
                 % (8 * 32) // 32)
    site = expert_site(moe, 1, expert)
    with moe.trace(corrupted, interventions={site: iv.replace_with(recorded["clean"][0])}) as trace:
        patched = trace.activations[block]
    width = 32
    clean_e = recorded["clean"][0][..., expert * width:(expert + 1) * width]
    corrupted_e = recorded["corrupted"][0][..., expert * width:(expert + 1) * width]
    expected = recorded["corrupted"][1] + clean_e - corrupted_e
    assert mx.abs(patched - expected).max().item() <= 1e-6
    # an expert sweep equals the naive procedure
    sites = [expert_site(moe, layer, e) for layer in range(3) for e in range(8)]
    fast = moe.patching_sweep(CLEAN, CORRUPTED, sites=sites, metric="kl")
    naive = moe.patching_sweep(CLEAN, CORRUPTED, sites=sites, metric="kl", naive=True)
    assert np.abs(fast.mean - naive.mean).max() <= 0.01 and np.abs(fast.mean).max() > 0.1


def test_routing_interventions_move_tokens_between_experts(smollm2):
    moe = _moe("mixtral", None, smollm2[1]).with_experts()
    block = "layers.1.block_sparse_moe"
    with moe.trace(CLEAN) as trace:
        before = trace.activations[f"{block}.routing"]
    used = int(mx.argmax((before > 0).sum(axis=(0, 1))).item())  # the most used expert
    with moe.trace(CLEAN, interventions={f"{block}.gate": iv.forbid_experts([used])}) as trace:
        forbidden = trace.activations[f"{block}.routing"]
    assert not mx.any(forbidden[..., used] > 0).item() and mx.all((forbidden > 0).sum(-1) == 2).item()
    unused = int(mx.argmin((before > 0).sum(axis=(0, 1))).item())
    with moe.trace(CLEAN, interventions={f"{block}.routing": iv.force_expert(unused)}) as trace:
        out_forced = moe.output.save()
        forced_output = trace.activations[block]
    with moe.trace(CLEAN) as trace:
        plain_output = trace.activations[block]
    assert not mx.array_equal(forced_output, plain_output).item() and mx.isfinite(out_forced).all().item()
    with moe.trace(CLEAN, interventions={f"{block}.routing": iv.reweight_experts({used: 2.0})}) as trace:
        reweighted = trace.activations[f"{block}.routing"]
    doubled = mx.where(before[..., used] > 0, 2 * before[..., used], 0)
    assert mx.allclose(doubled, reweighted[..., used]).item()


def test_bad_routing_and_expert_sites_are_refused_and_the_model_kept(smollm2):
    from mlxterp import RoutingError, SiteError, expert_site

    model = _moe("qwen3_moe", None, smollm2[1])
    moe = model.with_experts()
    with pytest.raises(RoutingError, match=r"experts \[8\] do not exist; this block has 8"):
        with moe.trace(CLEAN, interventions={"layers.0.mlp.gate": iv.forbid_experts([8])}):
            pass
    with pytest.raises(RoutingError, match="left tokens with \\[1\\] experts; this block runs exactly 2"):
        with moe.trace(CLEAN, interventions={"layers.0.mlp.routing": lambda w: w * (mx.arange(8) != 0)
                                             * (w == w.max(-1, keepdims=True))}):
            pass
    with pytest.raises(SiteError, match="expert 8 does not exist: block 0 has experts 0 to 7"):
        expert_site(moe, 0, 8)
    with pytest.raises(SiteError, match="model.with_experts()"):
        expert_site(model, 0, 1)
    with pytest.raises(SiteError, match="no mixture-of-experts blocks"):
        InterpretableModel(tiny_model("llama")).with_experts()
    tokens = mx.array([smollm2[1].encode(CLEAN)])
    assert mx.array_equal(moe.model(tokens), model.model(tokens)).item()


def test_attribution_over_layer_by_expert_and_routing_statistics(smollm2, tmp_path):
    from mlxterp import expert_attribution, routing_statistics

    moe = _moe("olmoe", None, smollm2[1]).with_experts()
    estimate, exact = expert_attribution(moe, CLEAN, CORRUPTED, verify=4, metric="kl")
    assert len(estimate.sites) == 3 * 8 and len(exact.sites) == 4
    top = np.argsort(-estimate.mean, kind="stable")[:4]
    assert [s["location"] for s in exact.sites] == [estimate.sites[i]["location"] for i in top]
    assert all(set(s) >= {"layer", "expert"} for s in exact.sites)
    stats = routing_statistics(moe, pairs=[(CLEAN, CORRUPTED)])
    assert stats.clean.shape == (3, 8) and np.allclose(stats.clean.sum(axis=1), 2.0)
    table = stats.table(3).splitlines()
    assert table[0].split() == ["layer", "expert", "clean", "corrupted", "difference"] and len(table) == 4
    stats.plot(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 5_000


@pytest.mark.kernels
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_attribution_is_the_directional_derivative(family, smollm2):
    """Each expert's AtP estimate equals the central finite difference of the metric along the
    patch of that expert's contribution (as `test_attribution` checks heads and layers).

    In float32: MLX's GatherMM, which runs the experts, has no float64. The finite difference's
    own error is bounded by |D(h) - D(h/2)| (truncation, and a step that crosses a later block's
    routing boundary, where the metric has a kink) plus its rounding, 2 x the metric's float32
    noise (the engine's bound, about 1e-6 here) / h, doubled. Measured over these 18 used experts:
    the estimate is within 4e-5 of D(h/2) (at most 3 % of it), inside that bound + 2 % of D.
    """
    from mlxterp import expert_attribution, expert_site

    moe = _moe(family, None, smollm2[1]).with_experts()
    estimate, _ = expert_attribution(moe, CLEAN, CORRUPTED, layers=[0, 2], verify=0, metric="kl")
    values = estimate.metric_values
    corrupted_value = values.corrupted[0]  # denoising: the corrupted run receives the patches
    with moe.trace(CLEAN) as trace:
        reference = trace.output[0, -1]
    checked = 0
    for labels, value in zip(estimate.sites, values.patched[0], strict=True):
        site = expert_site(moe, labels["layer"], labels["expert"])
        recorded = {}
        for name, text in (("clean", CLEAN), ("corrupted", CORRUPTED)):
            with moe.trace(text) as trace:
                recorded[name] = trace.activations[site.module]
        step = site.patch(recorded["corrupted"], recorded["clean"]) - recorded["corrupted"]
        if not mx.any(step != 0).item():  # an expert no token uses in either run: no effect
            assert value == corrupted_value
            continue

        def metric_at(h, step=step, key=site.module):
            with moe.trace(CORRUPTED, interventions={key: lambda x: x + h * step}) as trace:
                return METRICS["kl"].fn(trace.output[:, -1], reference)[0].item()

        h = 0.2
        coarse = (metric_at(h) - metric_at(-h)) / (2 * h)
        fine = (metric_at(h / 2) - metric_at(-h / 2)) / h
        rounding = 2 * (2 * values.corrupted_noise[0] / h)
        assert abs((value - corrupted_value) - fine) <= 0.02 * abs(fine) + 2 * abs(coarse - fine) + rounding
        checked += 1
    assert checked >= 5  # experts that tokens use, in blocks 0 and 2 (5 to 7 of 16)


def test_a_quantized_moe_in_groups_mlx_does_not_know_is_refused_at_load(tmp_path):
    """mlx-lm reads each matrix's group size from its tensors' shapes; one MLX cannot run (16
    here) is a ModelLoadError that names it and the sizes MLX knows."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from mlxterp import ModelLoadError
    from mlxterp.models.bundled import BUNDLED
    from mlxterp.models.load import cache_dir, converted_folder

    base = tiny_model("qwen3_moe", vocab_size=SMOLLM2_VOCAB)
    nn.quantize(base, group_size=32, bits=4)
    weights = dict(tree_flatten(base.parameters()))
    experts = "model.layers.0.mlp.switch_mlp.gate_proj"
    for part in ("scales", "biases"):  # twice the groups: as if packed in groups of 16
        weights[f"{experts}.{part}"] = mx.repeat(weights[f"{experts}.{part}"], 2, axis=-1)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    smollm2 = converted_folder(BUNDLED["smollm2-135m"].gguf_path(cache_dir()), mx.float32, False)
    for file in smollm2.glob("tokenizer*"):
        shutil.copy(file, tmp_path / file.name)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", **FAMILY_CONFIGS["qwen3_moe"], "vocab_size": SMOLLM2_VOCAB,
        "quantization": {"group_size": 32, "bits": 4}}))
    with pytest.raises(ModelLoadError, match="group size 16 is not supported.*32, 64, and 128"):
        mlxterp.load(str(tmp_path))


# -- memory ---------------------------------------------------------------------------------------

@pytest.mark.kernels
def test_the_free_memory_chooses_the_chunks_and_a_sweep_that_cannot_fit_says_so(wrapped, monkeypatch):
    from conftest import assert_model_untouched, parameters_snapshot

    from mlxterp import InputError
    from mlxterp.experiments.runners import engine

    length = len(wrapped.tokenizer.encode(CLEAN))
    row = engine.bytes_per_row(wrapped, length)
    before = parameters_snapshot(wrapped.model)
    monkeypatch.setattr(engine, "free_memory", lambda: 2 * row)  # not even one patched row
    with pytest.raises(InputError, match=r"needs about [\d.]+ MiB for its smallest forward .* MiB is free"):
        wrapped.patching_sweep(CLEAN, CORRUPTED, metric="kl", layers=[0, 1, 2])
    assert_model_untouched(wrapped.model, before)
    monkeypatch.setattr(engine, "free_memory", lambda: 3 * row)  # one patched row per forward
    assert engine.rows_per_forward(wrapped, length, 2 << 30) == 1
    chunked = wrapped.patching_sweep(CLEAN, CORRUPTED, metric="kl", layers=[0, 1, 2])
    naive = wrapped.patching_sweep(CLEAN, CORRUPTED, metric="kl", layers=[0, 1, 2], naive=True)
    assert np.abs(chunked.mean - naive.mean).max() <= 0.01
