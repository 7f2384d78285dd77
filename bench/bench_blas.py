"""Benchmark mlx's CPU float32 matmul with and without mlxterp's OpenBLAS preload.

Usage: python bench/bench_blas.py [--size 1024] [--repeats 10] [--warmup 3]

Each variant runs in a fresh subprocess (the BLAS is chosen when mlx is first
loaded, so it cannot be switched inside one process): once with the start-up
hook disabled (MLXTERP_NO_BLAS=1) and once with it enabled. The worker imports
mlx *before* mlxterp, the order the hook has to cope with. Prints the median
times, the ratio, and which BLAS served mlx's cblas_sgemm in each run.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(size: int, repeats: int, warmup: int) -> None:
    """Time the matmul in this process and print one JSON line."""
    import importlib
    import statistics
    import time

    # What mlxterp_blas.pth does at interpreter start (a no-op if it already
    # ran); keeps the benchmark meaningful when the .pth is not installed.
    # It must come before mlx, hence not a sortable import statement.
    importlib.import_module("_mlxterp_blas_hook")

    import mlx.core as mx

    from mlxterp import blas

    a = mx.random.normal((size, size), dtype=mx.float32)
    b = mx.random.normal((size, size), dtype=mx.float32)
    mx.eval(a, b)
    for _ in range(warmup):
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        times.append(time.perf_counter() - start)
    status = blas.blas_status()
    print(json.dumps({
        "median_ms": statistics.median(times) * 1000,
        "kind": status.kind,
        "library": status.library,
        "hook_installed": status.hook_installed,
    }))


def run_variant(disable_hook: bool, args: argparse.Namespace) -> dict:
    """Run the worker in a subprocess and return its JSON result."""
    env = dict(os.environ)
    env.pop("MLXTERP_NO_BLAS", None)
    if disable_hook:
        env["MLXTERP_NO_BLAS"] = "1"
    # The repo root makes _mlxterp_blas_hook importable without an install.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--size", str(args.size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.size, args.repeats, args.warmup)
        return

    n = args.size
    print(f"float32 {n}x{n} @ {n}x{n} matmul on mlx CPU, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    results = {}
    for label, disable in (("hook disabled (MLXTERP_NO_BLAS=1)", True), ("hook enabled", False)):
        result = run_variant(disable, args)
        results[disable] = result
        gflops = 2 * n**3 / (result["median_ms"] / 1000) / 1e9
        print(f"  {label:36s} {result['median_ms']:8.1f} ms {gflops:7.1f} GFLOP/s  "
              f"{result['kind']}: {result['library']}")
    ratio = results[True]["median_ms"] / results[False]["median_ms"]
    print(f"  speed-up with hook: {ratio:.1f}x")
    if not results[False]["hook_installed"]:
        print("  note: mlxterp_blas.pth is not installed here; the worker imported the hook "
              "module itself (reinstall mlxterp to get it at start-up)")


if __name__ == "__main__":
    main()
