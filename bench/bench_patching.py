"""Patching sweeps on SmolLM2 (float32): the engine and the naive path, as multiples of one plain
forward of the bare model measured in the same run, with peak memory.

    .venv/bin/python bench/bench_patching.py            # everything (the naive runs take minutes)
    .venv/bin/python bench/bench_patching.py --quick    # engine only, naive MLP sweep only

Sweeps: the full-layer MLP sweep, the layer x position residual (block input) sweep and the
layer x head sweep, each on the 6-token and the 14-token pair. The naive path is the reference
procedure: one clean forward, then one patched forward per site, every activation captured.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.blas import blas_status

PAIRS = {
    "6-token": ("Paris is the capital of France", "London is the capital of France"),
    "14-token": ("When Mary and John went to the store, John gave a drink to",
                 "When John and Mary went to the store, Mary gave a drink to"),
}
SWEEPS = {
    "mlp x layer": dict(component="mlp", over=("layer",)),
    "input x layer x position": dict(component="input", over=("layer", "position")),
    "self_attn x layer x head": dict(component="self_attn", over=("layer", "head")),
}


def forward_time(base, ids: mx.array, repeats: int) -> float:
    """Median seconds of one plain forward of the bare model (evaluated)."""
    mx.eval(base(ids))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(base(ids))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep_time(model, clean: str, corrupted: str, naive: bool, options: dict) -> tuple[float, float]:
    """(seconds, peak GiB) of one sweep."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    model.patching_sweep(clean, corrupted, metric="kl", naive=naive, progress=False, **options)
    return time.perf_counter() - start, mx.get_peak_memory() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="engine only, naive MLP sweep only")
    parser.add_argument("--repeats", type=int, default=3, help="engine repeats (median)")
    args = parser.parse_args()

    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    status = blas_status()
    print(f"SmolLM2-135M float32, BLAS: {status.kind} ({status.library})")
    print(f"{'pair':<9} {'sweep':<26} {'sites':>5} {'engine':>8} {'naive':>8} "
          f"{'engine/naive':>12} {'peak GiB e/n':>13}")
    for pair, (clean, corrupted) in PAIRS.items():
        ids = mx.array([tokenizer.encode(clean)])
        forward = forward_time(base, ids, repeats=10)
        for name, options in SWEEPS.items():
            n_sites = len(model.patching_sweep(clean, corrupted, metric="kl", progress=False,
                                               **options).sites)
            engine_runs = [sweep_time(model, clean, corrupted, False, options)
                           for _ in range(args.repeats)]
            engine = statistics.median(t for t, _ in engine_runs)
            engine_peak = max(p for _, p in engine_runs)
            if args.quick and name != "mlp x layer":
                naive, naive_peak = float("nan"), float("nan")
            else:
                naive, naive_peak = sweep_time(model, clean, corrupted, True, options)
            print(f"{pair:<9} {name:<26} {n_sites:>5} {engine / forward:>7.2f}x {naive / forward:>7.1f}x "
                  f"{engine / naive:>12.3f} {engine_peak:>6.2f}/{naive_peak:<6.2f}")
        print(f"{'':<9} (one plain forward of the {pair} prompt: {forward * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
