"""Generation with interventions: mlx-lm's own generation loop, with the interventions installed.

mlx-lm's `stream_generate` does the decoding: its KV cache, its sampler, its stop tokens.
mlxterp adds only the interventions, installed with `Intervening` (the tracing layer's probes)
around each step of that loop, so that between the tokens it hands out, and after the loop ends,
fails or is abandoned, the model is the bare model. Positions in position-aware interventions
are absolute token positions of the whole sequence (prompt token 0 is position 0).

Example:
    >>> out = model.generate("I went to the", max_tokens=20,
    ...                      interventions={"layers.6": iv.add_vector(1.0 * v)})
    >>> out.text
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.sample_utils import make_sampler

from mlxterp.errors import GenerationError, InputTypeError
from mlxterp.tracing.inputs import is_index
from mlxterp.tracing.intervening import Intervening
from mlxterp.tracing.trace import Intervention


@dataclass(frozen=True)
class Generation:
    """What `model.generate` wrote: the new text and tokens, after the prompt's tokens.

    `finish_reason` is "stop" when the model wrote an end-of-sequence token (not included in
    `tokens` or `text`), "length" when it reached `max_tokens`.
    """

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str


def generate(model, prompt: str | Sequence[int], max_tokens: int = 256,
             interventions: Mapping[str, Intervention] | None = None, temperature: float = 0.0,
             seed: int | None = None, stream: bool = False) -> Generation | Iterator[GenerationResponse]:
    """Generate up to `max_tokens` tokens after `prompt` with mlx-lm's loop and the interventions
    applied in every forward pass, the prompt's and each cached decode step's.

    With no interventions the tokens are mlx-lm's: `temperature=0` is greedy, a positive one
    samples with `mlx_lm.sample_utils.make_sampler(temp=temperature)` from MLX's global random
    state, which `seed` (if given) seeds first, as `mx.random.seed(seed)` would.

    Args:
        prompt: the text (tokenised as `model.encode` does) or its token ids.
        interventions: `{key: fn}` as for `model.trace`; positions in `iv.at_positions` are
            absolute: 0 is the prompt's first token, and the first generated token is at
            `len(prompt_tokens)`.
        stream: return an iterator of mlx-lm's `GenerationResponse`s (`.text`, `.token`,
            `.logprobs`), one per token as it is generated, instead of a `Generation`.

    Raises:
        InputTypeError: an option of the wrong type.
        GenerationError: an option with a value that cannot work.
        UnknownModuleError: an intervention key that names no module, or several.
        InstalledInterventionError: an intervention that fails on one step.

    Example:
        >>> model.generate("The capital of France is", max_tokens=2).text
        ' Paris.'
        >>> for piece in model.generate("Once upon a time", max_tokens=30, stream=True):
        ...     print(piece.text, end="", flush=True)
    """
    tokens = _prompt_tokens(model, prompt)
    _check_options(max_tokens, temperature, seed, stream)
    intervening = model.intervening(interventions)  # checks every key and function now
    steps = _installed_steps(model, tokens, max_tokens, intervening, temperature, seed)
    if stream:
        return steps
    generated, finish_reason = [], None
    for response in steps:  # keep the tokens only: each response holds the vocabulary's logprobs
        generated.append(response.token)
        finish_reason = response.finish_reason
    if finish_reason == "stop":  # the last response carries the end-of-sequence token
        generated = generated[:-1]
    # The tokens decoded together: mlx-lm's streamed pieces drop the first token's leading space.
    return Generation(text=model.decode(generated), tokens=generated, prompt_tokens=tokens.tolist(),
                      finish_reason=finish_reason)


def _installed_steps(model, tokens: mx.array, max_tokens: int, intervening: Intervening,
                     temperature: float, seed: int | None) -> Iterator[GenerationResponse]:
    """mlx-lm's responses, with the interventions installed while each one is computed only.

    mlx-lm builds each step's graph (and the next one's, which it evaluates ahead) inside
    `next()`, so installing around `next()` covers every forward pass, and a caller that stops
    iterating, closes the iterator or is interrupted leaves no probe on the model.
    """
    if seed is not None:
        mx.random.seed(seed)
    steps = stream_generate(model.model, model.tokenizer, tokens, max_tokens=max_tokens,
                            sampler=make_sampler(temp=temperature))
    try:
        while True:
            with intervening:
                response = next(steps, None)
            if response is None:
                return
            yield response
    finally:
        steps.close()


def _prompt_tokens(model, prompt: object) -> mx.array:
    """The prompt as a 1-D array of token ids (one prompt: mlx-lm generates one sequence)."""
    if model.tokenizer is None:
        raise GenerationError("generation needs a tokenizer: wrap the model with "
                              "InterpretableModel(model, tokenizer=tokenizer).")
    if not isinstance(prompt, str) and (not isinstance(prompt, Sequence) or any(
            isinstance(item, str | Sequence) for item in prompt)):
        raise InputTypeError(
            f"generate takes one prompt: a string or a list of token ids; got {type(prompt).__name__}."
        )
    tokens = model._tokens(prompt)
    if tokens.ndim != 2 or tokens.shape[0] != 1 or not mx.issubdtype(tokens.dtype, mx.integer):
        raise InputTypeError(f"generate takes one prompt of token ids; got shape {tuple(tokens.shape)}.")
    return tokens[0]


def _check_options(max_tokens: object, temperature: object, seed: object, stream: object) -> None:
    if not is_index(max_tokens):
        raise InputTypeError(f"max_tokens must be an int; got {type(max_tokens).__name__} {max_tokens!r}.")
    if max_tokens < 1:
        raise GenerationError(f"max_tokens={max_tokens}: give at least 1 (the number of new tokens).")
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise InputTypeError(
            f"temperature must be a number; got {type(temperature).__name__} {temperature!r}."
        )
    if not 0 <= temperature < math.inf:
        raise GenerationError(
            f"temperature={temperature}: give 0 (greedy) or a finite positive number (sampling)."
        )
    if seed is not None and not is_index(seed):
        raise InputTypeError(f"seed must be an int or None; got {type(seed).__name__} {seed!r}.")
    if seed is not None and not 0 <= seed < 2**64:
        raise GenerationError(f"seed={seed} must lie in [0, 2**64).")
    if not isinstance(stream, bool):
        raise InputTypeError(f"stream must be True or False; got {type(stream).__name__} {stream!r}.")
