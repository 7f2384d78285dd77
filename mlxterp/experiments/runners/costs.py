"""What one block call costs on this device, measured once per model: what the engine's choice
of strategy (`engine.cheaper_strategy`) predicts with.

The engine can run a chunk of patched rows two ways (see engine.py): GROW appends each row at
its own block and computes only the positions it can change, which saves arithmetic; FLAT puts
every row in at the first block at full length, which makes the fewest calls in one shape. Which
is faster is a property of the device, not of the sweep alone:

- on a CPU a block's time grows with rows x positions, so GROW wins (SmolLM2, 14-token pair,
  30-layer MLP sweep: 7.2x a forward against 10.4x flat; bench/results/cpu-strategies-*.txt);
- on a GPU a small model is bound by kernel launches, so a call costs about the same whatever its
  rows, and every extra call GROW makes for its suffix rows costs a launch sequence;
- MLX on CUDA builds a cuDNN attention graph for every new shape in half precision (40-78 ms
  each on an H200) and keeps a bounded cache of them. GROW's layer x position sweep of a 14-token
  pair makes 391 shapes, over the cache: every call rebuilt its graph and the sweep took 17 s,
  where FLAT's one shape took 29 ms (bench/results/h200-2026-12-02/).

So a block call of r rows over n positions is modelled as `fixed + per_position * r * n`
seconds, plus `per_shape` for each shape the backend has not built yet; the three numbers are
measured on the model's first block, in its dtype, on the default device, the first time a
sweep needs them, and kept in `block-costs.json` of the cache folder for the next process (keyed
by the device, MLX's version and the block's class, parameter shapes and dtypes: the weights'
values do not change what a call costs) for `STORE_DAYS`. Delete that file to measure again.

A shape is built once per process and kept: MLX 0.31-0.32's CUDA back end keeps the 256 most
recent cuDNN attention graphs (`MLX_CUDA_SDPA_CACHE_SIZE`) and 400 CUDA graphs, so the shapes a
chosen sweep ran are not charged again while they fit the smaller cache. Charging them every
call made the engine choose FLAT for the 6-token float32 MLP sweep on an H100, where GROW's 30
shapes, once built, took 1.03x a forward against FLAT's 1.38x.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import mlx.core as mx

from mlxterp.blas import blas_status
from mlxterp.experiments.pipeline.metrics import available_cores
from mlxterp.models.identity import parameter_layout
from mlxterp.models.load import cache_dir
from mlxterp.paths import write_atomically
from mlxterp.tracing.intercept import call_parameters

CALIBRATION_POSITIONS = 16
CALIBRATION_ROWS = 16
CHAIN = 8  # block calls in a row, evaluated once: what a call adds inside a forward
# Each calibration's first call is in a shape of its own (3 rows, 17, 18, ... positions), so that
# it pays for whatever the backend builds per shape even when an earlier calibration ran.
_fresh_positions = itertools.count(CALIBRATION_POSITIONS + 1)


def _shapes_kept() -> int:
    """The fewest shapes an MLX back end keeps what it built for: CUDA's cuDNN attention graphs,
    256 by default (mlx/backend/cuda/scaled_dot_product_attention.cpp, MLX 0.31-0.32)."""
    setting = os.environ.get("MLX_CUDA_SDPA_CACHE_SIZE", "")
    return max(int(setting), 1) if setting.strip().isdigit() else 256


SHAPES_KEPT = _shapes_kept()
STORE_NAME = "block-costs.json"
STORE_DAYS = 30  # a stored measurement older than this is measured again
CALIBRATION_VERSION = 2  # bump when `_calibrate` changes what it measures


@dataclass(frozen=True)
class BlockCosts:
    """Seconds of one block call: `fixed + per_position * rows * positions`, and `per_shape` for
    the first call in a shape.

    Example:
        >>> costs = block_costs(model)
        >>> costs.predict([(32, 14)] * 30)   # a flat forward of 32 rows of 14 positions
    """

    fixed: float
    per_position: float
    per_shape: float
    # Shapes of the calls recorded as run in this process, least recent first.
    built: OrderedDict = field(default_factory=OrderedDict, compare=False, repr=False)

    def predict(self, calls: list[tuple[int, int]]) -> float:
        """Seconds for these (rows, positions) block calls: `per_shape` for each shape not yet
        built, or for every shape where they are more than the back end keeps (then each call
        evicts a graph the next one needs)."""
        shapes = set(calls)
        new = shapes if len(shapes) > SHAPES_KEPT else shapes - self.built.keys()
        return (sum(self.fixed + self.per_position * rows * positions for rows, positions in calls)
                + self.per_shape * len(new))

    def record(self, calls: list[tuple[int, int]]) -> None:
        """Remember these calls' shapes as built, keeping the `SHAPES_KEPT` most recent."""
        for shape in calls:
            self.built[shape] = None
            self.built.move_to_end(shape)
        while len(self.built) > SHAPES_KEPT:
            self.built.popitem(last=False)


_measured: dict[str, BlockCosts] = {}  # `_stored_key` -> costs, with the shapes built in this process


