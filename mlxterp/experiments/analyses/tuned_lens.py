"""The tuned lens (Belrose et al. 2023): one affine translator per layer, trained so that the
model's head applied to the translated residual matches the model's final distribution.

A translator maps the residual h after block l to h + A_l h + b_l; A and b start at zero, so an
untrained lens is the logit lens. Training minimises KL(final || lens) over every position of
some text, one Adam step per batch, with the model frozen. The last block needs no translator:
its residual already gives the final logits.

The corpus that needs no download: `python_reference_text()`, the Python language reference
that ships with CPython itself (`pydoc_data.topics`, 79 topics, 465k characters of English
technical prose).

Example:
    >>> lens = train_tuned_lens(model, python_reference_text()[0], steps=60)
    >>> lens.save("smollm2-tuned-lens.safetensors")
    >>> model.logit_lens("The Eiffel Tower is in", lens=TunedLens.load("smollm2-tuned-lens.safetensors"))
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlxterp.errors import InputTypeError, LensError
from mlxterp.experiments.analyses.lenses import Unembedding, kl_to_final
from mlxterp.experiments.data.corpus import token_windows
from mlxterp.models.identity import model_name, weights_sha256
from mlxterp.models.load import cache_dir
from mlxterp.paths import output_path, write_atomically


class TunedLens(nn.Module):
    """Affine translators for every block but the last, and the model they were trained for.

    Example:
        >>> lens = TunedLens(n_layers=30, width=576, model="smollm2-135m", model_sha256="26a5...")
        >>> lens.translate(3, residual).shape == residual.shape
        True
    """

    def __init__(self, n_layers: int, width: int, model: str, model_sha256: str):
        super().__init__()
        self.translators = [nn.Linear(width, width) for _ in range(n_layers - 1)]
        for translator in self.translators:
            translator.weight = mx.zeros_like(translator.weight)
            translator.bias = mx.zeros_like(translator.bias)
        self.n_layers, self.width = n_layers, width
        self.model, self.model_sha256 = model, model_sha256
        self.trained_on: dict = {}  # what training saw: corpus, tokens, steps, final loss

    def translate(self, layer: int, residual: mx.array) -> mx.array:
        """The residual after block `layer`, translated for the model's head."""
        if layer == self.n_layers - 1:
            return residual
        return residual + self.translators[layer](residual)

    def check_model(self, model) -> None:
        """Refuse a lens made for another model: a clear error, never a silently wrong lens."""
        n_layers = len(model.tree.blocks)
        sha = weights_sha256(model.model)
        if (n_layers, sha) != (self.n_layers, self.model_sha256):
            raise LensError(
                f"this tuned lens was trained for {self.model} ({self.n_layers} layers, weights "
                f"sha256 {self.model_sha256[:12]}), not for {model_name(model.model)} ({n_layers} "
                f"layers, sha256 {sha[:12]}); train one for this model with `mlxterp train-lens`."
            )

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the translators and their model's identity to a .safetensors file.

        Example:
            >>> lens.save("smollm2-lens.safetensors")
        """
        path = output_path(path, {".safetensors"}, overwrite)
        metadata = {"n_layers": str(self.n_layers), "width": str(self.width), "model": self.model,
                    "model_sha256": self.model_sha256, "trained_on": json.dumps(self.trained_on)}
        return write_atomically(path, lambda temporary: mx.save_safetensors(
            str(temporary), dict(tree_flatten(self.parameters())), metadata=metadata))

    @staticmethod
    def default_path(model) -> Path:
        """Where `mlxterp train-lens` keeps the lens of `model`: the cache, by weights hash."""
        name = Path(model_name(model.model)).name.removesuffix(".gguf")
        return cache_dir() / "tuned-lenses" / f"{name}-{weights_sha256(model.model)[:12]}.safetensors"

    @classmethod
    def for_model(cls, model) -> TunedLens:
        """The lens `mlxterp train-lens` trained for `model`."""
        path = cls.default_path(model)
        if not path.exists():
            raise LensError(
                f"no tuned lens has been trained for {model_name(model.model)} (looked for {path}); "
                f"train one with `mlxterp train-lens --model {model_name(model.model)}`."
            )
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> TunedLens:
        """Read a lens written by `save`.

        Example:
            >>> model.logit_lens(prompt, lens=TunedLens.load("smollm2-lens.safetensors"))
        """
        try:
            weights, metadata = mx.load(str(path), return_metadata=True)
        except (RuntimeError, ValueError) as err:  # mx.load: a missing, unreadable or truncated file
            raise LensError(f"cannot read a tuned lens from {path}: {err}") from err
        missing = {"n_layers", "width", "model", "model_sha256"} - set(metadata)
        if missing:
            raise LensError(f"{path} is not a tuned lens written by mlxterp: no {sorted(missing)} in it.")
        lens = cls(int(metadata["n_layers"]), int(metadata["width"]), metadata["model"],
                   metadata["model_sha256"])
        try:
            lens.load_weights(list(weights.items()))
        except ValueError as err:  # arrays missing, extra or of other shapes than the metadata says
            raise LensError(f"{path} does not hold the translators its metadata describes: {err}") from err
        lens.trained_on = json.loads(metadata.get("trained_on", "{}"))
        return lens


def python_reference_text(held_out_every: int = 4) -> tuple[list[str], list[str]]:
    """(training, held-out) texts: the Python language reference's topics, which ship with
    CPython (`pydoc_data.topics`), every `held_out_every`-th topic (alphabetically) held out."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some Linux distributions package the stdlib's docs separately
        raise LensError(
            "this Python has no pydoc_data (the language reference's text), the corpus "
            "`train-lens` uses; install your distribution's full standard library, or train with "
            "train_tuned_lens(model, your_texts)."
        ) from err

    names = sorted(topics)
    held_out = [topics[name] for i, name in enumerate(names) if i % held_out_every == held_out_every - 1]
    training = [topics[name] for i, name in enumerate(names) if i % held_out_every != held_out_every - 1]
    return training, held_out


