"""The engine's two strategies side by side, as multiples of one plain forward measured in the same
run: `grow` (rows join at their block and compute only the positions they can change: least
arithmetic) and `flat` (every row from the first block at full length: fewest kernel launches,
one shape), with the number of distinct attention shapes each builds.

    .venv/bin/python bench/bench_strategies.py                       # bundled SmolLM2, float32
    python3 bench/bench_strategies.py --random .gpu/model --dtype bfloat16   # on the GPU machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.base as mlx_lm_base

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.experiments.pipeline.metrics import measure
from mlxterp.experiments.pipeline.options import SweepOptions
from mlxterp.experiments.pipeline.sweep import prepare_sweeps
from mlxterp.experiments.runners.costs import block_costs
from mlxterp.experiments.runners.engine import _BatchedForward, cheaper_strategy, run_engine

sys.path.insert(0, str(Path(__file__).parent))
from bench_patching import PAIRS, SWEEPS  # noqa: E402
from random_model import random_model  # noqa: E402

attention_shapes: set = set()
_sdpa = mlx_lm_base.scaled_dot_product_attention


def counting_sdpa(queries, keys, values, cache, scale, mask, **kwargs):
    """mlx-lm's attention, recording the shapes a backend would build a kernel plan for."""
    mask_shape = tuple(mask.shape) if isinstance(mask, mx.array) else mask
    attention_shapes.add((tuple(queries.shape), tuple(keys.shape), mask_shape))
    return _sdpa(queries, keys, values, cache, scale, mask, **kwargs)


def seconds(run, repeats: int) -> tuple[float, float]:
    """(first call, median of the following `repeats`), each evaluated."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", metavar="FOLDER", help="random weights of FOLDER's config.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweeps", nargs="*", default=list(SWEEPS))
    args = parser.parse_args()
    if args.random:
        base, tokenizer = random_model(args.random, args.dtype)
    else:
        base, tokenizer = mlxterp.load("smollm2-135m", dtype=args.dtype)
    for name in list(sys.modules):  # every family module imported the function by name
        module = sys.modules[name]
        if name.startswith("mlx_lm.models.") and getattr(module, "scaled_dot_product_attention",
                                                         None) is _sdpa:
            module.scaled_dot_product_attention = counting_sdpa
    model = InterpretableModel(base, tokenizer)
    print(f"{args.dtype} on {mx.default_device()}, mlx {mx.__version__}")
    start = time.perf_counter()
    costs = block_costs(model)
    print(f"block costs, measured in {time.perf_counter() - start:.2f} s: fixed {costs.fixed * 1e3:.3f} ms, "
          f"per row-position {costs.per_position * 1e6:.3f} us, per new shape {costs.per_shape * 1e3:.2f} ms")
    for pair, (clean, corrupted) in PAIRS.items():
        ids = mx.array([tokenizer.encode(clean)])
        _, forward = seconds(lambda ids=ids: base(ids), 10)
        _, batch32 = seconds(lambda ids=ids: base(mx.repeat(ids, 32, axis=0)), 10)
        print(f"{pair}: forward {forward * 1e3:.1f} ms, batch of 32 {batch32 / forward:.2f}x")
        for sweep in args.sweeps:
            plan = prepare_sweeps(model, clean, corrupted, SweepOptions(metric="kl", **SWEEPS[sweep]))[0].plan
            forwards = {s: [_BatchedForward(model, plan, 0, list(plan.sites), s)] for s in ("grow", "flat")}
            predicted = {s: costs.predict(f[0].block_calls()) for s, f in forwards.items()}
            print(f"  {sweep}: the engine chooses {cheaper_strategy(model, forwards)}; blocks predicted "
                  + ", ".join(f"{s} {t / forward:.1f}x" for s, t in predicted.items()))
            for strategy in ("grow", "flat"):
                attention_shapes.clear()
                first, median = seconds(
                    lambda plan=plan, s=strategy: run_engine(model, plan, strategy=s, progress=False).patched,
                    args.repeats)
                print(f"  {sweep:<26} {strategy:<5} {len(plan.sites):>4} sites  first {first / forward:8.1f}x"
                      f"  then {median / forward:7.2f}x  ({median * 1e3:8.1f} ms)  "
                      f"{len(attention_shapes):>4} attention shapes", flush=True)
                # Where the time goes: the batched forward alone, then measuring its rows.
                def batched(plan=plan, s=strategy):  # a forward runs once: a new one each time
                    return _BatchedForward(model, plan, 0, list(plan.sites), s).run()

                _, alone = seconds(batched, args.repeats)
                logits = batched()
                _, measuring = seconds(lambda plan=plan, logits=logits: measure(
                    plan.metric, logits, logits[plan.donor])[0], args.repeats)
                print(f"  {'':<26} {'':<5} {'':>4}        forward alone {alone / forward:.2f}x, measuring "
                      f"{measuring / forward:.2f}x", flush=True)


if __name__ == "__main__":
    main()
