"""Datasets of prompt pairs: reading them, the IOI generator, and sweeps over many pairs, checked
against sweeping each pair on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxterp import InterpretableModel, PairBaselineWarning, answered_pairs
from mlxterp.errors import InputError, InputTypeError, MetricError, SiteError
from mlxterp.experiments.data.pairs import (
    IOI_NAMES,
    IOI_OBJECTS,
    IOI_PLACES,
    IOI_TEMPLATES,
    PromptPair,
    ioi_pairs,
    load_pairs,
    save_pairs,
)
from mlxterp.experiments.pipeline.plan import SweepValues
from mlxterp.experiments.pipeline.results import PatchingResult

# Two prompts of another length than the IOI templates', with their own answers.
CAPITALS = PromptPair("The capital of France is", "The capital of Italy is", " Paris", " Rome")
LAYERS = [0, 9, 29]  # the first layer (the names' embeddings), a middle one and the last


@pytest.fixture(scope="module")
def model(smollm2):
    return InterpretableModel(*smollm2)


def test_files_and_lists_give_the_same_pairs(tmp_path):
    pairs = ioi_pairs(5, seed=3)
    for suffix in (".csv", ".jsonl"):
        path = save_pairs(pairs, tmp_path / f"ioi{suffix}")
        assert load_pairs(path) == pairs
        assert load_pairs(str(path)) == pairs
    as_dicts = [{"clean": p.clean, "corrupted": p.corrupted} for p in pairs]
    assert load_pairs(as_dicts)[0] == PromptPair(pairs[0].clean, pairs[0].corrupted)
    assert load_pairs([("a b", "a c", " x")]) == [PromptPair("a b", "a c", " x")]


def test_bad_pairs_say_where_and_what(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("clean,corrupted\nThe cat sat,The dog sat\nThe cat ran,\n")
    with pytest.raises(InputError, match=r"pairs.csv, record 3: no corrupted"):
        load_pairs(csv_file)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"clean": "a", "corrupted": "b"}\n{"clean": "a", corrupted: "b"}\n')
    with pytest.raises(InputError, match=r"pairs.jsonl, line 2: not JSON"):
        load_pairs(jsonl)
    jsonl.write_text('{"clean": "a", "corupted": "b"}\n')
    with pytest.raises(InputError, match=r"record 1: unknown columns \['corupted'\]"):
        load_pairs(jsonl)
    with pytest.raises(InputError, match="no file"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=r"read from .csv or .jsonl"):
        load_pairs(tmp_path / "pairs.txt")
    with pytest.raises(InputError, match="no prompt pairs"):
        load_pairs([])
    with pytest.raises(InputTypeError, match="pair 1: int"):
        load_pairs([("a", "b"), 7])
    with pytest.raises(InputTypeError, match="answer=1.5"):
        PromptPair("a", "b", 1.5)


def test_ioi_pairs_are_single_token_swaps_in_both_orders(smollm2, gemma3):
    pairs = ioi_pairs(24, seed=1)
    assert pairs == ioi_pairs(24, seed=1) and pairs != ioi_pairs(24, seed=2)
    for pair in pairs:
        io, s = pair.answer.strip(), pair.wrong_answer.strip()
        assert pair.clean.count(s) == 2 and pair.clean.count(io) == 1  # S1 and S2; the IO once
        assert pair.corrupted == pair.clean.replace(io, "#").replace(s, io).replace("#", s)
    abba = [p for p in pairs if p.clean.index(p.answer.strip()) < p.clean.index(p.wrong_answer.strip())]
    assert len(abba) == 12  # half ABBA, half BABA
    for _, tokenizer in (smollm2, gemma3):
        for word in IOI_NAMES + IOI_PLACES + IOI_OBJECTS:
            assert len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1, word
        for pair in ioi_pairs(64, seed=0):  # every template, in both orders
            assert len(tokenizer.encode(pair.clean)) == len(tokenizer.encode(pair.corrupted)), pair
    assert all(" {IO}" in t and " {S1}" in t and " {S2}" in t for t in IOI_TEMPLATES)
    abc = ioi_pairs(4, corruption="abc")
    assert all(p.answer.strip() not in p.corrupted for p in abc)
    with pytest.raises(InputTypeError, match="corruption='xyz'"):
        ioi_pairs(2, corruption="xyz")


@pytest.mark.kernels
def test_a_dataset_sweep_equals_each_pair_swept_alone(model):
    """Pairs of two lengths with their own answers: each pair's recoveries equal its own
    single-pair sweep (another batch layout: to 0.01 points), in the dataset's order."""
    pairs = [*ioi_pairs(3, seed=0), CAPITALS]
    result = model.patching_sweep(pairs=pairs, metric="logit_diff", layers=LAYERS)
    assert result.recovery.shape == (4, 3)
    assert result.clean == [p.clean for p in pairs]
    assert result.answer_tokens[3] == [" Paris", " Rome"]
    for i, pair in enumerate(pairs):
        alone = model.patching_sweep(pair.clean, pair.corrupted, metric="logit_diff", layers=LAYERS,
                                     answer=pair.answer, wrong_answer=pair.wrong_answer)
        np.testing.assert_allclose(result.recovery[i], alone.recovery[0], atol=0.01)
        np.testing.assert_allclose(result.baseline[i], alone.baseline[0], rtol=1e-5)
    assert result.position == -1  # the last token of pairs of every length
    # The normalised mean, mean effect / mean baseline, is the baseline-weighted mean of the
    # pairs' recoveries: a pair with a tiny baseline weighs little.
    np.testing.assert_allclose(result.mean, np.average(result.recovery, axis=0, weights=result.baseline))
    assert np.all(result.standard_error > 0)
    low, high = result.interval(0.9)
    assert np.all(low <= result.mean) and np.all(result.mean <= high)


