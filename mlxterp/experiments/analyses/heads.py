"""Head detection: how much each attention head attends where a known kind of head does.

A detector marks, for each query position, the keys a head of its kind attends to:

- previous: the token just before (queries from position 2 on, so that the target is never
  the first token, where idle heads park their attention);
- duplicate: earlier occurrences of the same token;
- induction: the token after each earlier occurrence of the current token (Olsson et al. 2022):
  on "A B ... A" an induction head looks from the second A to B.

A head's score is its attention mass on the marked keys, averaged over the query positions that
have any (0 to 1). As in Olsson et al. and TransformerLens' `detect_head`, the default text is a
sequence of random tokens repeated once (after the BOS token, where the tokenizer has one): in
the second half each token has exactly one earlier copy, so duplicate and induction targets are
unambiguous and only a head that copies from context can score.

Example:
    >>> scores = model.detect_heads()
    >>> scores.top("induction", 3)
    [('L4H1', 0.91), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError, InputTypeError
from mlxterp.experiments.pipeline.options import DEFAULT_MEMORY_BUDGET
from mlxterp.experiments.pipeline.results import draw, provenance, read_json, write_json
from mlxterp.models.identity import context_length
from mlxterp.tracing.attention import attention_layouts
from mlxterp.tracing.inputs import Inputs

KINDS = ("previous", "duplicate", "induction")


def targets(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """For token rows (batch, seq): each kind's marked keys, boolean (batch, query, key).

    Example:
        >>> targets(np.array([[0, 5, 6, 5]]))["induction"][0, 3].nonzero()   # key 2 (the 6)
    """
    length = tokens.shape[1]
    query, key = np.arange(length)[:, None], np.arange(length)[None]
    earlier = key < query
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, k]: token q equals token k
    # [b, q, k]: the token before key k equals token q (k >= 1)
    follows_same = np.zeros_like(same)
    follows_same[:, :, 1:] = same[:, :, :-1]
    return {
        "previous": np.broadcast_to((key == query - 1) & (query >= 2), same.shape),
        "duplicate": same & earlier,
        "induction": follows_same & earlier,
    }


def scores_of(pattern: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Per head (heads,): mean over (batch, query) rows with any marked key of the attention
    mass on them; `pattern` (batch, heads, query, key), `marked` (batch, query, key), with at
    least one marked key.

    Example:
        >>> scores_of(pattern, targets(tokens)["previous"])
    """
    rows = marked.any(-1)  # (batch, query)
    mass = (pattern * marked[:, None]).sum(-1)  # (batch, heads, query)
    return (mass * rows[:, None]).sum((0, 2)) / rows.sum()


def repeated_random_tokens(model, length: int = 25, batch: int = 4, seed: int = 0) -> np.ndarray:
    """`batch` rows of [BOS] + r + r, r being `length` random non-special tokens (seeded)."""
    tokenizer = model.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    vocabulary = np.array([i for i in range(model.vocab_size) if i not in special])
    chosen = np.random.default_rng(seed).choice(vocabulary, size=(batch, length))
    rows = np.concatenate([chosen, chosen], axis=1)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        rows = np.concatenate([np.full((batch, 1), bos), rows], axis=1)
    return rows


def _check_size(model, shape: tuple[int, int], heads: int) -> None:
    """Refuse, before any forward pass, rows longer than the model's context or whose attention
    patterns (float32, every head of every layer) would not fit the memory budget."""
    batch, length = shape
    context = context_length(model.model)
    if context is not None and length > context:
        raise InputError(f"{length} tokens per row is longer than the model's context of {context}; "
                         f"give a length of at most {(context - 1) // 2} random tokens (repeated once).")
    needed = 4 * batch * heads * length * length
    if needed > DEFAULT_MEMORY_BUDGET:
        fits = int((DEFAULT_MEMORY_BUDGET / (4 * batch * heads)) ** 0.5)
        raise InputError(f"the attention patterns of {batch} rows of {length} tokens take "
                         f"{needed / 2**30:.1f} GiB, over the {DEFAULT_MEMORY_BUDGET / 2**30:.0f} GiB "
                         f"budget; give at most {fits} tokens per row ({(fits - 1) // 2} random tokens "
                         "repeated once), or fewer rows.")


