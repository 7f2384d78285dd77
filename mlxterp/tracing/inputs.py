"""Turning what a user passes (text, token ids, arrays) into the token array a model takes."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | mx.array | np.ndarray

_FORMS = ("give a string, a list of strings, a list of token ids, a list of such lists, or an "
          "mx.array.")


def check_text(text: str) -> str:
    """`text`, if a tokenizer can take it: UTF-8 encodable (no lone surrogates, on which the
    tokenizer fails with an obscure TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"the text {text!r} is not valid Unicode ({err.reason} at index {err.start}); "
            "give text that encodes as UTF-8."
        ) from None
    return text


def tokenise(tokenizer, text: str) -> list[int]:
    """The token ids of `text`; an InputError for text no tokenizer can take or that gives none."""
    if tokenizer is None:
        raise InputError(
            "a text input needs a tokenizer: wrap the model with "
            "InterpretableModel(model, tokenizer=tokenizer), or pass token ids."
        )
    ids = tokenizer.encode(check_text(text))
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


def _is_token_id(value: object) -> bool:
    # bool is an int to Python, but True is no token id; numpy integers are.
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _id_rows(inputs: Sequence) -> list[list[int]] | None:
    """Token-id rows from a list of ids or a list of lists of ids; None if it is neither."""
    if all(_is_token_id(t) for t in inputs):
        return [[int(t) for t in inputs]]
    nested = [isinstance(r, Sequence) and not isinstance(r, str | bytes | bytearray) for r in inputs]
    if all(nested):
        rows = []
        for i, row in enumerate(inputs):
            if not row:
                raise InputError(f"row {i} of the token ids is empty; give at least one token per row.")
            for t in row:
                if not _is_token_id(t):
                    raise InputError(_not_an_id(t, f"row {i}"))
            rows.append([int(t) for t in row])
        return rows
    if not any(nested) and not any(isinstance(t, str) for t in inputs):
        # A flat list of ids with something else among them, e.g. a float.
        raise InputError(_not_an_id(next(t for t in inputs if not _is_token_id(t)), "the list"))
    return None  # a mixture of forms


def _not_an_id(value: object, where: str) -> str:
    return (f"token ids must be whole numbers; {where} holds {value!r} ({type(value).__name__}). "
            "Give int token ids, or text.")


def _check_range(low: int, high: int, vocab_size: int | None) -> None:
    if vocab_size is None:  # any ids a model without an embedding takes, if an array can hold them
        if low < -(2**63) or high >= 2**63:
            raise InputError(f"ids must fit in 64 bits; got ids from {low} to {high}.")
        return
    if low < 0 or high >= vocab_size:
        raise InputError(
            f"token ids must lie in [0, {vocab_size}) for this model; got ids from {low} to "
            f"{high}. (Out-of-range ids would crash MLX's embedding lookup.)"
        )


def _from_array(inputs: mx.array | np.ndarray, vocab_size: int | None) -> mx.array:
    if isinstance(inputs, np.ndarray):
        if not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == np.bool_):
            raise InputError(f"cannot run a numpy array of dtype {inputs.dtype}; give token ids "
                             "as integers.")
        try:
            inputs = mx.array(inputs)
        except (TypeError, ValueError) as err:  # dtypes MLX has no counterpart of (float128, ...)
            raise InputError(f"cannot convert a numpy array of dtype {inputs.dtype} to an "
                             f"mx.array ({err}); give token ids as integers.") from None
    if vocab_size is None:
        # A model without an embedding may take any array (e.g. features): pass it through.
        return inputs[None] if inputs.ndim == 1 else inputs
    if not mx.issubdtype(inputs.dtype, mx.integer):
        raise InputError(
            f"token ids must be integers; got an array of dtype {inputs.dtype}. This model "
            f"embeds token ids; convert with .astype(mx.int32) if the values are whole numbers."
        )
    if inputs.ndim not in (1, 2):
        raise InputError(
            f"token ids must be an array of shape (seq,) or (batch, seq); got shape "
            f"{tuple(inputs.shape)}."
        )
    return inputs[None] if inputs.ndim == 1 else inputs


def to_token_array(inputs: Inputs, tokenizer, vocab_size: int | None) -> mx.array:
    """A (batch, seq) integer array from text, a batch of texts, token ids, or an array.

    `vocab_size` is the number of rows of the model's embedding, None for a model without one.
    Arrays for such a model (inputs of a model that takes no tokens) pass through unchanged;
    for a model with an embedding they must hold integer ids in [0, vocab_size).

    Example:
        >>> to_token_array("Paris is", tokenizer, 49152)
        array([[40, 1161]], dtype=int32)
    """
    if isinstance(inputs, mx.array | np.ndarray):
        array = _from_array(inputs, vocab_size)
        if array.size == 0:
            raise InputError("the inputs are empty; give at least one token.")
        if vocab_size is not None:
            _check_range(mx.min(array).item(), mx.max(array).item(), vocab_size)
        return array
    if isinstance(inputs, str):
        return mx.array([tokenise(tokenizer, inputs)])
    if isinstance(inputs, bytes | bytearray):
        raise InputError(f"cannot run inputs of type {type(inputs).__name__}; decode them to a "
                         "string first, or " + _FORMS)
    rows = None
    if isinstance(inputs, Sequence) and inputs:
        if all(isinstance(t, str) for t in inputs):
            texts = list(inputs)
            return equal_length_rows([tokenise(tokenizer, t) for t in texts], texts, tokenizer)
        rows = _id_rows(inputs)
    if rows is None:
        empty = " (empty)" if isinstance(inputs, Sequence) and not inputs else ""
        raise InputError(f"cannot run inputs of type {type(inputs).__name__}{empty}; " + _FORMS)
    # Checked before building the array: ids past int64 cannot even be held by one.
    _check_range(min(map(min, rows)), max(map(max, rows)), vocab_size)
    return equal_length_rows(rows, None, tokenizer)

def is_index(value: object) -> bool:
    """A whole number given as an int (a bool or a float is not an index)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