def test_the_normalised_mean_and_its_spread_on_synthetic_pairs():
    """Pairs drawn with known effects: the delta-method standard error matches the spread of the
    estimator over repeated datasets, the 95 % bootstrap interval covers the truth about 95 % of
    the time, and one pair with a near-zero baseline cannot swing the mean."""
    rng = np.random.default_rng(0)

    def dataset(pairs: int) -> PatchingResult:
        values = SweepValues.empty(pairs, 1)
        values.clean[:] = rng.gamma(4.0, 1.0, pairs)  # logit differences of the clean runs
        values.corrupted[:] = -rng.gamma(2.0, 1.0, pairs)
        gap = values.clean - values.corrupted
        values.patched[:, 0] = values.corrupted + gap * (0.3 + 0.2 * rng.standard_normal(pairs))
        return PatchingResult(sites=[{"layer": 0}], over=("layer",), component="mlp", metric="logit_diff",
                              direction="denoise", metric_values=values, clean=["c"] * pairs,
                              corrupted=["k"] * pairs, is_distance=False)

    means, errors, covered = [], [], 0
    for _ in range(200):
        result = dataset(40)
        means.append(result.mean[0])
        errors.append(result.standard_error[0])
        low, high = result.interval(0.95, resamples=2000)
        covered += low[0] <= 30.0 <= high[0]
    # 200 repetitions: the spread of a standard deviation estimate is about 1/sqrt(400) = 5 %.
    assert np.std(means) == pytest.approx(np.mean(errors), rel=0.15)
    assert 0.88 <= covered / 200 <= 0.99  # binomial spread of 200 draws at 95 %: +-3 points
    swung = dataset(40)
    swung.metric_values.clean[0] = swung.metric_values.corrupted[0] + 1e-3  # a 0.001 baseline...
    swung.metric_values.patched[0, 0] = swung.metric_values.corrupted[0] + 28.0  # ...moved by 28
    assert abs(swung.recovery[0, 0]) > 1e6 and abs(swung.mean[0] - 30) < 15


