"""A corrupted run made by an intervention instead of a second prompt.

Causal tracing (Meng et al. 2022, section 2) corrupts the clean prompt itself: Gaussian noise
is added to the token embeddings of the subject. A `Corruption` says where (the embedding
module and the token positions) and what (values added, or values put in place for zero and
mean ablation), one set of values per pair, so that several noise samples are several pairs of
one plan. Every runner applies it to the corrupted run: the engine inside its batched forward,
the naive procedure and the gradient runner as a trace intervention (`interventions`).

Example:
    >>> corruption = embedding_noise(model, positions=(0, 1, 2), samples=10)
    >>> plan = Plan(clean_ids, clean_ids, sites, metric, corruption=corruption)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp.errors import InputError, InputTypeError
from mlxterp.tracing.inputs import is_index, tokenise
from mlxterp.tracing.names import Site

NOISE_SCALE = 3.0  # the paper's default: 3x the standard deviation of the token embeddings
ABLATIONS = ("zero", "mean")


@dataclass(frozen=True)
class Corruption:
    """The corrupted run of pair i is the clean prompt with the output of `module` changed at
    `positions`: `values[i]` added to it (noise) or put in its place (`replace`: ablation).

    `values` is (pairs, len(positions), features); `description` is what a result records of
    it, e.g. {"kind": "noise", "scale": 0.13, "seed": 0}.
    """

    module: str
    positions: tuple[int, ...]
    values: mx.array
    replace: bool
    description: dict

    @property
    def pairs(self) -> int:
        return self.values.shape[0]

    def apply(self, pair: int, x: mx.array) -> mx.array:
        """`x` (rows, seq, features), every row pair `pair`'s corrupted run, corrupted."""
        values = mx.zeros(x.shape[1:], dtype=x.dtype).at[mx.array(self.positions)].add(
            self.values[pair].astype(x.dtype))
        return Site(self.module, positions=self.positions).patch(x, values if self.replace else x + values)

    def intervention(self, pair: int):
        """The trace intervention that makes pair `pair`'s corrupted run: {module: fn}."""
        return {self.module: lambda x: self.apply(pair, x)}


def embedding_module(model) -> str:
    """The full name of the token embedding: the one embedding module with a row per token."""
    found = [name for name, m in model.tree.modules.items()
             if isinstance(m, nn.Embedding | nn.QuantizedEmbedding) and m.weight.shape[0] == model.vocab_size]
    if len(found) != 1:
        raise InputError(
            f"cannot tell this model's token embedding: embedding modules with {model.vocab_size} "
            f"rows are {found or 'none'}; corruptions need exactly one."
        )
    return found[0]


def embedding_statistics(model, chunk: int = 8192) -> tuple[np.ndarray, float]:
    """(the mean token embedding, the standard deviation of all embeddings' entries), float64,
    from every token's embedding as the module computes it (quantized ones dequantized).

    Example:
        >>> mean, std = embedding_statistics(model)
    """
    module = model.tree.modules[embedding_module(model)]
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, model.vocab_size, chunk):
        ids = mx.arange(start, min(start + chunk, model.vocab_size))
        rows = np.array(module(ids).astype(mx.float32), dtype=np.float64)
        total, total_sq, count = total + rows.sum(axis=0), total_sq + np.square(rows).sum(), count + len(rows)
    mean = total / count
    variance = total_sq / (count * mean.size) - np.square(mean.mean())
    return mean, float(np.sqrt(max(variance, 0.0)))


def _check_positions(positions, seq_len: int) -> tuple[int, ...]:
    if (not isinstance(positions, tuple | list) or not positions
            or not all(is_index(p) for p in positions)):
        raise InputTypeError(f"positions={positions!r}: give a non-empty list of token positions.")
    bad = [p for p in positions if not -seq_len <= p < seq_len]
    if bad:
        raise InputError(f"corrupted positions {bad} are out of range for {seq_len} tokens.")
    normalised = sorted({int(p) % seq_len for p in positions})
    return tuple(normalised)


def embedding_noise(model, positions, seq_len: int, samples: int = 10, scale: float | None = None,
                    seed: int = 0) -> Corruption:
    """Gaussian noise on the token embeddings at `positions`, one sample per pair.

    `scale` is the noise's standard deviation; by default 3x that of the model's token
    embeddings (`embedding_statistics`), as in the paper. Seeded: the same seed gives the same noise.

    Example:
        >>> embedding_noise(model, positions=[0, 1, 2], seq_len=12, samples=10)
    """
    if not is_index(samples) or samples < 1:
        raise InputTypeError(f"samples={samples!r}: give a whole number of noise samples, at least 1.")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)
                              or not np.isfinite(scale) or scale < 0):
        raise InputTypeError(f"noise={scale!r}: give the noise's standard deviation, a number >= 0 "
                             "(None: 3x the standard deviation of the token embeddings).")
    positions = _check_positions(positions, seq_len)
    module = embedding_module(model)
    mean, std = embedding_statistics(model)
    scale = NOISE_SCALE * std if scale is None else float(scale)
    noise = np.random.default_rng(seed).standard_normal((samples, len(positions), mean.size)) * scale
    return Corruption(module, positions, mx.array(noise, dtype=mx.float32), replace=False,
                      description={"kind": "noise", "scale": scale, "seed": seed,
                                   "positions": list(positions), "module": module})


