"""Overhead of mlxterp's tracing on SmolLM2-135M (float32), as ratios to the bare forward.

Usage: python bench/bench_tracing.py [--repeats 30] [--warmup 2] [--lengths 8 128] [--profile]

For each prompt length it times four variants, each building the graph and then `mx.eval`ing
the logits:

    bare      base(ids)                                            the unwrapped mlx-lm model
    no trace  model(ids)                                           the wrapper, no trace active
    one       with model.trace(ids, capture=["layers.10.mlp"]): out = model.output.save()
    full      with model.trace(ids): out = model.output.save()     every module recorded

Within each repeat the four run back to back in a random order; each variant's time is divided
by the bare time of the same repeat, and the table shows the median of those ratios (the
machine may be shared and noisy: paired ratios and medians, not means). The build and the eval
are timed separately, to show where a difference comes from: a trace evaluates the bare
model's graph, so all it adds is Python work while the graph is built. That work is then
measured precisely, without eval, over more repeats. `--profile` shows where it goes (cProfile).

Goals: no trace <= 1.02x, one-module capture <= 1.05x, full capture <= 1.3x.
"""

import argparse
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# mlxterp first: importing it arms its OpenBLAS preload before anything loads mlx (what
# mlxterp_blas.pth does at interpreter start when mlxterp is installed; see mlxterp/blas.py).
import mlxterp  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.blas import blas_status  # noqa: E402

GOALS = {"no trace": 1.02, "one": 1.05, "full": 1.30}
CAPTURED = "layers.10.mlp"
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
)


def prompt_ids(model: InterpretableModel, length: int) -> mx.array:
    """A (1, length) array of real text tokens."""
    ids = model.encode(TEXT)
    while len(ids) < length:
        ids += ids
    return mx.array([ids[:length]])


def variants(base, model: InterpretableModel, ids: mx.array) -> dict:
    """Each variant builds the graph of the logits (lazily) and returns it."""

    def bare():
        return base(ids)

    def no_trace():
        return model(ids)

    def one():
        with model.trace(ids, capture=[CAPTURED]):
            out = model.output.save()
        return out

    def full():
        with model.trace(ids):
            out = model.output.save()
        return out

    return {"bare": bare, "no trace": no_trace, "one": one, "full": full}


def interleaved(fns: dict, repeats: int, warmup: int, evaluate: bool) -> dict[str, list]:
    """(build seconds, eval seconds) of each call of each fn. The fns run back to back in a
    fresh random order per repeat (a fixed or rotating order would give each fn the same
    predecessor every time). With evaluate=False the graphs are built and dropped."""
    names = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(warmup):
        for name in names:
            mx.eval(fns[name]())
    times = {name: [] for name in names}
    for _ in range(repeats):
        order = list(names)
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            out = fns[name]()
            built = time.perf_counter()
            if evaluate:
                mx.eval(out)
            times[name].append((built - start, time.perf_counter() - built))
            del out
    return times


def iqr(values: list[float]) -> float:
    """Interquartile range: how noisy a ratio was across repeats."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def paired_ratios(times: dict, name: str, part) -> list[float]:
    return [part(t) / part(b) for t, b in zip(times[name], times["bare"], strict=True)]


def check_same_output(fns: dict) -> None:
    """The benchmark compares like with like: every variant computes the bare logits."""
    bare = fns["bare"]()
    for name in GOALS:
        assert mx.array_equal(bare, fns[name]()).item(), f"{name} changed the logits"


def profile_trace(model: InterpretableModel, ids: mx.array, calls: int = 20) -> None:
    import cProfile
    import pstats

    build = variants(model.model, model, ids)["full"]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        build()
    profiler.disable()
    print(f"\ncProfile of {calls} full-capture trace builds ({ids.shape[1]} tokens, no eval):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--profile", action="store_true", help="cProfile a trace's Python side")
    args = parser.parse_args()

    base, tokenizer = mlxterp.load("smollm2-135m", dtype="float32")
    model = InterpretableModel(base, tokenizer=tokenizer)
    status = blas_status()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, SmolLM2-135M float32, "
          f"{len(model.layers)} layers, {len(model.module_names())} modules")
    print(f"BLAS: {status.kind} ({status.library})")
    if status.optimized is False:
        print(f"  warning: float32 matmuls run on a slow BLAS; fix: {status.fix}")
    print(f"{args.repeats} interleaved repeats per length\n")

    total = lambda t: t[0] + t[1]  # noqa: E731
    evaluation = lambda t: t[1]  # noqa: E731
    timing_rows, build_rows, misses, noisy = [], [], [], False
    for length in args.lengths:
        ids = prompt_ids(model, length)
        fns = variants(base, model, ids)
        check_same_output(fns)
        runs = interleaved(fns, args.repeats, args.warmup, evaluate=True)
        builds = interleaved(fns, max(5 * args.repeats, 50), args.warmup, evaluate=False)

        bare = statistics.median(total(t) for t in runs["bare"])
        ratios = {name: paired_ratios(runs, name, total) for name in GOALS}
        ratio = {name: statistics.median(r) for name, r in ratios.items()}
        eval_ratio = {name: statistics.median(paired_ratios(runs, name, evaluation))
                      for name in GOALS}
        spread = max(iqr(r) for r in ratios.values())
        timing_rows.append(
            f"{length:>6}  {bare * 1e3:>8.1f}  "
            + "  ".join(f"{ratio[name]:>8.3f}x" for name in GOALS)
            + f"  {spread:>9.3f}    "
            + " / ".join(f"{eval_ratio[name]:.3f}x" for name in GOALS))

        build = {name: statistics.median(t[0] for t in ts) for name, ts in builds.items()}
        extra = {name: build[name] - build["bare"] for name in GOALS}
        build_rows.append(
            f"{length:>6}  {build['bare'] * 1e3:>8.2f}  "
            + "  ".join(f"{extra[name] * 1e3:>+9.2f}" for name in GOALS) + "    "
            + " / ".join(f"{extra[name] / bare * 100:+.2f}%" for name in GOALS))

        misses += [f"{name} at {length} tokens: {ratio[name]:.3f}x > {goal}x"
                   for name, goal in GOALS.items() if ratio[name] > goal]
        noisy = noisy or spread > 0.05

    names = "".join(f"  {name:>9}" for name in GOALS)
    print("End to end (build + eval): median of per-repeat ratios to bare")
    print(f"{'tokens':>6}  {'bare ms':>8}{names}  {'ratio IQR':>9}    eval alone, ratio to bare")
    print("\n".join(timing_rows))
    print("\nGraph build alone (Python; no eval), ms")
    print(f"{'tokens':>6}  {'bare':>8}{''.join(f'  {chr(43) + name:>9}' for name in GOALS)}"
          "    extra as % of the bare forward")
    print("\n".join(build_rows))
    goals = ", ".join(f"{name} <= {goal}x" for name, goal in GOALS.items())
    print(f"\ngoals: {goals}: " + ("all met" if not misses else "MISSED: " + "; ".join(misses)))
    if noisy:
        print("note: the ratios varied by more than 0.05 between repeats (a busy machine); "
              "rerun with more --repeats before trusting a miss.")
    if args.profile:
        for length in args.lengths:
            profile_trace(model, prompt_ids(model, length))


if __name__ == "__main__":
    main()
