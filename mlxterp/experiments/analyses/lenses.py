"""The logit lens: what the model would predict if it stopped after each block.

The residual stream after block l goes through the model's own head, its final norm and
unembedding (tied or not, with any logit soft cap), as if it were the last block's output.
`Unembedding` finds that head by watching a forward pass (the lens's own): the module that takes
the last block's output is the final norm, the module that takes the norm's output is the
unembedding (none: the embedding is tied and its `as_linear` unembeds). Every lens run checks the head it
found against the model: at the last block the lens must give the model's own logits.

A tuned lens (`tuned_lens.py`) puts each layer's residual through a trained affine translator
first; everything else is the same code.

Example:
    >>> result = model.logit_lens("The Eiffel Tower is in the city of", target=" Paris")
    >>> result.plot(); result.target_rank[:, -1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxterp.errors import InputTypeError, LensError
from mlxterp.experiments.pipeline.metrics import LOGIT_NOISE
from mlxterp.experiments.pipeline.results import draw, provenance, read_json, write_json
from mlxterp.experiments.pipeline.sites import checked_indices
from mlxterp.experiments.pipeline.sweep import token_id
from mlxterp.tracing.inputs import Inputs, is_index
from mlxterp.tracing.names import ROOT


class Translator(Protocol):
    """What the lens needs of a tuned lens (`TunedLens`): a check that it was trained on this
    model, and each layer's translation of a residual."""

    def check_model(self, model) -> None: ...

    def translate(self, layer: int, residual: mx.array) -> mx.array: ...


# Lens logits are made this many elements at a time (float32: 256 MiB), whole layers at once.
CHUNK_ELEMENTS = 2**26
# The top tokens are found among the blocks of this many logits with the highest maxima.
TOP_BLOCK = 1024
# At the last block the lens is the model's head on the same rows in another batch layout: it
# must give the model's logits to within float32 noise, 10x the per-element noise model.
HEAD_TOLERANCE = 10 * LOGIT_NOISE


@dataclass(frozen=True)
class Unembedding:
    """The model's head, from a residual (..., d_model) to logits: norm, unembedding, soft cap.

    Example:
        >>> head = Unembedding.of(model)
        >>> head.norm, head.unembedding, head.tied
        ('model.model.norm', 'model.model.embed_tokens', True)
    """

    norm: str | None  # full module names; None: the model has no final norm
    unembedding: str
    tied: bool  # the unembedding is the input embedding's `as_linear`
    softcap: float | None  # logits = softcap * tanh(logits / softcap), when the model caps them
    width: int  # of the residual stream it reads
    _modules: tuple[nn.Module | None, nn.Module] = field(repr=False, compare=False)

    def __call__(self, residual: mx.array) -> mx.array:
        norm, unembedding = self._modules
        hidden = residual if norm is None else norm(residual)
        logits = unembedding.as_linear(hidden) if self.tied else unembedding(hidden)
        if self.softcap:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> dict:
        """What the head is, for a result's record.

        Example:
            >>> Unembedding.of(model).describe()["unembedding"]
            'model.model.embed_tokens'
        """
        return {"norm": self.norm, "unembedding": self.unembedding, "tied": self.tied,
                "softcap": self.softcap}

    @staticmethod
    def watched(tree) -> list[str]:
        """What a trace must record for `found_in`: the last block's output, and the input and
        output of every module outside the blocks."""
        if not tree.blocks:
            raise LensError("this model has no list of blocks, so no residual stream to read.")
        outside = _outside_blocks(tree)
        return [tree.blocks[-1], *outside, *(f"{n}:input" for n in outside)]

    @classmethod
    def of(cls, model) -> Unembedding:
        """Find the head of a wrapped model by tracing two tokens (see `found_in`).

        Example:
            >>> Unembedding.of(model).norm
            'model.model.norm'
        """
        with model.trace([[0, 1]], capture=cls.watched(model.tree)) as trace:
            return cls.found_in(model.tree, trace.activations)

    @classmethod
    def found_in(cls, tree, recorded) -> Unembedding:
        """The head, from a trace that recorded `watched(tree)`: the module that takes the last
        block's output is the final norm if it keeps its shape (else it unembeds); the module
        that takes the norm's output unembeds (none: the tied input embedding does)."""
        outside = _outside_blocks(tree)

        def taking(value) -> str | None:
            found = [n for n in outside if f"{n}:input" in recorded and recorded[f"{n}:input"] is value]
            return found[0] if len(found) == 1 else None

        last = recorded[tree.blocks[-1]]
        first = taking(last)
        if first is None:
            raise LensError(
                f"cannot find the model's head: none of the modules outside the blocks "
                f"({', '.join(outside)}) is the one module that takes the last block's output. "
                "Pass the head yourself: unembed=lambda h: <your final norm and unembedding of h>."
            )
        is_norm = recorded[first].shape == recorded[f"{first}:input"].shape
        norm, unembedding = (first, taking(recorded[first])) if is_norm else (None, first)
        tied = unembedding is None
        if tied:
            embeddings = [n for n in outside
                          if isinstance(tree.modules[n], nn.Embedding | nn.QuantizedEmbedding)]
            if len(embeddings) != 1:
                raise LensError(
                    f"cannot find the unembedding: no module takes the output of {norm}, and "
                    f"the modules outside the blocks ({', '.join(outside)}) hold "
                    f"{len(embeddings) or 'no'} embedding(s) to tie it to. Pass unembed=lambda h: ..."
                )
            unembedding = embeddings[0]
        softcap = getattr(getattr(tree.modules[ROOT], "args", None), "final_logit_softcapping", None)
        return cls(norm, unembedding, tied, softcap, last.shape[-1],
                   (tree.modules.get(norm), tree.modules[unembedding]))


