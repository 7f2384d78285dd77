"""Causal tracing on SmolLM2 (float32): the engine's time as multiples of one plain forward of the
bare model and as a fraction of the naive procedure's, measured in the same run, and how far the
two disagree.

    .venv/bin/python bench/bench_causal_trace.py            # about 15 minutes on 2 cores
    .venv/bin/python bench/bench_causal_trace.py --samples 2   # a quicker look
    python3 bench/bench_causal_trace.py --random .gpu/model --dtype bfloat16   # the GPU machine

The workload of the issue: the three kinds (hidden; MLP and attention windows of 10 layers) of
a 10-token prompt over 30 layers with 10 noise samples: 3 x 30 x 10 x 10 = 9,000 restorations,
which the naive procedure runs as one forward each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp import InterpretableModel, Noise
from mlxterp.blas import blas_status
from mlxterp.experiments.analyses.causal_tracing import KINDS

sys.path.insert(0, str(Path(__file__).parent))
from random_model import random_model  # noqa: E402

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"  # 10 tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--random", metavar="FOLDER", help="random weights of FOLDER's config.json")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.random:
        base, tokenizer = random_model(args.random, args.dtype)
    else:
        base, tokenizer = mlxterp.load("smollm2-135m", dtype=args.dtype)
    model = InterpretableModel(base, tokenizer)
    ids = mx.array([tokenizer.encode(PROMPT)])
    mx.eval(base(ids))  # warm-up
    times = []
    for _ in range(20):
        start = time.perf_counter()
        mx.eval(base(ids))
        times.append(time.perf_counter() - start)
    forward = statistics.median(times)
    restorations = len(KINDS) * len(model.tree.blocks) * ids.shape[1] * args.samples
    print(f"SmolLM2-135M's shape, {args.dtype} on {mx.default_device()}, BLAS: {blas_status().kind}; "
          f"{ids.shape[1]}-token prompt, "
          f"{args.samples} samples, {restorations} restorations; one plain forward {forward * 1e3:.0f} ms")
    total = {"engine": 0.0, "naive": 0.0}
    for kind in KINDS:
        results = {}
        # Warm-up: the engine's forwards are in shapes of their own (one noise sample makes the
        # same batches), which a GPU back end builds kernels for on first sight.
        model.causal_trace(PROMPT, Noise(SUBJECT, samples=1), kind=kind)
        for runner in ("engine", "naive"):
            start = time.perf_counter()
            results[runner] = model.causal_trace(PROMPT, Noise(SUBJECT, samples=args.samples), kind=kind,
                                                 naive=runner == "naive")
            seconds = time.perf_counter() - start
            total[runner] += seconds
            print(f"  {kind:<7} {runner:<6} {seconds:7.1f} s  {seconds / forward:8.1f}x forward", flush=True)
        gap = np.abs(results["engine"].effect.mean(axis=0) - results["naive"].effect.mean(axis=0)).max()
        print(f"  {kind:<7} engine vs naive: largest difference of mean effect {gap * 100:.2e} pp")
    print(f"all three kinds: engine {total['engine']:.1f} s ({total['engine'] / forward:.0f}x forward), "
          f"naive {total['naive']:.1f} s ({total['naive'] / forward:.0f}x forward); "
          f"engine / naive = 1/{total['naive'] / total['engine']:.1f}")


if __name__ == "__main__":
    main()
