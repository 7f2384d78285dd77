"""The whole `patching_sweep` call against one plain forward, and where its time goes: preparing
the sweep (tokens, sites), the engine (building and running the batched forward, measuring) and
the result (labels, provenance). Then a new process's first call, with the block costs of the
engine's cost model measured in that call or read from the store an earlier process wrote.

    .venv/bin/python bench/bench_call.py                                # bundled SmolLM2, float32
    python3 bench/bench_call.py --random .gpu/model --dtype bfloat16    # on the GPU machine

Median of `--repeats` after two warm-up calls; the forward is the bare model's on the clean
prompt, evaluated, timed in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from mlxterp import InterpretableModel
from mlxterp.experiments.analyses import patching
from mlxterp.models.identity import known_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from bench_patching import PAIRS  # noqa: E402
from random_model import bundled_folder, random_model  # noqa: E402
from timing import timed  # noqa: E402

SWEEPS = {"mlp x layer": dict(component="mlp", over="layer"),
          "input x layer x position": dict(component="input", over=("layer", "position"))}
PARTS = ("prepare_sweeps", "run_engine", "sweep_result")  # the three steps of patching.patching_sweep


def timing_parts() -> dict[str, list[float]]:
    """Wrap the three steps of a sweep call so that each records its seconds."""
    spent = defaultdict(list)
    for name in PARTS:
        setattr(patching, name, _timed(getattr(patching, name), spent[name]))
    return spent


def _timed(step, seconds: list[float]):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = step(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result
    return timed


def median_seconds(run, repeats: int) -> float:
    """`timing.timed`'s median after two warm-up calls (MLX on CUDA is still building on a call's
    second run)."""
    run(), run()
    return timed(run, repeats)[0]


def steady(folder: str, dtype: str, repeats: int) -> None:
    base, tokenizer = random_model(folder, dtype)
    model = InterpretableModel(base, tokenizer)
    spent = timing_parts()
    print(f"{dtype} on {mx.default_device()} ({mx.device_info().get('device_name', '')}), "
          f"mlx {mx.__version__}")
    print("| pair | sweep | forward ms | call ms | x forward | prepare | engine | result "
          "| outside the engine, x forward |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for pair, (clean, corrupted) in PAIRS.items():
        ids = mx.array([tokenizer.encode(clean)])
        forward = median_seconds(lambda ids=ids: mx.eval(base(ids)), 20)
        for sweep, options in SWEEPS.items():
            for seconds in spent.values():
                seconds.clear()
            def call_once(clean=clean, corrupted=corrupted, options=options):
                model.patching_sweep(clean, corrupted, metric="kl", progress=False, **options)

            call = median_seconds(call_once, repeats)
            part = {name: statistics.median(spent[name][2:]) for name in PARTS}  # after the warm-ups
            outside = call - part["run_engine"]
            print(f"| {pair} | {sweep} | {forward * 1e3:.1f} | {call * 1e3:.1f} | {call / forward:.2f} | "
                  + " | ".join(f"{part[name] * 1e3:.2f} ms" for name in PARTS)
                  + f" | {outside / forward:.2f} |", flush=True)


def first_call(folder: str, dtype: str) -> dict:
    """This process's first sweep call after one plain forward (the model's kernels built). The
    weights' fingerprint is read from the cache folder or hashed and stored there before, as
    `mlxterp.load` does for a converted model."""
    base, tokenizer = random_model(folder, dtype)
    start = time.perf_counter()
    known_fingerprint(base, Path(os.environ["MLXTERP_CACHE"]) / "fingerprint.json")
    fingerprint = time.perf_counter() - start
    model = InterpretableModel(base, tokenizer)
    clean, corrupted = PAIRS["14-token"]
    ids = mx.array([tokenizer.encode(clean)])
    mx.eval(base(ids))
    start = time.perf_counter()
    mx.eval(base(ids))
    forward = time.perf_counter() - start
    start = time.perf_counter()
    model.patching_sweep(clean, corrupted, metric="kl", progress=False, **SWEEPS["mlp x layer"])
    first = time.perf_counter() - start
    second = median_seconds(lambda: model.patching_sweep(clean, corrupted, metric="kl", progress=False,
                                                         **SWEEPS["mlp x layer"]), 3)
    return dict(forward=forward, first=first, steady=second, fingerprint=fingerprint)


def first_calls(folder: str, dtype: str) -> None:
    """Two new processes sharing an empty cache folder: the first measures the block costs and
    stores them, the second reads them."""
    with tempfile.TemporaryDirectory() as cache:
        runs = []
        for _ in range(2):
            command = [sys.executable, __file__, "--first", "--random", folder, "--dtype", dtype]
            output = subprocess.run(command, env={**os.environ, "MLXTERP_CACHE": cache},
                                    capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(output.splitlines()[-1]))
    print("\nA new process's first MLP sweep of the 14-token pair, after one plain forward:")
    for label, run in zip(("first process (block costs measured)", "next process (block costs stored)"),
                          runs, strict=True):
        print(f"  {label}: first call {run['first'] * 1e3:.1f} ms = {run['first'] / run['forward']:.1f}x "
              f"a forward ({run['forward'] * 1e3:.1f} ms); then {run['steady'] / run['forward']:.2f}x; "
              f"the weights' fingerprint at load {run['fingerprint'] * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random", metavar="FOLDER", help="random weights of FOLDER's config.json "
                        "(default: the bundled SmolLM2's shape)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--first", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    folder = args.random or str(bundled_folder("smollm2-135m"))
    if args.first:
        print(json.dumps(first_call(folder, args.dtype)))
        return
    steady(folder, args.dtype, args.repeats)
    first_calls(folder, args.dtype)


if __name__ == "__main__":
    main()
