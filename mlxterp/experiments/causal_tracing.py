"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", sec. 2).

The corrupted run is the prompt itself with Gaussian noise on the subject's token embeddings
(a `Corruption`, one noise sample per pair of the plan). Each site restores, from the clean run,
one state at one token: a block's output (`kind="hidden"`), or the MLP or attention outputs of
`window` consecutive layers around a layer (a `SiteGroup`). The metric is the probability of the
answer; a site's indirect effect is P(answer | corrupted, restored) - P(answer | corrupted),
averaged over the noise samples. The same engine as activation patching runs it, batched.

Example:
    >>> trace = causal_trace(model, "The Eiffel Tower is located in the city of",
    ...                      subject="The Eiffel Tower", kind="mlp")
    >>> trace.effect.mean(axis=0)            # per (layer, position) site
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from mlxterp.errors import InputTypeError
from mlxterp.experiments.corruption import Noise, describe, make_corruption
from mlxterp.experiments.engine import run_engine, run_naive
from mlxterp.experiments.metrics import probability
from mlxterp.experiments.patching import Sweep, sweep_result, token_id
from mlxterp.experiments.plan import Plan
from mlxterp.experiments.results import PatchingResult
from mlxterp.experiments.sites import check_component, component_key, is_index
from mlxterp.tracing.inputs import tokenise
from mlxterp.tracing.names import Site, SiteError, SiteGroup

KINDS = {"hidden": "output", "mlp": "mlp", "attn": "attn"}  # kind -> the component restored
WINDOW = 10  # the paper's window of MLP / attention layers


def _window(layer: int, window: int, n_layers: int) -> range:
    """The paper's window of `window` layers around `layer`, cut at the model's ends."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def restoration_sites(model, kind: str, seq_len: int, window: int = WINDOW) -> tuple[list, list[dict]]:
    """The sites of a causal trace and their labels: for each layer and token, one block output
    (`hidden`) or the MLP / attention outputs of the window around that layer at that token.

    Example:
        >>> sites, labels = restoration_sites(model, "mlp", seq_len=12, window=10)
    """
    if kind not in KINDS:
        raise InputTypeError(f"kind={kind!r}: use one of {sorted(KINDS)}.")
    n_layers = len(model.tree.blocks)
    if not is_index(window) or not 1 <= window <= n_layers:
        raise SiteError(f"window={window!r}: give a number of layers from 1 to {n_layers} (the model's).")
    component = check_component(model, KINDS[kind])
    sites, labels = [], []
    for layer in range(n_layers):
        layers = [layer] if kind == "hidden" else _window(layer, window, n_layers)
        for position in range(seq_len):
            parts = tuple(Site(component_key(model, i, component), positions=(position,)) for i in layers)
            sites.append(parts[0] if len(parts) == 1 else SiteGroup(parts))
            labels.append({"layer": layer, "position": position})
    return sites, labels


def causal_trace(
    model,
    prompt: str,
    subject: str | Sequence[int],
    answer: str | int | None = None,
    kind: str = "hidden",
    window: int = WINDOW,
    samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    naive: bool = False,
    max_batch: int | None = None,
) -> PatchingResult:
    """The indirect effect of restoring each (layer, token) state of a noised prompt.

    Args:
        prompt: the clean prompt, e.g. "The Eiffel Tower is located in the city of".
        subject: the text whose token embeddings are noised (it must occur once and cover whole
            tokens), or its token positions.
        answer: the token whose probability is measured; None: the model's top next token.
        kind: "hidden" (a block's output), "mlp" or "attn" (their outputs over `window` layers).
        samples, noise, seed: noise samples (one pair each); the noise's standard deviation
            (None: 3x that of the token embeddings); the seed of the noise.
        naive: run the one-forward-per-restoration reference instead of the engine.

    Returns a `PatchingResult` over (layer, position) with metric "prob": `result.effect` is the
    indirect effect per sample and site, `result.metric_values` the clean, corrupted and
    restored probabilities; `recovery` is the effect as a percentage of clean - corrupted.

    Example:
        >>> result = causal_trace(model, "The Eiffel Tower is located in the city of",
        ...                       "The Eiffel Tower", kind="mlp")
        >>> result.effect.mean(axis=0).max()
    """
    if not isinstance(prompt, str):
        raise InputTypeError(f"prompt={prompt!r}: give the prompt as text.")
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    tokens = mx.array([tokenise(model.tokenizer, prompt)])
    seq_len = tokens.shape[1]
    sites, labels = restoration_sites(model, kind, seq_len, window)
    corruption = make_corruption(model, prompt, seq_len, Noise(subject, samples, noise, seed))
    answer_id = _answer(model, tokens, answer)
    repeated = mx.repeat(tokens, samples, axis=0)
    plan = Plan(repeated, repeated, tuple(sites), probability(answer_id), corruption=corruption)
    values = run_naive(model, plan) if naive else run_engine(model, plan, max_batch=max_batch)
    component = kind if kind == "hidden" else f"{kind} (window {window})"
    corrupted = describe(corruption, model.to_str_tokens(tokens[0].tolist()))
    sweep = Sweep(plan, labels, [prompt] * samples, [corrupted] * samples, component,
                  ("layer", "position"), [[answer_id, None]] * samples)
    return sweep_result(model, [sweep], values)


def _answer(model, tokens: mx.array, answer: str | int | None) -> int:
    """The answer's token id; for None the clean run's top next token."""
    if answer is not None:
        return token_id(model, answer, "answer")
    return int(mx.argmax(model.model(tokens)[0, -1]).item())
