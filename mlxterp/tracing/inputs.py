"""Turning what a user passes (text, token ids, arrays) into the token array a model takes."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxterp.errors import MlxterpError

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | mx.array | np.ndarray


class InputError(MlxterpError, ValueError):
    """Inputs that cannot be run as given."""


def _tokenise(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise InputError(
            "a text input needs a tokenizer: wrap the model with "
            "InterpretableModel(model, tokenizer=tokenizer), or pass token ids."
        )
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError(f"the text {text!r} gives no tokens; give a non-empty prompt.")
    return list(ids)


def _show(tokenizer, ids: list[int]) -> str:
    return "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"


def equal_length_rows(rows: list[list[int]], texts: list[str] | None, tokenizer) -> mx.array:
    """Stack token rows into a (batch, seq) array; unequal lengths are an error showing each."""
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        lines = []
        for i, row in enumerate(rows):
            label = repr(texts[i]) if texts else f"row {i}"
            shown = _show(tokenizer, row) if tokenizer is not None else str(row)
            lines.append(f"  {label}: {len(row)} tokens {shown}")
        raise InputError(
            "inputs in one batch must have the same number of tokens (mlxterp does not pad, "
            "since padding would shift positions):\n" + "\n".join(lines)
            + "\nReword the prompts so that they tokenise to the same length."
        )
    return mx.array(rows)


def to_token_array(inputs: Inputs, tokenizer, vocab_size: int | None) -> mx.array:
    """A (batch, seq) integer array from text, a batch of texts, token ids, or an array.

    Floating-point arrays (inputs of a model that takes no tokens) pass through unchanged.

    Example:
        >>> to_token_array("Paris is", tokenizer, 49152)
        array([[40, 1161]], dtype=int32)
    """
    if isinstance(inputs, np.ndarray):
        inputs = mx.array(inputs)
    if isinstance(inputs, mx.array):
        array = inputs[None] if inputs.ndim == 1 else inputs
    elif isinstance(inputs, str):
        array = mx.array([_tokenise(tokenizer, inputs)])
    elif isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs):
        array = equal_length_rows([_tokenise(tokenizer, t) for t in inputs], list(inputs), tokenizer)
    elif isinstance(inputs, Sequence) and inputs and all(isinstance(t, int) for t in inputs):
        array = mx.array([list(inputs)])
    elif (isinstance(inputs, Sequence) and inputs
          and all(isinstance(r, Sequence) and r and all(isinstance(t, int) for t in r)
                  for r in inputs)):
        array = equal_length_rows([list(r) for r in inputs], None, tokenizer)
    else:
        empty = " (empty)" if isinstance(inputs, Sequence) and not inputs else ""
        raise InputError(
            f"cannot run inputs of type {type(inputs).__name__}{empty}; give a string, a list of "
            "strings, a list of token ids, a list of such lists, or an mx.array."
        )
    if array.size == 0:
        raise InputError("the inputs are empty; give at least one token.")
    if mx.issubdtype(array.dtype, mx.integer) and vocab_size is not None:
        low, high = mx.min(array).item(), mx.max(array).item()
        if low < 0 or high >= vocab_size:
            raise InputError(
                f"token ids must lie in [0, {vocab_size}) for this model; got ids from {low} to "
                f"{high}. (Out-of-range ids would crash MLX's embedding lookup.)"
            )
    return array
