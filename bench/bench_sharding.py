"""Speed-up of a dataset sweep shared among K processes: 64 IOI pairs, the MLP sweep over every
layer, logit difference, on the CPU, one BLAS thread per process; each K under
`mlxterp launch -n K` (or `--launcher mlx`: `mlx.launch -n K --backend ring`) on this machine
(K = 1 runs without a launcher).

    .venv/bin/python bench/bench_sharding.py --ranks 1 2                  # the bundled SmolLM2
    python3 bench/bench_sharding.py --ranks 1 2 4 8 --random .gpu/model   # random weights, same shape

Each rank loads the model, warms up on two pairs per rank (kernels, block-cost calibration),
then times `repeats` sweeps of all pairs (the ranks start together); rank 0 prints the median.
Speed-up at K ranks is the 1-rank time divided by the K-rank time, and efficiency that divided
by K.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx

    import mlxterp
    from mlxterp import InterpretableModel

    mx.set_default_device(mx.cpu)
    group = mx.distributed.init()
    if args.random:
        sys.path.insert(0, str(HERE.parent))
        from random_model import random_model

        model = InterpretableModel(*random_model(args.random))
    else:
        model = InterpretableModel(*mlxterp.load("smollm2-135m", dtype="float32"))

    def sweep(pairs):
        return model.patching_sweep(pairs=pairs, metric="logit_diff", progress=False,
                                    group=group if group.size() > 1 else None)

    from mlxterp.experiments.data.pairs import load_pairs

    dataset = load_pairs(args.pairs)
    sweep(dataset[:2 * group.size()])  # warm-up: kernels, the block costs' calibration
    seconds = []
    for _ in range(args.repeats):
        mx.distributed.all_sum(mx.array([0]), group=group).item()  # start together
        start = time.perf_counter()
        result = sweep(dataset)
        seconds.append(time.perf_counter() - start)
    if group.rank() == 0:
        print(f"RESULT {group.size()} {statistics.median(seconds):.3f} {result.recovery.shape[0]} "
              f"{result.resources['peak_memory_bytes'] / 2**20:.0f}", flush=True)


def run(ranks: int, args: argparse.Namespace, pairs: Path) -> tuple[float, int, float]:
    """(median seconds, pairs, peak MiB) of the sweep at `ranks` processes."""
    command = [sys.executable, str(HERE), "--worker", "--pairs", str(pairs), "--repeats", str(args.repeats)]
    if args.random:
        command += ["--random", args.random]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    if ranks > 1 and args.launcher == "mlx":
        # The launcher beside this Python, or MLX's own entry point where pip --target left no script.
        launch = Path(sys.executable).with_name("mlx.launch")
        entry = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
        launcher = [str(launch)] if launch.exists() else [sys.executable, "-c", entry]
        command = [*launcher, "-n", str(ranks), "--backend", "ring", "--env", "OPENBLAS_NUM_THREADS=1",
                   "--", *command]
    elif ranks > 1:  # `mlxterp launch`, through its module (pip --target leaves no script either)
        entry = "import sys; from mlxterp.presentation.cli import main; sys.exit(main())"
        command = [sys.executable, "-c", entry, "launch", "-n", str(ranks), "--env", "OPENBLAS_NUM_THREADS=1",
                   "--", *command]
    output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT")]
    if not lines:
        raise RuntimeError(f"{ranks} ranks gave no result:\n{output.stdout}\n{output.stderr}")
    _, _, seconds, count, peak = lines[0].split()
    return float(seconds), int(count), float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=64, help="IOI pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random", help="a folder with config.json and tokenizer: random weights")
    parser.add_argument("--launcher", choices=["mlxterp", "mlx"], default="mlxterp",
                        help="mlxterp launch, or mlx.launch (whose relay threads never sleep)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE.parents[1]))
    from mlxterp.experiments.data.pairs import ioi_pairs, save_pairs

    with tempfile.TemporaryDirectory() as folder:
        pairs = save_pairs(ioi_pairs(args.n, seed=0), Path(folder) / "ioi.jsonl")
        print(f"{args.n} IOI pairs, MLP x every layer, logit_diff, CPU, 1 BLAS thread per rank, "
              f"{os.cpu_count()} cores, launcher {args.launcher}; "
              f"{'random weights' if args.random else 'SmolLM2-135M float32'}")
        measured = {}
        for ranks in args.ranks:  # each printed as it comes, in case a later one runs out of time
            seconds, count, peak = run(ranks, args, pairs)
            assert count == args.n
            measured[ranks] = seconds, peak
            print(f"{ranks} ranks: {seconds:.2f} s, peak {peak:.0f} MiB", flush=True)
        single = measured.get(1, (float("nan"),))[0]
        print(f"{'ranks':>5} {'seconds':>8} {'speed-up':>8} {'efficiency':>10} {'peak MiB':>9}")
        for ranks, (seconds, peak) in sorted(measured.items()):
            speedup = single / seconds
            print(f"{ranks:>5} {seconds:>8.2f} {speedup:>7.2f}x {speedup / ranks:>10.2f} {peak:>9.0f}")


if __name__ == "__main__":
    main()
