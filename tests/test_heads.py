"""Head detection: the detectors' targets by hand, the scores against a plain loop, and what
SmolLM2 has (pinned because docs/lenses.md reports it)."""

from __future__ import annotations

import numpy as np
import pytest

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.analyses.heads import KINDS, HeadScores, scores_of, targets

#            BOS  r = (5, 6, 7)   r again
TOKENS = np.array([[0, 5, 6, 7, 5, 6, 7]])


def marked_keys(kind: str) -> dict[int, list[int]]:
    marked = targets(TOKENS)[kind][0]
    return {q: list(np.flatnonzero(marked[q])) for q in range(marked.shape[0]) if marked[q].any()}


def test_targets_by_hand():
    assert marked_keys("previous") == {q: [q - 1] for q in range(2, 7)}
    assert marked_keys("duplicate") == {4: [1], 5: [2], 6: [3]}
    # From the second 5 to the 6 that followed the first 5, and so on.
    assert marked_keys("induction") == {4: [2], 5: [3], 6: [4]}


def test_scores_against_a_loop():
    rng = np.random.default_rng(0)
    pattern = rng.random((1, 3, 7, 7)) * np.tril(np.ones((7, 7)))
    pattern /= pattern.sum(-1, keepdims=True)
    for kind in KINDS:
        marked = targets(TOKENS)[kind][0]
        rows = [q for q in range(7) if marked[q].any()]
        expected = [np.mean([pattern[0, h, q][marked[q]].sum() for q in rows]) for h in range(3)]
        np.testing.assert_allclose(scores_of(pattern, targets(TOKENS)[kind]), expected, rtol=1e-12)
    previous = np.zeros((1, 1, 7, 7))
    previous[0, 0, 0, 0] = 1
    previous[0, 0, np.arange(1, 7), np.arange(0, 6)] = 1  # every query on the token before it
    assert [scores_of(previous, targets(TOKENS)[kind])[0] for kind in KINDS] == [1.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def smollm2_heads(smollm2):
    from mlxterp import InterpretableModel

    return InterpretableModel(*smollm2).detect_heads()


def test_smollm2_has_induction_heads(smollm2_heads):
    scores = smollm2_heads
    assert scores.scores.shape == (3, 30, 9) and 0 <= scores.scores.min() <= scores.scores.max() <= 1
    # What docs/lenses.md reports: induction heads in layers 17-18 (L18H6 0.81, L17H3-5 0.65).
    top = scores.top("induction", 4)
    assert {head for head, _ in top} == {"L18H6", "L17H3", "L17H4", "L17H5"}
    assert top[0][0] == "L18H6" and top[0][1] > 0.7 and top[3][1] > 0.5
    # Layers 0-15 have no induction head: copying from context needs earlier heads' output.
    assert scores.scores[KINDS.index("induction"), :16].max() < 0.2


def test_result_round_trip_and_errors(smollm2_heads, tiny_smol):
    again = HeadScores.from_json(smollm2_heads.to_json())
    np.testing.assert_array_equal(again.scores, smollm2_heads.scores)
    assert again.top("previous", 2) == smollm2_heads.top("previous", 2)
    assert len(smollm2_heads.to_dataframe()) == 3 * 30 * 9
    with pytest.raises(InputTypeError, match="kind 'copying' is not one of"):
        smollm2_heads.top("copying")
    with pytest.raises(InputTypeError, match="length must be an int of at least 2"):
        tiny_smol.detect_heads(length=1)
    with pytest.raises(InputError, match="no query with a duplicate or induction target"):
        tiny_smol.detect_heads(tokens="The quick brown fox jumps over a lazy dog")