@dataclass
class HeadScores:
    """Detector scores per (kind, layer, head), 0 to 1, and the tokens they were measured on.

    Example:
        >>> scores.scores[KINDS.index("induction")].max(axis=1)   # the best head of each layer
    """

    kinds: list[str]
    scores: np.ndarray  # (kinds, layers, heads)
    tokens: list  # the token rows the patterns were read on
    text: str  # how the tokens were made
    provenance: dict = field(default_factory=dict)

    ARRAYS = {"scores": np.float64}

    def top(self, kind: str, k: int = 5) -> list[tuple[str, float]]:
        """The k highest-scoring heads of `kind` as ("L{layer}H{head}", score)."""
        if kind not in self.kinds:
            raise InputTypeError(f"kind {kind!r} is not one of {self.kinds}.")
        grid = self.scores[self.kinds.index(kind)]
        order = np.argsort(-grid, axis=None)[:k]
        return [(f"L{layer}H{head}", float(grid[layer, head]))
                for layer, head in zip(*np.unravel_index(order, grid.shape), strict=True)]

    def __repr__(self) -> str:
        best = "; ".join(f"{kind} {', '.join(f'{h} {s:.2f}' for h, s in self.top(kind, 3))}"
                         for kind in self.kinds)
        return f"HeadScores({self.provenance.get('model', 'unknown model')}, {self.text})\n  {best}"

    def to_dataframe(self):
        """One row per (kind, layer, head) with its score."""
        import pandas as pd

        return pd.DataFrame.from_records(
            [{"kind": kind, "layer": layer, "head": head, "score": float(value)}
             for kind, grid in zip(self.kinds, self.scores, strict=True)
             for (layer, head), value in np.ndenumerate(grid)])

    def to_json(self, path: str | Path | None = None, overwrite: bool = False) -> str:
        """The scores as JSON (written to `path` when given); `from_json` reads them back.

        Example:
            >>> scores.to_json("heads.json")
        """
        return write_json(self, path, overwrite)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> HeadScores:
        """Read scores written by `to_json` (JSON text or a file path)."""
        return read_json(cls, text_or_path)

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """One heatmap per kind: layers down, heads across, colour = score (0 to 1)."""
        return draw("heads", self, path, overwrite)


def detect_heads(model, tokens: Inputs | None = None, length: int = 25, batch: int = 4,
                 seed: int = 0) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head.

    Args:
        tokens: the text to read attention on (a string, strings of equal length, or ids);
            by default `batch` rows of `length` random tokens repeated once (seeded).

    Raises:
        InputTypeError: tokens or counts of the wrong type.
        InputError: tokens with no repeated token, or rows longer than the model's context or too
            large for the memory budget.
        AttentionCaptureError: an attention mlxterp cannot rebuild.

    Example:
        >>> detect_heads(model).top("induction")
    """
    if tokens is None:
        for name, value, least in (("length", length, 2), ("batch", batch, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputTypeError(f"{name} must be an int of at least {least}; got {value!r}.")
        rows = repeated_random_tokens(model, length, batch, seed)
        text = f"{batch} rows of {length} random tokens repeated once (seed {seed})"
    else:
        rows = np.array(model._tokens(tokens))
        text = "given tokens"
    layouts = attention_layouts(model.tree)
    _check_size(model, rows.shape, sum(layout.n_heads for layout in layouts))
    with model.trace(mx.array(rows), capture=[layout.key for layout in layouts]) as trace:
        patterns = [trace.activations[layout.key] for layout in layouts]
        mx.eval(patterns)
    marked = targets(rows)
    missing = [kind for kind in KINDS if not marked[kind].any()]
    if missing:
        raise InputError(
            f"the text has no query with a {' or '.join(missing)} target (no token repeats an "
            "earlier one), so those heads cannot be scored; give text that repeats some tokens, "
            "or leave tokens=None for random tokens repeated once."
        )
    scores = np.array([[scores_of(np.array(pattern), marked[kind]) for pattern in patterns]
                       for kind in KINDS])
    return HeadScores(list(KINDS), scores, rows.tolist(), text, provenance(model.model))
