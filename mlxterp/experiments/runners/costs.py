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
seconds, plus `per_shape` for each distinct shape; the three numbers are measured on the
model's first block, in its dtype, on the default device, the first time a sweep needs them.
"""

from __future__ import annotations

import itertools
import time
import weakref
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxterp.tracing.intercept import call_parameters

CALIBRATION_POSITIONS = 16
CALIBRATION_ROWS = 16
# Each calibration's first call is in a shape of its own (3 rows, 17, 18, ... positions), so that
# it pays for whatever the backend builds per shape even when an earlier calibration ran.
_fresh_positions = itertools.count(CALIBRATION_POSITIONS + 1)


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

    def predict(self, calls: list[tuple[int, int]]) -> float:
        """Seconds for these (rows, positions) block calls."""
        return (sum(self.fixed + self.per_position * rows * positions for rows, positions in calls)
                + self.per_shape * len(set(calls)))


_measured: dict[tuple, BlockCosts] = {}  # (block id, device, its parameters' dtypes) -> costs


def block_costs(model) -> BlockCosts | None:
    """The costs of `model`'s blocks on the default device, measured once per block, device and
    dtype and remembered; None where the blocks are not called as `block(x, mask, cache)` (then
    they cannot be timed alone).

    Example:
        >>> block_costs(model).fixed   # seconds of a block call's fixed part
        0.0015
    """
    name = model.tree.blocks[0]
    block = model.tree.modules[name]
    if not called_with_cache(block):
        return None
    dtypes = sorted({str(w.dtype) for _, w in tree_flatten(block.parameters())})
    key = (id(block), str(mx.default_device()), *dtypes)
    if key not in _measured:
        # A real block input (one token) gives the width and dtype, whatever the weights' layout
        # (a quantized block's matrices are packed integers and scales).
        with model.trace(mx.array([[0]]), capture=[f"{name}:input"]) as trace:
            sample = trace.activations[f"{name}:input"]
        _measured[key] = _calibrate(block, sample.shape[-1], sample.dtype)
        weakref.finalize(block, _measured.pop, key, None)  # an id is reused once its block is gone
    return _measured[key]


def called_with_cache(block) -> bool:
    """Whether a block is called as `block(x, mask, cache)`: mlx-lm's attention-cache protocol,
    which lets it be timed alone and lets the engine's rows compute a suffix of positions."""
    return call_parameters(type(block))[1:] == ("mask", "cache")


def _calibrate(block, width: int, dtype: mx.Dtype) -> BlockCosts:
    def seconds(rows: int, positions: int) -> float:
        x = mx.random.normal((rows, positions, width), key=mx.random.key(0)).astype(dtype)
        mx.eval(x)
        start = time.perf_counter()
        mx.eval(block(x, mask="causal", cache=None))
        return time.perf_counter() - start

    # Warm-up first: a backend's one-time work (loading or compiling kernels) is not per shape.
    seconds(1, CALIBRATION_POSITIONS), seconds(CALIBRATION_ROWS, CALIBRATION_POSITIONS)
    one = min(seconds(1, CALIBRATION_POSITIONS) for _ in range(3))
    many = min(seconds(CALIBRATION_ROWS, CALIBRATION_POSITIONS) for _ in range(3))
    fresh = (3, next(_fresh_positions))
    fresh_first = seconds(*fresh)
    fresh_again = min(seconds(*fresh) for _ in range(2))
    per_position = max(many - one, 0.0) / ((CALIBRATION_ROWS - 1) * CALIBRATION_POSITIONS)
    fixed = max(one - per_position * CALIBRATION_POSITIONS, 0.0)
    return BlockCosts(fixed, per_position, max(fresh_first - fresh_again, 0.0))