def block_costs(model) -> BlockCosts | None:
    """The costs of `model`'s blocks on the default device: remembered per block shape, device
    and dtype, read from the cache folder's `block-costs.json` where a block of the same class,
    shapes and dtypes was measured on this device before, else measured (0.1-0.4 s) and stored
    there; None where the blocks are not called as `block(x, mask, cache)` (then they cannot be
    timed alone).

    Example:
        >>> block_costs(model).fixed   # seconds of a block call's fixed part
        0.0015
    """
    name = model.tree.blocks[0]
    block = model.tree.modules[name]
    if not called_with_cache(block):
        return None
    key = _stored_key(block)
    if key not in _measured:
        costs = _stored(key)
        if costs is None:
            # A real block input (one token) gives the width and dtype, whatever the weights'
            # layout (a quantized block's matrices are packed integers and scales).
            with model.trace(mx.array([[0]]), capture=[f"{name}:input"]) as trace:
                sample = trace.activations[f"{name}:input"]
            costs = _calibrate(block, sample.shape[-1], sample.dtype)
            _store(key, costs)
        _measured[key] = costs
    return _measured[key]


def _stored_key(block) -> str:
    """What a block call's cost depends on: the device (a CPU's cores and BLAS; a GPU's TF32
    setting), MLX's version, the calibration's, and the block's class and its parameters' shapes
    and dtypes."""
    kind = f"{type(block).__module__}.{type(block).__qualname__}"
    return f"{_device()} | mlx {mx.__version__} v{CALIBRATION_VERSION} | {kind} | {parameter_layout(block)}"


@functools.cache
def _device_of(device: str) -> str:
    info = mx.device_info()
    name = f"{device} {info.get('device_name', '')}".strip()
    if mx.default_device() == mx.cpu:
        return f"{name} x{available_cores()} {blas_status().kind} BLAS"
    return f"{name} TF32={os.environ.get('MLX_ENABLE_TF32', '')}"


def _device() -> str:
    return _device_of(str(mx.default_device()))


def _store_path() -> Path:
    return cache_dir() / STORE_NAME


def _stored_entries() -> dict[str, dict]:
    """The store's entries, or none where the file is missing or not a JSON object (it is only
    a cache: a broken one is measured again and rewritten)."""
    try:
        entries = json.loads(_store_path().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _stored(key: str) -> BlockCosts | None:
    """The stored costs for `key`, or None where absent, malformed or older than `STORE_DAYS`."""
    entry = _stored_entries().get(key)
    try:
        if (date.today() - date.fromisoformat(entry["measured"])).days > STORE_DAYS:
            return None
        return BlockCosts(float(entry["fixed"]), float(entry["per_position"]), float(entry["per_shape"]))
    except (TypeError, KeyError, ValueError):  # absent, or written by hand wrongly
        return None


def _store(key: str, costs: BlockCosts) -> None:
    """Add one entry to the store, written whole (two processes measuring at once may each keep
    only their own entry: the other is measured again later)."""
    entries = _stored_entries()
    entries[key] = {"fixed": costs.fixed, "per_position": costs.per_position, "per_shape": costs.per_shape,
                    "measured": date.today().isoformat()}
    path = _store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(entries, indent=1)))
    except OSError as err:
        warnings.warn(f"could not store the measured block costs in {path} ({err}); they are kept "
                      "for this process and measured again in the next one.", stacklevel=3)


def called_with_cache(block) -> bool:
    """Whether a block is called as `block(x, mask, cache)`: mlx-lm's attention-cache protocol,
    which lets it be timed alone and lets the engine's rows compute a suffix of positions."""
    return call_parameters(type(block))[1:] == ("mask", "cache")


def _calibrate(block, width: int, dtype: mx.Dtype) -> BlockCosts:
    def seconds(rows: int, positions: int, calls: int = 1) -> float:
        x = mx.random.normal((rows, positions, width), key=mx.random.key(0)).astype(dtype)
        mx.eval(x)
        start = time.perf_counter()
        for _ in range(calls):
            x = block(x, mask="causal", cache=None)
        mx.eval(x)
        return time.perf_counter() - start

    # Warm-up first: a backend's one-time work (loading or compiling kernels) is not per shape.
    seconds(1, CALIBRATION_POSITIONS), seconds(CALIBRATION_ROWS, CALIBRATION_POSITIONS)
    one = min(seconds(1, CALIBRATION_POSITIONS) for _ in range(3))
    many = min(seconds(CALIBRATION_ROWS, CALIBRATION_POSITIONS) for _ in range(3))
    # A forward's block calls run one after another with one synchronisation at the end, so a
    # call's fixed cost is what each call of a chain adds, not one call's time with its own.
    chain = min(seconds(1, CALIBRATION_POSITIONS, CHAIN) for _ in range(3))
    fresh = (3, next(_fresh_positions))
    fresh_first = seconds(*fresh)
    fresh_again = min(seconds(*fresh) for _ in range(2))
    per_position = max(many - one, 0.0) / ((CALIBRATION_ROWS - 1) * CALIBRATION_POSITIONS)
    fixed = max((chain - one) / (CHAIN - 1) - per_position * CALIBRATION_POSITIONS, 0.0)
    return BlockCosts(fixed, per_position, max(fresh_first - fresh_again, 0.0))