def embedding_ablation(model, positions, seq_len: int, kind: str = "zero", pairs: int = 1) -> Corruption:
    """The token embeddings at `positions` replaced by zeros, or by the mean token embedding,
    the same for each of `pairs` pairs.

    Example:
        >>> embedding_ablation(model, positions=[3], seq_len=12, kind="mean")
    """
    if kind not in ABLATIONS:
        raise InputTypeError(f"kind={kind!r}: use one of {ABLATIONS}.")
    positions = _check_positions(positions, seq_len)
    module = embedding_module(model)
    mean, _ = embedding_statistics(model)
    value = np.zeros_like(mean) if kind == "zero" else mean
    values = np.broadcast_to(value, (pairs, len(positions), value.size))
    return Corruption(module, positions, mx.array(values, dtype=mx.float32), replace=True,
                      description={"kind": kind, "positions": list(positions), "module": module})


def subject_positions(model, prompt: str, subject: str) -> tuple[int, ...]:
    """The token positions of `subject`, a substring of `prompt` that occurs once and starts and
    ends on token boundaries (a token's leading space may come before it).

    Example:
        >>> subject_positions(model, "The Eiffel Tower is located in", "The Eiffel Tower")
        (0, 1, 2, 3)
    """
    if not isinstance(subject, str) or not subject.strip():
        raise InputTypeError(f"subject={subject!r}: give the subject as text from the prompt.")
    count = prompt.count(subject)
    if count != 1:
        raise InputError(f"the subject {subject!r} occurs {count} times in {prompt!r}; give text "
                         "that occurs exactly once (or the subject's token positions as a list).")
    ids = tokenise(model.tokenizer, prompt)
    tokenizer = getattr(model.tokenizer, "_tokenizer", model.tokenizer)
    encoding = tokenizer(prompt, return_offsets_mapping=True)
    if list(encoding["input_ids"]) != ids:
        raise InputError("this tokenizer's character offsets do not match its tokens; give the "
                         "subject's token positions as a list instead.")
    begin, end = prompt.index(subject), prompt.index(subject) + len(subject)
    spans = [(i, a, b) for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end and b > begin]
    first, last = spans[0], spans[-1]
    starts_cleanly = first[1] == begin or (first[1] == begin - 1 and prompt[first[1]].isspace())
    if not starts_cleanly or last[2] != end:
        covering = [model.decode([ids[i]]) for i, _, _ in spans]
        raise InputError(f"the subject {subject!r} does not start and end on token boundaries: the "
                         f"tokens that cover it are {covering}. Give text made of whole tokens.")
    return tuple(i for i, _, _ in spans)


@dataclass(frozen=True)
class Noise:
    """A corrupted run made from the clean prompt: Gaussian noise on the token embeddings of
    `subject` (text of the prompt that occurs once, or token positions), `samples` draws of it
    (one pair each), standard deviation `scale` (None: 3x the embeddings'), seeded.

    Example:
        >>> model.patching_sweep("The Eiffel Tower is located in the city of",
        ...                      Noise("The Eiffel Tower"), metric="kl")
    """

    subject: str | tuple[int, ...]
    samples: int = 10
    scale: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Ablate:
    """A corrupted run made from the clean prompt: the token embeddings of `subject` replaced
    by zeros (`kind="zero"`) or by the mean token embedding (`"mean"`).

    Example:
        >>> model.patching_sweep("The Eiffel Tower is located in the city of",
        ...                      Ablate("The Eiffel Tower", kind="mean"), metric="kl")
    """

    subject: str | tuple[int, ...]
    kind: str = "zero"


def make_corruption(model, prompt: str, seq_len: int, spec: Noise | Ablate) -> Corruption:
    """The `Corruption` a spec describes for `prompt` (of `seq_len` tokens)."""
    subject = spec.subject
    if isinstance(subject, str):
        positions = subject_positions(model, prompt, subject)
    elif isinstance(subject, Sequence) and subject and all(is_index(p) for p in subject):
        positions = tuple(subject)
    else:
        raise InputTypeError(f"subject={subject!r}: give text from the prompt or a list of positions.")
    if isinstance(spec, Noise):
        return embedding_noise(model, positions, seq_len, spec.samples, spec.scale, spec.seed)
    return embedding_ablation(model, positions, seq_len, spec.kind)


def describe(corruption: Corruption, tokens: list[str]) -> str:
    """The corrupted run in words, e.g. "noise (sd 0.407) on ['The', ' E', 'iffel', ' Tower']"."""
    where = [tokens[p] for p in corruption.positions]
    what = corruption.description
    return (f"noise (sd {what['scale']:.3g}) on {where}" if what["kind"] == "noise"
            else f"{what['kind']} embeddings at {where}")
