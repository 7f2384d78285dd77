"""Datasets of prompt pairs: reading them, the IOI generator, and sweeps over many pairs, checked
against sweeping each pair on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxterp import InterpretableModel
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
    np.testing.assert_allclose(result.mean, result.recovery.mean(axis=0))
    assert np.all(result.standard_error > 0)
    low, high = result.interval(0.9)
    assert np.all(low <= result.mean) and np.all(result.mean <= high)


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
