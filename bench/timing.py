"""Interleaved timing shared by the benchmarks: on a shared, noisy machine, variants timed back
to back in a random order within each repeat are compared by per-repeat ratios, not means."""

import random
import statistics
import time
from collections.abc import Callable

import mlx.core as mx

Rounds = list[dict[str, tuple[float, object]]]


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> Rounds:
    """Run each variant once to warm up, then `repeats` rounds of all of them in a random order;
    per round, {name: (seconds, what the variant returned)}.

    Example:
        >>> rounds = interleaved({"forward": forward, "lens": lens}, repeats=7)
        >>> [r["lens"][0] / r["forward"][0] for r in rounds]
    """
    for run in variants.values():  # warm up: compile kernels, fill caches
        run()
    rounds = []
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        timed = {}
        for name in order:
            start = time.perf_counter()
            value = variants[name]()
            timed[name] = (time.perf_counter() - start, value)
        rounds.append(timed)
    return rounds


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """(median seconds, peak GiB of MLX memory) of `fn()` over `repeats` runs.

    Example:
        >>> seconds, peak = timed(lambda: mx.eval(model(ids)), repeats=10)
    """
    times, peak = [], 0.0
    for _ in range(repeats):
        mx.reset_peak_memory()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        peak = max(peak, mx.get_peak_memory() / 2**30)
    return statistics.median(times), peak