def lens_kl(model, lens: TunedLens | None, head: Unembedding, tokens: mx.array) -> mx.array:
    """KL(final || lens) in nats per (layer, window, position) for windows of tokens; the
    logit lens when `lens` is None.

    Example:
        >>> lens_kl(model, lens, Unembedding.of(model), windows)[:, :, 1:].mean()
    """
    blocks = model.tree.blocks
    with model.trace(tokens, capture=[*blocks, "output"]) as trace:
        residuals = [mx.stop_gradient(trace.activations[block]) for block in blocks]
        final = mx.stop_gradient(trace.output.astype(mx.float32))
    final_log_probs = final - mx.logsumexp(final, axis=-1, keepdims=True)
    final_probs = mx.exp(final_log_probs)
    kls = []
    for layer, residual in enumerate(residuals[:-1]):
        translated = residual if lens is None else lens.translate(layer, residual)
        logits = head(translated).astype(mx.float32)
        kls.append(kl_to_final(final_probs, final_log_probs,
                               logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return mx.stack(kls)


def kl_per_layer(model, lens: TunedLens | None, tokens: mx.array) -> np.ndarray:
    """Mean KL(final || lens) per layer (all but the last) over windows of tokens, leaving out
    position 0 (see `train_tuned_lens`): the curve of Belrose et al.'s figure. None: the logit
    lens.

    Example:
        >>> kl_per_layer(model, lens, token_windows(model, held_out, 64)[:8])
    """
    head = Unembedding.of(model)
    return np.array(lens_kl(model, lens, head, tokens)[:, :, 1:].mean(axis=(1, 2)))


def train_tuned_lens(model, texts: Sequence[str], steps: int = 60, batch: int = 2,
                     length: int = 64, learning_rate: float = 5e-4, seed: int = 0,
                     progress: bool | None = None) -> TunedLens:
    """Train a tuned lens for `model` on `texts`: `steps` Adam steps (the rate decaying linearly
    from `learning_rate` to 0), each on `batch` windows of `length` tokens drawn at random
    (seeded) from the tokenised texts. `progress`: a bar (None: when stderr is a terminal).
    `lens.trained_on` records the run, and the texts by their sha256.

    Raises:
        InputTypeError: a step, batch or length count that is no whole number.
        InputError: texts too short for one window.
        LensError: a model whose head is not found.

    Example:
        >>> training, held_out = python_reference_text()
        >>> lens = train_tuned_lens(model, training, steps=60)
    """
    from tqdm.auto import tqdm

    for name, value in (("steps", steps), ("batch", batch), ("length", length)):
        if not isinstance(value, int) or value < 1:
            raise InputTypeError(f"{name} must be a positive int; got {value!r}.")
    windows = token_windows(model, texts, length)
    head = Unembedding.of(model)
    lens = TunedLens(len(model.tree.blocks), head.width, model_name(model.model), weights_sha256(model.model))
    # Adam moves every translator at the same rate, good layers too; decaying the rate to zero
    # lets the late layers, already close to the final logits, settle instead of being shaken.
    optimizer = optim.Adam(learning_rate=optim.linear_schedule(learning_rate, 0.0, steps))
    # Position 0 is the BOS token, whose residual is the attention sink's, hundreds of times
    # larger than the rest: its KL would swamp every gradient and says nothing about the text.
    loss_and_grad = nn.value_and_grad(
        lens, lambda tokens: lens_kl(model, lens, head, tokens)[:, :, 1:].mean())
    order = np.random.default_rng(seed).permutation(len(windows))
    started, losses = time.perf_counter(), []
    shown = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(range(steps), desc="tuned lens", disable=not shown)
    for step in bar:
        chosen = np.resize(order, (step + 1) * batch)[step * batch:]  # cycles through the windows
        loss, grads = loss_and_grad(windows[mx.array(chosen)])
        optimizer.update(lens, grads)
        mx.eval(lens.parameters(), optimizer.state, loss)
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    texts_sha256 = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    lens.trained_on = {"texts": len(texts), "texts_sha256": texts_sha256, "windows": len(windows),
                       "length": length, "batch": batch, "steps": steps,
                       "tokens_seen": steps * batch * length,
                       "learning_rate": learning_rate, "seed": seed,
                       "seconds": round(time.perf_counter() - started, 1),
                       "first_loss": losses[0], "last_loss": losses[-1]}
    return lens
