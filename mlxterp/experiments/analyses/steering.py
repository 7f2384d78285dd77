"""Steering vectors: the mean activation difference between contrasting prompts.

Contrastive activation addition (Rimsky et al. 2024) takes pairs of prompts that differ in one
concept, reads an activation at one token of each, and averages positive minus negative over
the pairs; ActAdd (Turner et al. 2023) is the one-pair case. Adding `alpha` times the vector to
the same activation while the model runs (`model.generate`) steers what it writes.

A `SteeringVector` is a value: the vector, where it was read (layer, component, position), and
the identity of the model it belongs to, which `load` checks.

Example:
    >>> v = model.steering_vector(["I love weddings"], ["I love meetings"], layer=6)
    >>> model.generate("Today I", interventions=v.interventions(alpha=1.0)).text
    >>> v.save("weddings.safetensors")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mlxterp.errors import InputTypeError, SteeringVectorError
from mlxterp.experiments.pipeline.sites import block_component_key, check_component, check_layer
from mlxterp.interventions import add_vector
from mlxterp.models.identity import model_name, weights_sha256
from mlxterp.paths import output_path, write_atomically
from mlxterp.tracing.inputs import is_index
from mlxterp.tracing.trace import Intervention

FORMAT = "mlxterp-steering-vector/1"  # in the safetensors metadata


@dataclass(frozen=True, eq=False)  # holds an mx.array, which has no truth value to compare by
class SteeringVector:
    """A direction in one activation of one model, to add while it runs.

    `vector` has the activation's width (float32); `layer` and `component` say where it was read
    (`"output"`: the block's output, the residual stream after it); `blocks` is the full name of
    the model's block list and `n_layers` its length; `model` and `model_sha256` identify the
    model (`mlxterp.models.identity`); `pairs` and `position` say how it was made.

    Example:
        >>> v.interventions(alpha=1.0)            # {'model.model.layers.6': add 1.0 * v}
        >>> v.interventions(alpha=1.0, layer=8)   # the same vector added after block 8
    """

    vector: mx.array
    layer: int
    component: str
    blocks: str
    n_layers: int
    model: str
    model_sha256: str
    pairs: int
    position: int

    def __post_init__(self):
        if not isinstance(self.vector, mx.array) or self.vector.ndim != 1:
            got = (f"shape {tuple(self.vector.shape)}" if isinstance(self.vector, mx.array)
                   else type(self.vector).__name__)
            raise SteeringVectorError(
                f"a steering vector is a 1-D mx.array of the activation's width; got {got}."
            )
        if not mx.issubdtype(self.vector.dtype, mx.floating):
            raise SteeringVectorError(
                f"a steering vector holds floating-point numbers; got dtype {self.vector.dtype}. "
                "Convert it, e.g. vector.astype(mx.float32)."
            )
        self._check_layer(self.layer)

    def _check_layer(self, layer: object) -> int:
        if not is_index(layer):
            raise InputTypeError(f"layer={layer!r}: give a block index, a whole number such as 6.")
        if not 0 <= layer < self.n_layers:
            raise SteeringVectorError(
                f"layer {layer} is out of range: the model has {self.n_layers} layers "
                f"(0 to {self.n_layers - 1})."
            )
        return int(layer)

    @property
    def width(self) -> int:
        """The activation width the vector is for (the model's hidden size, for block outputs)."""
        return self.vector.shape[0]

    def key(self, layer: int | None = None) -> str:
        """The activation key the vector is added to: its own layer's, or `layer`'s."""
        layer = self.layer if layer is None else self._check_layer(layer)
        return block_component_key(f"{self.blocks}.{layer}", self.component)

    def interventions(self, alpha: float, layer: int | None = None) -> dict[str, Intervention]:
        """`{key: add alpha * vector}` at every position, for `model.generate` or `model.trace`
        (merge it with other interventions: `{**v.interventions(1.0), "layers.3.mlp": ...}`).

        Example:
            >>> model.generate("Today I", interventions=v.interventions(alpha=1.0, layer=8))
        """
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise InputTypeError(f"alpha must be a finite number; got {type(alpha).__name__} {alpha!r}.")
        return {self.key(layer): add_vector(alpha * self.vector)}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the vector and where it came from to a .safetensors file (an existing one only
        with `overwrite=True`).

        Example:
            >>> v.save("weddings.safetensors")
        """
        path = output_path(path, {".safetensors"}, overwrite)
        metadata = {"format": FORMAT, "layer": str(self.layer), "component": self.component,
                    "blocks": self.blocks, "n_layers": str(self.n_layers), "model": self.model,
                    "model_sha256": self.model_sha256, "pairs": str(self.pairs),
                    "position": str(self.position)}
        return write_atomically(path, lambda temporary: mx.save_safetensors(
            str(temporary), {"vector": self.vector}, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, model) -> SteeringVector:
        """Read a vector saved by `save`, checking that it was made on `model` (an
        `InterpretableModel`): the same weights, by their sha256.

        Example:
            >>> v = SteeringVector.load("weddings.safetensors", model)
        """
        path = Path(path)
        try:
            arrays, metadata = mx.load(str(path), return_metadata=True)
        except (RuntimeError, ValueError) as err:  # mx.load: a missing or unreadable file, a bad suffix
            raise SteeringVectorError(f"cannot read a steering vector from {path}: {err}") from err
        if metadata.get("format") != FORMAT or "vector" not in arrays:
            raise SteeringVectorError(
                f"{path} is not a steering vector saved by mlxterp (format {metadata.get('format')!r}, "
                f"expected {FORMAT!r})."
            )
        sha256 = weights_sha256(model.model)
        if metadata["model_sha256"] != sha256:
            raise SteeringVectorError(
                f"{path} was made on {metadata['model']!r} (weights sha256 {metadata['model_sha256'][:12]}), "
                f"not on this model, {model_name(model.model)!r} (sha256 {sha256[:12]}); make a vector "
                "for this model with model.steering_vector(...)."
            )
        return cls(vector=arrays["vector"], layer=int(metadata["layer"]), component=metadata["component"],
                   blocks=metadata["blocks"], n_layers=int(metadata["n_layers"]), model=metadata["model"],
                   model_sha256=sha256, pairs=int(metadata["pairs"]), position=int(metadata["position"]))


def steering_vector(model, positive: str | Sequence[str], negative: str | Sequence[str], layer: int,
                    component: str = "output", position: int = -1) -> SteeringVector:
    """The mean over pairs of `activation(positive[i]) - activation(negative[i])` at token
    `position` of each prompt (-1: its last token), read at `component` of block `layer`.

    Args:
        positive, negative: prompts (or one prompt each), paired in order; the two prompts of a
            pair may have different lengths.
        component: "output" (the block's output: the residual stream, as in CAA), "input", or
            a module inside the block ("mlp", "self_attn").

    Raises:
        InputTypeError: prompts of the wrong type.
        SiteError: a layer out of range.
        SteeringVectorError: unequal numbers of positive and negative prompts.

    Example:
        >>> v = model.steering_vector(["I love weddings", "The bride smiled"],
        ...                           ["I love meetings", "The clerk smiled"], layer=6)
    """
    positive, negative = _prompts(positive, "positive"), _prompts(negative, "negative")
    if len(positive) != len(negative):
        raise SteeringVectorError(
            f"{len(positive)} positive and {len(negative)} negative prompts: give them in pairs, "
            "one negative prompt for each positive one."
        )
    layer = check_layer(model, layer)
    component = check_component(model, component)
    if not is_index(position):
        raise InputTypeError(f"position={position!r}: give a token index such as -1 (the last token).")
    key = block_component_key(model.tree.blocks[layer], component)
    differences = [_activation(model, p, key, position) - _activation(model, n, key, position)
                   for p, n in zip(positive, negative, strict=True)]
    vector = mx.mean(mx.stack(differences), axis=0).astype(mx.float32)
    mx.eval(vector)
    return SteeringVector(vector=vector, layer=layer, component=component, blocks=model.tree.blocks_name,
                          n_layers=len(model.tree.blocks), model=model_name(model.model),
                          model_sha256=weights_sha256(model.model), pairs=len(positive),
                          position=int(position))


def _prompts(prompts: object, which: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise InputTypeError(f"{which} must be a prompt or a list of prompts; got {prompts!r}.")
    if not prompts:
        raise SteeringVectorError(f"no {which} prompts given; give at least one pair.")
    return list(prompts)


def _activation(model, prompt: str, key: str, position: int) -> mx.array:
    """The activation `key` at token `position` of `prompt`, as a (width,) array."""
    with model.trace(prompt, capture=[key]) as trace:
        activation = trace.activations[key]
    length = activation.shape[1]
    if not -length <= position < length:
        raise SteeringVectorError(
            f"position {position} is out of range for {prompt!r}, which has {length} tokens "
            f"(valid: {-length} to {length - 1})."
        )
    return activation[0, position]