def _outside_blocks(tree) -> list[str]:
    """Modules that are neither the root nor in (or the list of) the blocks."""
    return [name for name in tree.modules
            if name != ROOT and tree.block_of(name) is None and name != tree.blocks_name]


@dataclass
class LensResult:
    """What the model predicts after each block, at each position of one prompt.

    Arrays are indexed [layer, position] over `layers` and `positions`; probabilities are of the
    lens's softmax; `kl[l, p]` is KL(final || lens) in nats; `target_rank` is 0 for the top token.

    Example:
        >>> result.to_dataframe().query("position == 13")[["layer", "top_token", "kl"]]
    """

    prompt: str | None
    tokens: list[str]  # every token of the prompt
    layers: list[int]
    positions: list[int]
    lens: str  # "logit" or "tuned"
    top_ids: np.ndarray  # (layers, positions, top)
    top_tokens: list  # [layer][position][k] token strings
    top_probs: np.ndarray  # (layers, positions, top)
    kl: np.ndarray  # (layers, positions)
    target: str | None = None
    target_id: int | None = None
    target_prob: np.ndarray | None = None  # (layers, positions)
    target_rank: np.ndarray | None = None  # (layers, positions)
    head: dict = field(default_factory=dict)  # how residuals became logits (`Unembedding.describe`)
    provenance: dict = field(default_factory=dict)

    ARRAYS = {"top_ids": np.int64, "top_probs": np.float64, "kl": np.float64,
              "target_prob": np.float64, "target_rank": np.int64}

    def __repr__(self) -> str:
        final = [tokens[0] for tokens in self.top_tokens[-1]]
        return (f"LensResult({self.lens} lens, {len(self.layers)} layers x {len(self.positions)} "
                f"positions, {self.provenance.get('model', 'unknown model')})\n"
                f"  top token at layer {self.layers[-1]}: {final}")

    def to_dataframe(self):
        """One row per (layer, position): the input token, the top token and its probability,
        the top tokens, KL to the final distribution, [the target's probability and rank]."""
        import pandas as pd

        records = []
        for i, layer in enumerate(self.layers):
            for j, position in enumerate(self.positions):
                record = {"layer": layer, "position": position, "token": self.tokens[position],
                          "top_token": self.top_tokens[i][j][0], "top_prob": float(self.top_probs[i, j, 0]),
                          "top_tokens": self.top_tokens[i][j], "kl": float(self.kl[i, j])}
                if self.target_prob is not None:
                    record["target_prob"] = float(self.target_prob[i, j])
                    record["target_rank"] = int(self.target_rank[i, j])
                records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame.attrs = {"lens": self.lens, "target": self.target, **self.head, **self.provenance}
        return frame

    def to_json(self, path: str | Path | None = None, overwrite: bool = False) -> str:
        """The result as JSON (written to `path` when given); `from_json` reads it back."""
        return write_json(self, path, overwrite)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> LensResult:
        """Read a result written by `to_json` (JSON text or a file path).

        Example:
            >>> LensResult.from_json("mlxterp-out/logit-lens-smollm2-135m.json").kl[:, -1]
        """
        return read_json(cls, text_or_path)

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """The grid: layers x positions, the top token in each cell, coloured by its probability."""
        return draw("lens", self, path, overwrite)


