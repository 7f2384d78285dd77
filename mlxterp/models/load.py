"""`load()`: a real model and its tokenizer from a bundled name, a GGUF file or anything mlx-lm loads."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxterp.errors import ModelLoadError
from mlxterp.models.bundled import BUNDLED
from mlxterp.models.gguf import convert_gguf
from mlxterp.models.identity import NAME_ATTRIBUTE, known_fingerprint

# Bump when the conversion changes, so that folders converted by older code are not reused.
CONVERTER_VERSION = 1
# Beside a converted model: its weights' fingerprint for results' provenance (models/identity.py).
FINGERPRINT_FILE = "mlxterp-fingerprint.json"

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def cache_dir() -> Path:
    """Where converted models live: `$MLXTERP_CACHE`, else `~/.cache/mlxterp`.

    It raises nothing: the folder is made on first use by `load`.
    """
    return Path(os.environ.get("MLXTERP_CACHE") or "~/.cache/mlxterp").expanduser()


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (half-precision matmuls are slow there), bfloat16 on a GPU."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def _resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    if dtype is None:
        return default_dtype()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    # Compared by type first: mx.Dtype's == raises TypeError for some other types (None).
    if not isinstance(dtype, mx.Dtype) or dtype not in _DTYPES.values():
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return dtype


def _dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf_path: Path, dtype: mx.Dtype, quantized: bool) -> Path:
    """The mlx-lm folder for a GGUF file, converting it on first use.

    The folder is keyed by the file's sha256, the dtype and the quantized flag. A conversion is
    written to a temporary folder and renamed into place only when complete, so a conversion
    that was interrupted is never read.

    Raises:
        ModelLoadError: a GGUF file mlxterp cannot convert.
    """
    key = f"{gguf_path.stem}-{_sha256(gguf_path)[:16]}-{_dtype_name(dtype)}"
    key += f"{'-quantized' if quantized else ''}-v{CONVERTER_VERSION}"
    folder = cache_dir() / "models" / key
    if folder.is_dir():
        return folder
    staging = folder.with_name(f".partial-{key}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_gguf(gguf_path, staging, dtype, quantized)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # only a concurrent conversion that finished first is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _unknown_name(name: str) -> ModelLoadError:
    bundled = "\n".join(f"  {m.name:14s} {m.description}" for m in BUNDLED.values())
    return ModelLoadError(
        f"unknown model {name!r}. Bundled models (no network needed):\n{bundled}\n"
        "Other models: a path to a .gguf file, a local mlx-lm folder, or a hub id of the form "
        "'org/name' (e.g. 'mlx-community/Llama-3.2-1B-Instruct-4bit')."
    )


def load(
    name_or_path: str | os.PathLike = "smollm2-135m",
    dtype: mx.Dtype | str | None = None,
    quantized: bool = False,
) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer, like `mlx_lm.load`, with bundled models that need no network.

    Args:
        name_or_path: a bundled name (`"smollm2-135m"`, `"gemma3-270m"`), a `.gguf` file of a
            supported architecture (llama, gemma3), a local mlx-lm folder, or a hub id `org/name`
            (passed to `mlx_lm.load` unchanged).
        dtype: `mx.float32`, `mx.bfloat16`, `mx.float16` or their names. Default: float32 on the
            CPU, bfloat16 on a GPU.
        quantized: for GGUF files, keep Q4_0/Q4_1/Q8_0 weights as MLX affine quantized weights
            (group size 32, exact repacking) instead of dequantizing them. Saves memory; logits
            are then close to, not equal to, the float32 ones (see docs/models.md).

    Returns:
        `(model, tokenizer)`, the tokenizer being mlx-lm's `TokenizerWrapper`.

    Raises:
        ModelLoadError: a name that is neither bundled nor a local folder or GGUF file, or a file
            that cannot be converted.
        InputTypeError: a dtype or name of the wrong type.

    Example:
        >>> model, tokenizer = mlxterp.load("smollm2-135m")
        >>> tokenizer.encode("The capital of France is")
        [504, 3575, 282, 4649, 314]
    """
    explicit_dtype = dtype is not None
    dtype = _resolve_dtype(dtype)
    if not isinstance(quantized, bool):
        raise ModelLoadError(f"quantized must be True or False; got {quantized!r}.")
    name, path = _name_and_path(name_or_path)
    if name in BUNDLED:
        gguf_path = BUNDLED[name].gguf_path(cache_dir())
    elif path.suffix == ".gguf":
        if not _is(path.is_file):
            raise ModelLoadError(f"no GGUF file at {path}")
        gguf_path = path
    else:
        is_folder = _is(path.is_dir)
        if _is(path.is_file):
            raise ModelLoadError(
                f"{path} is a file but not a model: a model path is a .gguf file or an mlx-lm "
                "model folder (config.json and *.safetensors); or give a bundled name or a hub id."
            )
        if not is_folder and not _HUB_ID.match(name):
            raise _unknown_name(name)
        if quantized:
            raise ModelLoadError(
                "quantized=True applies to GGUF files; an mlx-lm model keeps the quantization "
                "it was saved with."
            )
        if is_folder and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder but not an mlx-lm model folder: it has no config.json."
            )
        model, tokenizer = _mlx_lm_load(str(path) if is_folder else name, hub=not is_folder)
        if explicit_dtype:
            model.set_dtype(dtype)
        return _named(model, name), tokenizer
    folder = converted_folder(gguf_path, dtype, quantized)
    model, tokenizer = _mlx_lm_load(str(folder), hub=False)
    known_fingerprint(model, folder / FINGERPRINT_FILE)
    return _named(model, name), tokenizer