def test_each_pair_is_measured_by_its_own_answers(model):
    """The swap flips each pair's answer, so with its own answers every pair has a large positive
    baseline; measured with the first pair's names instead, the second pair's is another number."""
    pairs = ioi_pairs(2, seed=5)  # one template: one length
    own = model.patching_sweep(pairs=pairs, metric="logit_diff", layers=[0])
    assert np.all(own.baseline > 1) and own.answers[1] != own.answers[0]
    first = model.patching_sweep([p.clean for p in pairs], [p.corrupted for p in pairs], metric="logit_diff",
                                 layers=[0], answer=pairs[0].answer, wrong_answer=pairs[0].wrong_answer)
    assert first.baseline[0] == pytest.approx(own.baseline[0], rel=1e-5)
    assert abs(first.baseline[1] - own.baseline[1]) > 1
    with pytest.raises(InputError, match="own answer columns"):
        model.patching_sweep(pairs=pairs, metric="logit_diff", answer=" Mary", wrong_answer=" John")


def test_dataset_results_round_trip_and_verify(model, tmp_path):
    pairs = [*ioi_pairs(2, seed=0), CAPITALS]
    path = save_pairs(pairs, tmp_path / "pairs.jsonl")
    result = model.attribution_patching(pairs=str(path), metric="logit_diff", layers=LAYERS)
    again = type(result).from_json(result.to_json())
    assert again.answers == result.answers and again.prompt_pairs() == result.prompt_pairs()
    exact = model.patching_sweep(pairs=pairs, metric="logit_diff", layers=LAYERS)
    from mlxterp.experiments.analyses.attribution import verify_top

    verified = verify_top(model, result, 2)
    best = np.argsort(-result.mean, kind="stable")[:2]
    np.testing.assert_allclose(verified.recovery, exact.recovery[:, best], atol=0.01)


def test_bad_dataset_sweeps_are_refused(model):
    mixed = [*ioi_pairs(1), CAPITALS]
    with pytest.raises(SiteError, match=r"pairs of \[5, 15\] tokens have different sites"):
        model.patching_sweep(pairs=mixed, over=("layer", "position"), layers=[0], metric="kl")
    with pytest.raises(InputError, match="not both"):
        model.patching_sweep("a", "b", pairs=mixed)
    with pytest.raises(InputError, match="or pairs="):
        model.patching_sweep()
    with pytest.raises(MetricError, match="takes answer= and wrong_answer="):
        model.patching_sweep(pairs=[("The capital of France is", "The capital of Italy is")],
                             metric="logit_diff")
    with pytest.raises(InputError, match="tokenise to the same length"):
        model.patching_sweep(pairs=[("The cat sat", "The elephant sat down")], metric="kl")
    kl = model.patching_sweep(pairs=mixed, metric="kl", layers=[0])  # answers kept only where used
    assert kl.answers == [] and json.loads(kl.to_json())["answers"] == []


@pytest.mark.slow
def test_pairs_the_model_gets_wrong_are_named_and_can_be_left_out(model):
    """Of the first 16 IOI pairs SmolLM2 prefers the wrong name on the clean prompt of pair 8:
    the sweep names it in a warning, and answered_pairs leaves it out, as a one-prompt forward
    of each pair says."""
    pairs = ioi_pairs(16)
    named = r"pairs \[8\] make .* wrong answer on the clean prompt \(8\)"
    with pytest.warns(PairBaselineWarning, match=named):
        model.patching_sweep(pairs=pairs, metric="logit_diff", layers=[0])
    kept = answered_pairs(model, pairs)
    for pair in pairs:
        logits = model(pair.clean)[0, -1]
        answer, wrong = model.encode(pair.answer)[-1], model.encode(pair.wrong_answer)[-1]
        right = (logits[answer] > logits[wrong]).item()
        assert (pair in kept) == right
    assert len(kept) == 15 and pairs[8] not in kept
    with pytest.raises(InputError, match="needs an answer and a wrong_answer"):
        answered_pairs(model, [PromptPair("a b", "a c")])
