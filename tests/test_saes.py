"""Sparse autoencoders: the models, SAELens's files, splicing, features as sites, training,
evaluation and dashboards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_model_untouched, parameters_snapshot, tiny_model

import mlxterp
from mlxterp import (
    InterpretableModel,
    NotReachedError,
    SAEError,
    SparseAutoencoder,
    error_site,
    evaluate_sae,
    feature_dashboards,
    feature_site,
    load_saelens,
    save_saelens,
    train_sae,
)
from mlxterp import interventions as iv
from mlxterp.experiments.analyses import sae_training
from mlxterp.experiments.data.activations import ActivationStream, collect

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
TEXTS = [  # a few paragraphs of people's prose for the small training runs
    "The kernel keeps a list of runnable tasks for each processor and picks the next one by its "
    "virtual runtime, so that every task gets its fair share of the processor over time.",
    "A module is a file containing Python definitions and statements. The file name is the module "
    "name with the suffix .py appended, and within a module its name is available as __name__.",
    "When a page is not in memory the processor raises a fault, and the kernel reads the page from "
    "the disk, maps it into the address space of the process, and lets the instruction run again.",
] * 6


def _random_sae(
    site: str, architecture: str = "topk", d_sae: int = 256, seed: int = 0, **kw
) -> SparseAutoencoder:
    sae = SparseAutoencoder.create(
        site,
        576,
        d_sae,
        architecture,
        k=16 if architecture != "jumprelu" else None,
        seed=seed,
        model="smollm2-135m",
        **kw,
    )
    sae.b_enc = mx.random.normal(sae.b_enc.shape, key=mx.random.key(seed + 7)) * 0.1
    return sae


@pytest.fixture
def layer8(wrapped):
    return wrapped, _random_sae("layers.8")


# -- the models and their files -------------------------------------------------------------------


@pytest.mark.kernels
@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_the_architectures_keep_what_they_promise(architecture):
    sae = SparseAutoencoder.create(
        "layers.8", 16, 64, architecture, k=4 if architecture != "jumprelu" else None
    )
    sae.threshold = mx.full((64,), 0.3) if architecture != "topk" else None
    x = mx.random.normal((50, 16), key=mx.random.key(1))
    pre, latents = sae.pre_activations(x), sae.encode(x)
    assert mx.all(latents >= 0).item()
    if architecture == "topk":  # exactly the k largest, ReLU'd
        assert mx.all((latents > 0).sum(-1) <= 4).item()
        kth = mx.sort(pre, axis=-1)[:, -4:-3]
        assert mx.array_equal(latents, mx.where(pre >= kth, mx.maximum(pre, 0), 0)).item()
    else:  # above the threshold, at inference for batchtopk too: no token depends on the others
        assert mx.array_equal(latents, mx.where(pre > 0.3, pre, 0)).item()
        # one row alone and in a batch of 50 take different kernels (Haswell's differ in the last
        # bits of a 16-wide dot product, about 1e-7): equal to 1e-5, the same latents firing
        alone = sae.encode(x[:1])
        assert mx.array_equal(alone > 0, latents[:1] > 0).item()
        assert mx.allclose(alone, latents[:1], rtol=1e-5, atol=1e-6).item()
    if architecture == "batchtopk":  # training: k per token on average over the batch
        assert (sae.activate(pre, training=True) > 0).sum().item() == 4 * 50


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_our_files_round_trip(architecture, tmp_path):
    sae = _random_sae("model.model.layers.8", architecture)
    if architecture != "topk":
        sae.threshold = mx.full((256,), 0.05)
    loaded = load_saelens(save_saelens(sae, tmp_path / "sae"))
    x = mx.random.normal((4, 576), key=mx.random.key(3))
    assert (loaded.architecture, loaded.k, loaded.site) == (architecture, sae.k, sae.site)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert mx.array_equal(loaded[name], sae[name]).item(), name
    # same weights; a transposed view and its contiguous copy take different matmul kernels
    assert mx.allclose(loaded(x), sae(x), rtol=1e-5, atol=1e-6).item()
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert config["metadata"]["hook_name"] == "blocks.8.hook_resid_post"
    # SAELens has no BatchTopK at inference: it reads one as the JumpReLU it is
    assert (
        config["architecture"]
        == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[architecture]
    )


@pytest.mark.kernels
@pytest.mark.parametrize("name", ["topk", "jumprelu", "standard", "jumprelu_transcoder"])
def test_files_saelens_wrote_encode_as_saelens_does(name):
    """The fixtures were written by SAELens 6.54 with its outputs on SmolLM2 activations
    (scripts/check_saelens.py --write-fixture). Bound: float32 matmuls of the same weights by two
    libraries, 1e-4 of the largest value (measured: 0 to 6e-6 relative)."""
    sae = load_saelens(FIXTURES / name)
    expected = mx.load(str(FIXTURES / name / "saelens_outputs.safetensors"))
    latents = sae.encode(expected["x"])
    assert (expected["latents"] > 0).sum().item() > 0
    for ours, theirs in ((latents, expected["latents"]), (sae.decode(latents), expected["reconstruction"])):
        assert mx.abs(ours - theirs).max().item() <= 1e-4 * mx.abs(theirs).max().item()
    assert sae.is_transcoder == (name == "jumprelu_transcoder")
    assert sae.site == ("layers.3.mlp:input" if sae.is_transcoder else "layers.3")


def test_bad_files_say_what_is_wrong(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(FIXTURES / "topk", folder)
    config = json.loads((folder / "cfg.json").read_text())
    for change, message in (
        (lambda c: c.update(architecture="gated"), "architecture 'gated'"),
        (lambda c: c.update(normalize_activations="layer_norm"), "normalize_activations"),
        (lambda c: c.update(d_sae=65), "W_enc is"),
        (lambda c: c["metadata"].update(hook_name="blocks.3.attn.hook_q"), "no place"),
    ):
        changed = json.loads(json.dumps(config))
        change(changed)
        (folder / "cfg.json").write_text(json.dumps(changed))
        with pytest.raises(SAEError, match=message):
            load_saelens(folder)
    with pytest.raises(SAEError, match="needs cfg.json"):
        load_saelens(tmp_path / "nothing")


# -- spliced into a model -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "site,kind", [("layers.8", "sae"), ("layers.8:input", "sae"), ("layers.8.mlp:input", "transcoder")]
)
def test_splicing_changes_nothing_and_leaves_the_model_as_it_was(wrapped, site, kind):
    extra = {"site_out": "layers.8.mlp", "d_out": 576} if kind == "transcoder" else {}
    sae = _random_sae(site, "batchtopk" if extra else "topk", **extra)
    before = parameters_snapshot(wrapped.model)
    tokens = mx.array([wrapped.tokenizer.encode(CLEAN)])
    plain = wrapped(tokens)
    spliced = wrapped.with_sae(sae)
    # the same computation, the activation handed back as it was: bit for bit
    assert mx.array_equal(spliced(tokens), plain).item()
    host = "layers.8.mlp" if extra else "layers.8"  # a transcoder joins the MLP's call
    with spliced.trace(tokens) as trace:
        latents = trace.activations[f"{host}.sae.features"]
        error = trace.activations[f"{host}.sae.error"]
    assert latents.shape == (1, tokens.shape[1], 256) and error.shape == (1, tokens.shape[1], 576)
    assert_model_untouched(wrapped.model, before)
    assert not any("sae" in name for name in wrapped.tree.modules)
    assert mx.array_equal(wrapped(tokens), plain).item()


def test_changing_features_adds_exactly_their_decoded_difference(layer8):
    model, sae = layer8
    spliced = model.with_sae(sae)
    with spliced.trace(CLEAN) as trace:
        latents = trace.activations["layers.8.sae.features"]
    (resid,) = collect(model, mx.array([model.tokenizer.encode(CLEAN)]), [model.tree.site("layers.8")])
    feature = int(mx.argmax(latents[0, -1]).item())
    last = latents.shape[1] - 1
    with spliced.trace(
        CLEAN, interventions={feature_site(spliced, feature, positions=(last,)): iv.zero_out}
    ) as trace:
        changed = trace.activations["model.model.layers.8"]
    expected = resid[0, -1] - latents[0, -1, feature] * sae.W_dec[feature]
    # float32 sums of 576-wide rows: 1e-5 of the residual's largest entry (measured 5e-7)
    bound = 1e-5 * mx.abs(resid).max().item()
    assert mx.abs(changed[0, -1] - expected).max().item() <= bound
    assert mx.array_equal(changed[0, :-1], resid[0, :-1]).item()
    # without the error term the forward goes on with the reconstruction
    with spliced.trace(CLEAN, interventions={error_site(spliced): iv.zero_out}) as trace:
        reconstructed = trace.activations["model.model.layers.8"]
    assert mx.abs(reconstructed - sae(resid)).max().item() <= bound


@pytest.mark.kernels
def test_a_sweep_over_features_and_the_error_equals_the_naive_procedure(layer8):
    model, sae = layer8
    spliced = model.with_sae(sae)
    latents, corrupted_latents = [], []
    for prompt, found in ((CLEAN, latents), (CORRUPTED, corrupted_latents)):
        with spliced.trace(prompt) as trace:
            found.append(trace.activations["layers.8.sae.features"][0, 9])  # 9: the second name
    latents, corrupted_latents = latents[0], corrupted_latents[0]
    # the features that differ most where the prompts differ
    features = np.argsort(-np.abs(np.array(latents - corrupted_latents)))[:4].tolist()
    sites = [feature_site(spliced, k, positions=(9,)) for k in features] + [error_site(spliced)]
    options = {"sites": sites, "metric": "logit_diff", "answer": " Mary", "wrong_answer": " John"}
    fast = spliced.patching_sweep(CLEAN, CORRUPTED, **options)
    naive = spliced.patching_sweep(CLEAN, CORRUPTED, naive=True, **options)
    assert np.abs(fast.mean - naive.mean).max() <= 0.01
    assert [s.get("feature") for s in fast.sites] == features + [None]
    assert fast.sites[-1]["component"] == "sae.error" and abs(fast.mean[-1]) > 1.0
    # attribution over features is a derivative: the central difference along the patch agrees
    estimates = spliced.attribution_patching(CLEAN, CORRUPTED, **options)
    answer, wrong = (spliced.tokenizer.encode(t)[0] for t in (" Mary", " John"))

    def logit_diff(feature: int, step: float) -> float:
        change = step * (latents[feature] - corrupted_latents[feature]).item()
        site = feature_site(spliced, feature, positions=(9,))
        with spliced.trace(CORRUPTED, interventions={site: lambda a: a + change}):
            logits = spliced.output.save()
        return (logits[0, -1, answer] - logits[0, -1, wrong]).item()

    baseline = fast.metric_values.clean[0] - fast.metric_values.corrupted[0]
    assert np.abs(fast.mean[:-1]).max() > 1.0  # features whose patch matters
    for i, feature in enumerate(features[:2]):
        slope = (logit_diff(feature, 0.05) - logit_diff(feature, -0.05)) / 0.1
        # float32 logits of about 20 differenced over 0.1: about 1e-4 / 0.1; bound 0.5 pp of the effect
        assert abs(100 * slope / baseline - estimates.mean[i]) <= 0.5


def test_bad_splices_leave_the_model_as_it_was(wrapped):
    before = parameters_snapshot(wrapped.model)
    cases = [
        (SparseAutoencoder.create("layers.8", 100, 64, k=4), "100 wide"),
        (_random_sae("layers.8").apply(lambda a: a.astype(mx.bfloat16)), "bfloat16"),
        (SparseAutoencoder.create("layers.8", 576, 64, k=4, model="gpt2"), "made for 'gpt2'"),
    ]
    for sae, message in cases:
        with pytest.raises(SAEError, match=message):
            wrapped.with_sae(sae)
    spliced = wrapped.with_sae(_random_sae("layers.8"))
    with pytest.raises(SAEError, match="already has an SAE"):
        spliced.with_sae(_random_sae("layers.3"))
    with pytest.raises(SAEError, match="features are 0 to 255"):
        feature_site(spliced, 256)
    with pytest.raises(SAEError, match="no SAE spliced"):
        feature_site(wrapped, 3)
    with pytest.raises(SAEError, match="unknown SAE architecture"):
        SparseAutoencoder("gated", "layers.8", 576, 64)
    assert_model_untouched(wrapped.model, before)


# -- training -------------------------------------------------------------------------------------


def _train(model, **options):
    settings = {"expansion": 1, "k": 8, "steps": 12, "batch_tokens": 128, "length": 24, "progress": False}
    return train_sae(model, "layers.3", TEXTS, **(settings | options))


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_training_reduces_the_unexplained_variance(wrapped, architecture):
    sae = _train(
        wrapped,
        architecture=architecture,
        steps=30,
        k=None if architecture == "jumprelu" else 8,
        learning_rate=3e-3,
    )
    history = sae.trained_on["history"]
    assert history[-1]["fvu"] < 0.7 * history[0]["fvu"]
    # the folded SAE reads the model's own activations: its FVU there matches training's
    windows = mlxterp.token_windows(wrapped, TEXTS[:3], 24)
    (x,) = collect(wrapped, windows, [wrapped.tree.site("layers.3")])
    x = x[:, 1:].reshape(-1, 576)
    fvu = ((sae(x) - x) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert fvu.item() < 0.7 * history[0]["fvu"]
    assert mx.allclose(
        mx.linalg.norm(sae.W_dec, axis=1), mx.linalg.norm(sae.W_dec, axis=1)[0], rtol=1e-4
    ).item()


@pytest.mark.slow
def test_a_checkpointed_run_resumes_exactly_and_a_seed_repeats(wrapped, tmp_path, monkeypatch):
    whole = _train(wrapped, seed=3)
    again = _train(wrapped, seed=3)
    other = _train(wrapped, seed=4)
    assert mx.array_equal(whole.W_enc, again.W_enc).item()
    assert not mx.array_equal(whole.W_enc, other.W_enc).item()
    real_batch = ActivationStream.batch

    def stop_at_step_7(self, step):
        if step == 7:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(ActivationStream, "batch", stop_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        _train(wrapped, seed=3, checkpoint=tmp_path / "run", checkpoint_every=5)
    _, metadata = mx.load(str(tmp_path / "run" / sae_training.CHECKPOINT), return_metadata=True)
    assert json.loads(metadata["state"])["step"] == 5
    monkeypatch.setattr(ActivationStream, "batch", real_batch)
    resumed = _train(wrapped, seed=3, checkpoint=tmp_path / "run", checkpoint_every=5)
    # the history of the steps before the stop travelled with the checkpoint
    steps = [[h["step"] for h in sae.trained_on["history"]] for sae in (resumed, whole)]
    assert steps[0] == steps[1]
    # the same operations on the same machine in the same order: equal to float32's last bit
    # is expected; 1e-6 relative leaves room for a BLAS that splits work by thread timing
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert mx.allclose(resumed[name], whole[name], rtol=1e-6, atol=1e-7).item(), name
    with pytest.raises(SAEError, match="other settings .*steps"):
        _train(wrapped, seed=3, steps=13, checkpoint=tmp_path / "run")


def test_a_transcoder_replaces_its_mlps_output_and_nothing_else(wrapped):
    extra = {"site_out": "layers.8.mlp", "d_out": 576}
    sae = _random_sae("layers.8.mlp:input", "batchtopk", **extra)
    sae.threshold = mx.full((256,), 0.05)
    spliced = wrapped.with_sae(sae)
    with wrapped.trace(CLEAN) as trace:
        mlp_in, mlp_out = trace.activations["layers.8.mlp:input"], trace.activations["layers.8.mlp"]
    with spliced.trace(CLEAN) as trace:
        error = trace.activations["layers.8.mlp.sae.error"]
    with spliced.trace(CLEAN, interventions={error_site(spliced): iv.zero_out}) as trace:
        replaced_in, replaced_out = trace.activations["layers.8.mlp:input"], trace.activations["layers.8.mlp"]
    # the MLP still reads its own input; its output becomes the transcoder's reconstruction
    assert mx.array_equal(replaced_in, mlp_in).item()
    assert mx.abs(replaced_out - sae(mlp_in)).max().item() <= 1e-5 * mx.abs(mlp_out).max().item()
    assert mx.abs(error - (mlp_out - sae(mlp_in))).max().item() <= 1e-5 * mx.abs(mlp_out).max().item()
    wrong = _random_sae("layers.2", "batchtopk", **extra)  # reads another module than it writes
    with pytest.raises(SAEError, match="must be site_out 'layers.8.mlp' followed by ':input'"):
        wrapped.with_sae(wrong)


def test_a_transcoder_trains_and_splices(wrapped):
    sae = train_sae(
        wrapped,
        "layers.3.mlp:input",
        TEXTS,
        site_out="layers.3.mlp",
        architecture="batchtopk",
        expansion=1,
        k=16,
        steps=20,
        batch_tokens=128,
        length=24,
        learning_rate=3e-3,
        progress=False,
    )
    assert sae.is_transcoder and sae.trained_on["history"][-1]["fvu"] < sae.trained_on["history"][0]["fvu"]
    tokens = mx.array([wrapped.tokenizer.encode(CLEAN)])
    assert mx.array_equal(wrapped.with_sae(sae)(tokens), wrapped(tokens)).item()


def test_training_refuses_what_cannot_work(tiny_smol):
    with pytest.raises(SAEError, match="trains topk"):
        train_sae(tiny_smol, "layers.0", TEXTS, architecture="relu")
    with pytest.raises(mlxterp.InputTypeError, match="steps"):
        train_sae(tiny_smol, "layers.0", TEXTS, steps=0)
    for bad, message in (({"length": 1}, "at least 2 tokens"), ({"learning_rate": -1.0}, "above 0"),
                         ({"sparsity": -1}, "L0 penalty")):
        with pytest.raises(mlxterp.InputTypeError, match=message):
            train_sae(tiny_smol, "layers.0", TEXTS, **bad)
    with pytest.raises(mlxterp.InputTypeError, match="texts must be strings"):
        train_sae(tiny_smol, "layers.0", [*TEXTS, 3])
    base = tiny_model("llama", vocab_size=tiny_smol.tokenizer.vocab_size, num_hidden_layers=2)
    base.model.layers[0].unused = nn.Linear(4, 4)  # a module the forward never calls
    model = InterpretableModel(base, tiny_smol.tokenizer)
    with pytest.raises(NotReachedError, match="never called"):
        train_sae(model, "layers.0.unused", TEXTS, steps=2, batch_tokens=64, length=16)


# -- evaluation and dashboards --------------------------------------------------------------------


def test_a_perfect_sae_explains_everything_and_recovers_the_whole_loss(wrapped):
    """An independent reference: W_enc = [I, -I], W_dec = [I; -I] reconstructs x exactly
    (relu(x) - relu(-x)), so FVU is 0 and the loss recovered 1, up to float32 rounding."""
    sae = SparseAutoencoder("relu", "layers.8", 576, 1152, model="smollm2-135m")
    eye = mx.eye(576)
    sae.W_enc = mx.concatenate([eye, -eye], axis=1)
    sae.W_dec = mx.concatenate([eye, -eye], axis=0)
    windows = mlxterp.token_windows(wrapped, TEXTS[:3], 24)[:4]
    report = evaluate_sae(wrapped, sae, windows, ce_windows=4)
    assert report.fvu < 1e-10 and abs(report.loss_recovered - 1) < 1e-4
    assert report.loss_recovered_interval[0] <= report.loss_recovered <= report.loss_recovered_interval[1]
    assert report.ce_ablated > report.ce_clean + 1 and report.tokens == 4 * 23
    assert 0 < report.l0 <= 576 and report.dead_fraction < 1


def test_dashboards_find_the_top_activations_and_the_page_searches_them(wrapped, tmp_path):
    sae = _random_sae("layers.8")
    windows = mlxterp.token_windows(wrapped, TEXTS[:3], 24)[:6]
    features = [3, 77, 200]
    boards = feature_dashboards(wrapped, sae, windows, features=features, contexts=4)
    (x,) = collect(wrapped, windows, [wrapped.tree.site("layers.8")])
    latents = np.array(sae.encode(x))[:, 1:]
    for k in features:
        board = boards[k]
        assert board.max_activation == pytest.approx(float(latents[..., k].max()), rel=1e-6)
        assert board.frequency == pytest.approx(float((latents[..., k] > 0).mean()), rel=1e-6)
        if board.contexts:
            top = board.contexts[0]
            assert top["activations"][top["top"]] == pytest.approx(board.max_activation, rel=1e-4)
        norm_weight = wrapped.model.model.norm.weight  # folded in, as TransformerLens does
        logits = np.array(wrapped.model.model.embed_tokens.as_linear(sae.W_dec[k] * norm_weight))
        assert board.promoted[0][1] == pytest.approx(float(logits.max()), rel=1e-5)
        assert sum(board.histogram["counts"]) == int((latents[..., k] > 0).sum())
    page = boards.to_html(tmp_path / "features.html").read_text()
    assert all(f'"feature": {k}' in page for k in features) and 'id="search"' in page
    with pytest.raises(SAEError, match="no dashboard for feature 5"):
        boards[5]


def test_training_throughput_is_recorded_with_the_run(wrapped):
    sae = _train(wrapped, steps=3)
    assert sae.trained_on["tokens"] == 3 * 128 and sae.trained_on["tokens_per_second"] > 0
    assert sae_training.DEAD_AFTER_TOKENS > 3 * 128  # nothing can be dead this early