def _named(model: nn.Module, name: str) -> nn.Module:
    """`model`, recording the name it was loaded by for results (a plain attribute, not a
    parameter: the parameter tree is unchanged)."""
    object.__setattr__(model, NAME_ATTRIBUTE, name)
    return model


# A Hugging Face hub id: `org/name`, each part letters, digits, '-', '_' and '.', as the hub allows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$", re.ASCII)


def _name_and_path(name_or_path: object) -> tuple[str, Path]:
    """The name as a string and as a path with `~` expanded; a ModelLoadError if it is neither."""
    if not isinstance(name_or_path, str | os.PathLike):
        raise ModelLoadError(
            f"give the model as a name or a path (str or os.PathLike); got "
            f"{type(name_or_path).__name__} {name_or_path!r}."
        )
    name = os.fspath(name_or_path)
    if not isinstance(name, str):  # a PathLike of bytes
        raise ModelLoadError(f"give the path as a str, not {type(name).__name__} {name!r}.")
    if not name or "\0" in name:
        raise _unknown_name(name)
    try:
        return name, Path(name).expanduser()
    except RuntimeError as err:  # `~user` of a user that does not exist
        raise ModelLoadError(f"cannot expand the path {name!r}: {err}") from None


def _is(check) -> bool:
    """`path.is_file()` / `path.is_dir()`, with paths the system refuses (too long) as missing."""
    try:
        return check()
    except OSError:
        return False


def _mlx_lm_load(name: str, hub: bool) -> tuple[nn.Module, object]:
    """`mlx_lm.load`, its failures on a broken folder or an unreachable hub id as ModelLoadError."""
    import mlx_lm

    try:
        return mlx_lm.load(name)
    except (OSError, ValueError, KeyError) as err:
        # OSError: missing files, and the hub's errors (not found, offline); ValueError and
        # KeyError: a config.json that is not JSON, or names an unknown model type or misses keys.
        where = ("the Hugging Face hub (it needs network access, and the id must exist)" if hub
                 else "the folder")
        raise ModelLoadError(
            f"mlx-lm cannot load {name!r} from {where}: {type(err).__name__}: {err}"
        ) from err
