"""Peak memory of the 30-layer MLP sweep against the engine's estimate, and a sweep held to a
budget. For each length: the measured peak above the weights (`mx.get_peak_memory()` minus the
memory active before the sweep) with all 32 rows in one forward, per row, beside
`engine.bytes_per_row`; then the same sweep under a budget of 8 rows' estimate, which must
chunk it and stay under that budget.

    .venv/bin/python bench/bench_memory.py                       # SmolLM2, 6/14/128/512 tokens
    .venv/bin/python bench/bench_memory.py --model gemma3-270m --lengths 6 128
"""

from __future__ import annotations

import argparse

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.experiments.runners.engine import bytes_per_row

MIB = 2**20


def peak_above_weights(model, clean: mx.array, corrupted: mx.array, **options) -> int:
    """Bytes of the sweep's peak above what was held before it."""
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model.patching_sweep(clean, corrupted, metric="kl", progress=False, **options)
    return mx.get_peak_memory() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[6, 14, 128, 512])
    args = parser.parse_args()
    model = InterpretableModel(*mlxterp.load(args.model))
    layers = len(model.tree.blocks)
    print(f"{args.model}, {layers}-layer MLP sweep ({layers + 2} rows), device {mx.default_device()}")
    print(f"{'tokens':>6} {'peak MiB':>9} {'per row':>8} {'estimate':>9} {'est/meas':>8} "
          f"{'budget MiB':>10} {'peak MiB':>9} {'within':>6}")
    for length in args.lengths:
        clean = mx.random.randint(100, 20000, (1, length), key=mx.random.key(length))
        corrupted = clean.at[0, 1].add(1)  # differs at token 1: every row computes ~all positions
        peak = peak_above_weights(model, clean, corrupted, max_batch=layers)
        per_row, estimate = peak / (layers + 2), bytes_per_row(model, length)
        budget = 8 * estimate  # 6 patched rows a forward, beside the 2 base rows
        held = peak_above_weights(model, clean, corrupted, memory_budget=budget)
        print(f"{length:>6} {peak / MIB:>9.1f} {per_row / MIB:>8.2f} {estimate / MIB:>9.2f} "
              f"{estimate / per_row:>7.2f}x {budget / MIB:>10.1f} {held / MIB:>9.1f} "
              f"{'yes' if held <= budget else 'NO':>6}", flush=True)


if __name__ == "__main__":
    main()
