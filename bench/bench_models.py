"""Load time, forward time and memory of the bundled models on the CPU, per dtype and BLAS.

Usage: python bench/bench_models.py [--quick] [--repeats 20] [--warmup 3]

Everything runs in fresh subprocesses with MLXTERP_CACHE set to a new temporary folder:

- load: only `mlxterp.load(name)` is timed (mlx, mlx-lm, transformers are imported before).
  "first" converts the GGUF (gemma3-270m: also assembles it from its chunk packages), "cached"
  is a second process that finds the converted folder. `--quick` skips gemma3-270m.
- forward: one worker process per SmolLM2-135M variant (float32 with OpenBLAS, float32 with
  MLXTERP_NO_BLAS=1, bfloat16, quantized=True), each loading its converted model and warming
  up; then the parent asks each for one timed `mx.eval(model(ids))` (8 tokens) per round, in a
  shuffled order. Ratios are medians of per-round ratios to float32 with OpenBLAS. Memory:
  parameter bytes, mx.get_peak_memory() over load + forwards, and the max RSS (which includes
  Python, mlx and transformers).
"""

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The quick brown fox jumps over the lazy dog"  # its first 8 tokens are used
VARIANTS = {  # label -> (load kwargs, MLXTERP_NO_BLAS)
    "float32": ({}, False),
    "float32, no BLAS": ({}, True),
    "bfloat16": ({"dtype": "bfloat16"}, False),
    "quantized": ({"quantized": True}, False),
}


def worker(job: dict) -> None:
    """Mode "load": time mlxterp.load once. Mode "forward": serve timed forwards on stdin."""
    importlib.import_module("_mlxterp_blas_hook")  # what mlxterp_blas.pth does; before mlx
    import resource

    import mlx.core as mx
    import mlx_lm  # noqa: F401  (imported here so that load() is timed without imports)
    from mlx.utils import tree_flatten
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
    from transformers.integrations.gguf import gguf_tokenizer_mapping  # noqa: F401

    import mlxterp
    from mlxterp.blas import blas_status

    def say(**fields) -> None:
        print(json.dumps(fields), flush=True)

    start = time.perf_counter()
    model, tokenizer = mlxterp.load(job["model"], **job["kwargs"])
    load_s = time.perf_counter() - start
    blas = blas_status().kind
    if job["mode"] == "load":
        return say(load_s=load_s, blas=blas)
    ids = mx.array([tokenizer.encode(PROMPT)[:8]])
    for _ in range(job["warmup"]):
        mx.eval(model(ids))
    say(ready=True)
    for line in sys.stdin:
        if line.strip() == "run":
            start = time.perf_counter()
            mx.eval(model(ids))
            say(ms=(time.perf_counter() - start) * 1e3)
        else:
            weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            return say(blas=blas, weights_mb=weights / 1e6, peak_mb=mx.get_peak_memory() / 1e6,
                       maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)


def spawn(mode: str, model: str, cache: str, kwargs: dict, no_blas: bool, warmup: int = 0):
    env = {k: v for k, v in os.environ.items() if k != "MLXTERP_NO_BLAS"}
    env["MLXTERP_CACHE"] = cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    if no_blas:
        env["MLXTERP_NO_BLAS"] = "1"
    job = {"mode": mode, "model": model, "kwargs": kwargs, "warmup": warmup}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def reply(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    if not line:
        sys.exit(f"worker {process.args[-1]} failed (exit {process.wait()})")
    return json.loads(line)


def ask(process: subprocess.Popen, command: str) -> dict:
    process.stdin.write(command + "\n")
    process.stdin.flush()
    return reply(process)


def load_once(model: str, cache: str, kwargs: dict | None = None) -> dict:
    process = spawn("load", model, cache, kwargs or {}, no_blas=False)
    result = reply(process)
    process.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip gemma3-270m")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    import mlx.core as mx

    print(f"mlx {mx.__version__}, {mx.default_device()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} before the run; fresh subprocesses, temporary MLXTERP_CACHE\n")
    print(f"{'load (only mlxterp.load timed)':34s} {'first':>8} {'cached':>8} {'ratio':>7}  BLAS")
    with tempfile.TemporaryDirectory(prefix="mlxterp-bench-") as cache:
        for model in ["smollm2-135m"] + ([] if args.quick else ["gemma3-270m"]):
            first, cached = load_once(model, cache), load_once(model, cache)
            print(f"{model + ' (first: convert)':34s} {first['load_s']:7.2f}s "
                  f"{cached['load_s']:7.2f}s {first['load_s'] / cached['load_s']:6.1f}x  "
                  f"{cached['blas']}")
        for kwargs, _ in VARIANTS.values():  # convert now, so that workers only load
            load_once("smollm2-135m", cache, kwargs)
        workers = {}
        for label, (kwargs, no_blas) in VARIANTS.items():  # one at a time: no contention
            workers[label] = spawn("forward", "smollm2-135m", cache, kwargs, no_blas, args.warmup)
            reply(workers[label])
        times = {label: [] for label in VARIANTS}
        shuffle = random.Random(0).shuffle
        for _ in range(args.repeats):
            order = list(VARIANTS)
            shuffle(order)
            for label in order:
                times[label].append(ask(workers[label], "run")["ms"])
        stats = {label: ask(process, "stats") for label, process in workers.items()}
        for process in workers.values():
            process.wait()

    base = times["float32"]
    print(f"\nSmolLM2-135M forward, 8 tokens: median of {args.repeats} interleaved repeats "
          f"after {args.warmup} warm-up; ratio = median per-round time / float32 (OpenBLAS)")
    print(f"{'variant':18s} {'BLAS':>9} {'ms':>7} {'ratio':>7} {'weights MB':>11} "
          f"{'MLX peak MB':>12} {'max RSS MB':>11}")
    for label, runs in times.items():
        ratio = statistics.median(t / b for t, b in zip(runs, base, strict=True))
        s = stats[label]
        print(f"{label:18s} {s['blas']:>9} {statistics.median(runs):7.1f} {ratio:6.2f}x "
              f"{s['weights_mb']:11.0f} {s['peak_mb']:12.0f} {s['maxrss_mb']:11.0f}")
    print("quantized: Q4_1/Q8_0 blocks kept as MLX 4/8-bit affine weights (group 32), float32 "
          "scales. BLAS: the library serving cblas_sgemm (only float32 matmuls use it).")


if __name__ == "__main__":
    main()
