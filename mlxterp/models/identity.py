"""What a model is, for the record: its name and a hash of its weights.

Results carry these so that a saved result says which model made it, even after the file that
held the model is gone or a cache was rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxterp.paths import write_atomically

NAME_ATTRIBUTE = "mlxterp_name"  # set by `load` on the models it returns

_fingerprints: dict[tuple[int, ...], tuple[str, str]] = {}  # parameter array ids -> (sha256, dtype)


def model_name(model: nn.Module) -> str:
    """The name the model was loaded by (`"smollm2-135m"`, a path, a hub id), else its class."""
    return getattr(model, NAME_ATTRIBUTE, None) or f"{type(model).__module__}.{type(model).__name__}"


def fingerprint(model: nn.Module) -> tuple[str, str]:
    """(sha256 of every parameter's name and bytes in tree order, the dtype of the floating-point
    parameters or `"mixed"`), from one walk of the parameters (hashing SmolLM2's 135M: 0.4 s).

    Cached by the identity of the parameter arrays, so casting or loading new weights re-hashes;
    an array changed in place (`w[...] = v`) keeps its identity and is not hashed again.

    Example:
        >>> fingerprint(model)
        ('26a5d4629f58...', 'float32')
    """
    key = tuple(_array_ids(model, []))
    if key not in _fingerprints:
        _remember(model, key, _hash(model))
    return _fingerprints[key]


def _remember(model: nn.Module, key: tuple[int, ...], value: tuple[str, str]) -> tuple[str, str]:
    _fingerprints[key] = value
    weakref.finalize(model, _fingerprints.pop, key, None)  # ids are reused once arrays are gone
    return value


def parameter_layout(module: nn.Module) -> str:
    """Every parameter's name, shape and dtype, in tree order: what a module computes with,
    whatever the values (the key of stored fingerprints and of stored block costs).

    Example:
        >>> parameter_layout(model.layers[0])[:40]
        'self_attn.q_proj.weight(576, 576)float32'
    """
    return ",".join(f"{name}{tuple(w.shape)}{str(w.dtype).removeprefix('mlx.core.')}"
                    for name, w in tree_flatten(module.parameters()))


def _hash(model: nn.Module) -> tuple[str, str]:
    parameters = tree_flatten(model.parameters())
    digest = hashlib.sha256()
    for name, array in parameters:
        mx.eval(array)
        digest.update(name.encode())
        digest.update(memoryview(mx.contiguous(array)))  # a view (a transpose) is hashed in order
    dtypes = {str(array.dtype).removeprefix("mlx.core.") for _, array in parameters
              if mx.issubdtype(array.dtype, mx.floating)}
    return digest.hexdigest(), dtypes.pop() if len(dtypes) == 1 else "mixed"


# Bump when `_hash` changes what it hashes, so that stored fingerprints are not reused.
FINGERPRINT_FORMAT = 1


def known_fingerprint(model: nn.Module, path: Path) -> None:
    """Read `model`'s fingerprint from `path`, or hash it and write it there: for weights in a
    folder that never changes (a converted model in the cache), so that only its first load
    hashes them, not every process's first sweep (0.3 s for SmolLM2 on this project's CPU). The
    file is used only where it was written for the same parameter names, shapes and dtypes by
    the same format and mlx-lm version (which builds the parameter tree).

    Example:
        >>> known_fingerprint(model, folder / "mlxterp-fingerprint.json")
    """
    import mlx_lm

    layout = hashlib.sha256(parameter_layout(model).encode()).hexdigest()
    written_for = {"format": FINGERPRINT_FORMAT, "mlx_lm": mlx_lm.__version__, "layout": layout}
    key = tuple(_array_ids(model, []))
    try:
        stored = json.loads(path.read_text())
        if {name: stored.get(name) for name in written_for} == written_for:
            _remember(model, key, (str(stored["sha256"]), str(stored["dtype"])))
            return
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not written yet, or broken
        pass
    sha256, dtype = _remember(model, key, _hash(model))
    try:
        write_atomically(path, lambda temporary: temporary.write_text(
            json.dumps({**written_for, "sha256": sha256, "dtype": dtype})))
    except OSError as err:
        warnings.warn(f"could not store the weights' fingerprint in {path} ({err}); the next process "
                      "hashes them again.", stacklevel=2)


def _array_ids(tree, ids: list[int]) -> list[int]:
    """The ids of every array in a module tree, in order: the cache key of `fingerprint`. A plain
    walk (0.13 ms for SmolLM2 here, against 0.7 ms for `tree_flatten(model.parameters())`, which
    is host time of every sweep); it may include arrays that are not parameters, which only makes
    the key stricter."""
    if isinstance(tree, mx.array):
        ids.append(id(tree))
    elif isinstance(tree, dict):
        for value in tree.values():
            _array_ids(value, ids)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _array_ids(value, ids)
    return ids


def weights_sha256(model: nn.Module) -> str:
    """sha256 of every parameter's name and bytes, in tree order (see `fingerprint`).

    Example:
        >>> weights_sha256(model)[:12]
        '26a5d4629f58'
    """
    return fingerprint(model)[0]


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model was trained for (mlx-lm's `max_position_embeddings` or
    `n_positions`), or None where its configuration does not say.

    Example:
        >>> context_length(mlxterp.load("smollm2-135m")[0])
        8192
    """
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