def logit_lens(model, prompt: Inputs, layers: Sequence[int] | None = None,
               positions: Sequence[int] | None = None, top: int = 5, target: str | int | None = None,
               lens: Translator | None = None,
               unembed: Callable[[mx.array], mx.array] | None = None) -> LensResult:
    """The model's prediction after each block (`layers`) at each position of one prompt.

    Args:
        prompt: a string or one row of token ids.
        layers, positions: indices (negative count from the end); None: all.
        top: how many top tokens to keep per cell.
        target: one token (' Paris' or an id) whose probability and rank to follow.
        lens: a `TunedLens` for this model: each residual goes through its layer's translator.
        unembed: the model's head as a function residual -> logits, when mlxterp cannot find
            it (see `Unembedding`).

    Raises:
        InputTypeError: an argument of the wrong type.
        SiteError: a layer or position out of range.
        LensError: a head that does not reproduce the model's logits, or a tuned lens of another
            model.
        InputError: a target that is not one token.

    Example:
        >>> result = logit_lens(model, "The Eiffel Tower is in the city of", target=" Paris")
    """
    if not is_index(top) or top < 1:
        raise InputTypeError(f"top must be a positive int; got {top!r}.")
    tokens = model._tokens(prompt)
    if tokens.shape[0] != 1:
        raise InputTypeError(f"the lens reads one prompt; got {tokens.shape[0]} rows.")
    n_layers, length = len(model.tree.blocks), tokens.shape[1]
    layers = checked_indices(layers, n_layers, "layer")
    positions = checked_indices(positions, length, "position")
    target_id = None if target is None else token_id(model, target, "target")
    if lens is not None:
        lens.check_model(model)
    if unembed is not None and not callable(unembed):
        raise InputTypeError(f"unembed must be a function residual -> logits; got {type(unembed).__name__}.")
    last = n_layers - 1
    blocks = model.tree.blocks
    # One forward pass: the residuals, the model's logits and, unless given, its head.
    capture = [*(blocks[i] for i in sorted({*layers, last})), "output",
               *(Unembedding.watched(model.tree) if unembed is None else [])]
    with model.trace(tokens, capture=capture) as trace:
        residuals = {i: trace.activations[blocks[i]][0] for i in {*layers, last}}
        final = trace.output[0]
        head = unembed if unembed is not None else Unembedding.found_in(model.tree, trace.activations)
    _check_head(head, residuals[last], final)
    final = final.astype(mx.float32)[mx.array(positions)]
    final_log_probs = final - mx.logsumexp(final, axis=-1, keepdims=True)
    final_probs = mx.exp(final_log_probs)
    per_chunk = max(1, CHUNK_ELEMENTS // (final.shape[-1] * len(positions)))
    chunks = [_lens_cells(head, lens, residuals, layers[i:i + per_chunk], positions, final_probs,
                          final_log_probs, top, target_id) for i in range(0, len(layers), per_chunk)]
    top_ids, top_probs, kl, target_prob, target_rank = (
        None if chunks[0][k] is None else np.concatenate([c[k] for c in chunks]) for k in range(5))
    return LensResult(
        prompt=prompt if isinstance(prompt, str) else None, tokens=_strings(model, tokens[0].tolist()),
        layers=layers, positions=positions, lens="logit" if lens is None else "tuned",
        top_ids=top_ids, top_tokens=[[_strings(model, cell) for cell in row] for row in top_ids.tolist()],
        top_probs=top_probs, kl=kl, target=None if target is None else _strings(model, [target_id])[0],
        target_id=target_id, target_prob=target_prob, target_rank=target_rank,
        head=head.describe() if isinstance(head, Unembedding) else {"unembed": "given"},
        provenance=provenance(model.model),
    )


def kl_to_final(final_probs: mx.array, final_log_probs: mx.array, log_probs: mx.array) -> mx.array:
    """KL(final || lens) over the last axis, from log-probabilities: not from two large sums
    that cancel (4e-7 nats where the lens is the model, against 8e-5 for
    sum(p * (log p - logits)) + logsumexp(logits) in float32).

    Example:
        >>> kl_to_final(mx.exp(final), final, lens)   # final, lens: log-softmax outputs
    """
    return (final_probs * (final_log_probs - log_probs)).sum(-1)


def _check_head(head, residual: mx.array, logits: mx.array) -> None:
    """The head applied to the last block's output must give the model's own logits."""
    # In half precision the model's head rounds as its dtype does, in another batch layout.
    allowed = max(HEAD_TOLERANCE, 16 * mx.finfo(logits.dtype).eps) * max(1.0, mx.abs(logits).max().item())
    logits = logits.astype(mx.float32)
    error = mx.abs(head(residual).astype(mx.float32) - logits).max().item()
    if not error <= allowed:  # also refuses NaN
        found = head.describe() if isinstance(head, Unembedding) else "the unembed function given"
        raise LensError(
            f"the head ({found}) does not reproduce the model's logits from the last block's "
            f"output: they differ by {error:.3g} (allowed {allowed:.2g}). The model "
            "does more after its last block; pass unembed=lambda h: <what it does to h>."
        )


def _lens_cells(head, lens: Translator | None, residuals: dict, layers: list[int], positions: list[int],
                final_probs: mx.array, final_log_probs: mx.array, top: int, target_id: int | None):
    """Top tokens, KL and target statistics of some layers' lens at `positions`, as numpy."""
    rows = mx.stack([residuals[layer][mx.array(positions)] for layer in layers])  # (L, P, d)
    if lens is not None:
        rows = mx.stack([lens.translate(layer, row) for layer, row in zip(layers, rows, strict=True)])
    logits = head(rows).astype(mx.float32)
    normaliser = mx.logsumexp(logits, axis=-1)  # the one exp pass over the vocabulary
    kl = kl_to_final(final_probs, final_log_probs, logits - normaliser[..., None])
    top_ids = largest(logits, min(top, logits.shape[-1]))
    top_logits = mx.take_along_axis(logits, top_ids, axis=-1)
    order = mx.argsort(-top_logits, axis=-1)  # argpartition leaves the top unsorted
    top_ids = mx.take_along_axis(top_ids, order, axis=-1)
    top_probs = mx.exp(mx.take_along_axis(top_logits, order, axis=-1) - normaliser[..., None])
    outputs = [top_ids, top_probs, kl]
    if target_id is not None:
        target_logit = logits[..., target_id]
        outputs += [mx.exp(target_logit - normaliser), (logits > target_logit[..., None]).sum(-1)]
    mx.eval(*outputs)
    arrays = [np.array(a) for a in outputs]
    return (*arrays, *([None, None] if target_id is None else []))


def largest(logits: mx.array, k: int) -> mx.array:
    """Ids of the k largest logits of each row (..., vocab), in no order.

    A partition of the whole vocabulary costs as much as the unembedding's matmul here; but the
    k largest logits lie in the k blocks (of TOP_BLOCK) whose maxima are largest, so only those
    k blocks are partitioned (5x faster for SmolLM2's 49,152 logits).

    Example:
        >>> largest(mx.array([[0.1, 3.0, 2.0, -1.0]]), 2)   # ids 1 and 2, in some order
    """
    vocab = logits.shape[-1]
    if vocab <= k * TOP_BLOCK:
        return mx.argpartition(-logits, k - 1, axis=-1)[..., :k]
    lead = logits.shape[:-1]
    padding = (-vocab) % TOP_BLOCK
    if padding:
        logits = mx.concatenate([logits, mx.full((*lead, padding), -mx.inf)], axis=-1)
    blocks = logits.reshape(*lead, -1, TOP_BLOCK)
    best = mx.argpartition(-blocks.max(-1), k - 1, axis=-1)[..., :k]
    candidates = mx.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * TOP_BLOCK)
    local = mx.argpartition(-candidates, k - 1, axis=-1)[..., :k]
    return mx.take_along_axis(best, local // TOP_BLOCK, axis=-1) * TOP_BLOCK + local % TOP_BLOCK


def _strings(model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [f"#{i}" for i in ids]
    return [model.token_to_str(i) for i in ids]
