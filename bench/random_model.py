"""A model of a bundled model's shape with random weights, and its real tokenizer, for timing on
machines the bundled weights do not travel to (the lent GPU machine; see scripts/gpu_prepare.sh).

    model, tokenizer = random_model(".gpu/model", "bfloat16")
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import _get_classes


def random_model(folder: str | Path, dtype: str = "float32", seed: int = 0) -> tuple[nn.Module, object]:
    """An mlx-lm model built from `folder`'s config.json with N(0, 0.02) weights (norms 1), and the
    tokenizer in `folder`."""
    config = json.loads((Path(folder) / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    weights = [(name, mx.ones_like(w) if w.ndim == 1 else 0.02 * mx.random.normal(w.shape))
               for name, w in tree_flatten(model.parameters())]
    model.update(tree_unflatten(weights))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    model.eval()
    return model, load_tokenizer(Path(folder))


def bundled_folder(name: str) -> Path:
    """The mlx-lm folder a bundled model converts to (config.json and tokenizer beside weights)."""
    from mlxterp.models.load import BUNDLED, cache_dir, converted_folder

    return converted_folder(BUNDLED[name].gguf_path(cache_dir()), mx.float32, False)
