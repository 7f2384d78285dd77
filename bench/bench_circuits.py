"""Circuits on SmolLM2: the cost of scoring every edge (EAP, EAP-IG) and of a faithfulness curve,
as multiples of one plain forward of one prompt measured in the same run, per pair; peak memory
as a multiple of one forward with every site (each block's input, attention and MLP output)
captured.

    .venv/bin/python bench/bench_circuits.py [--dtype float32|bfloat16] [--pairs 4] [--random FOLDER]

`--random .gpu/model` times a model of SmolLM2's shape with random weights and its tokenizer
(bench/random_model.py), for the lent GPU machine, where the bundled weights do not travel.

The pairs: IOI pairs of one length that the model answers. Per pair, EAP runs both prompts once
plainly and the receiving prompt forward and backward; EAP-IG runs `steps` rows forward and
backward; a curve runs one patched row per circuit.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from timing import timed

import mlxterp
from mlxterp import InterpretableModel, answered_pairs, ioi_pairs
from mlxterp.blas import blas_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--random", metavar="FOLDER", help="random weights of the shape in FOLDER")
    args = parser.parse_args()
    if args.random:
        from random_model import random_model

        base, tokenizer = random_model(args.random, args.dtype)
    else:
        base, tokenizer = mlxterp.load("smollm2-135m", dtype=args.dtype)
    model = InterpretableModel(base, tokenizer)
    found = answered_pairs(model, ioi_pairs(40, seed=0))
    length = len(model.encode(found[0].clean))
    pairs = [p for p in found if len(model.encode(p.clean)) == length][:args.pairs]
    ids = mx.array([model.encode(pairs[0].clean)])
    keys = [key for block in model.tree.blocks
            for key in (f"{block}:input", f"{block}.self_attn", f"{block}.mlp")]

    def forward():
        mx.eval(base(ids))

    def captured():
        with model.trace(ids, capture=keys) as trace:
            mx.eval([trace.activations[key] for key in keys])

    forward()
    one, _ = timed(forward, repeats=10)
    _, captured_peak = timed(captured, repeats=2)
    options = dict(pairs=pairs, metric="logit_diff")
    scores = model.edge_attribution(**options)
    weights = " (random weights)" if args.random else ""
    print(f"SmolLM2-135M{weights} {args.dtype} on {mx.default_device()}, BLAS: {blas_status().kind}; "
          f"{len(pairs)} IOI pairs of {length} tokens; "
          f"{len(scores.sites)} edges; one plain forward {one * 1000:.0f} ms; with every site captured "
          f"peak {captured_peak:.2f} GiB")
    rows = {
        "EAP, every edge": lambda: model.edge_attribution(**options),
        "EAP-IG 4 steps, every edge": lambda: model.edge_attribution(**options, method="eap-ig", steps=4),
        "EAP-IG 8 steps, every edge": lambda: model.edge_attribution(**options, method="eap-ig", steps=8),
        "faithfulness curve, 20 sizes": lambda: model.faithfulness_curve(scores),
    }
    for name, fn in rows.items():
        seconds, peak = timed(fn, args.repeats)
        print(f"{name:<30} {seconds / len(pairs) / one:7.2f}x forward per pair   peak {peak:.2f} GiB "
              f"({peak / captured_peak:.2f}x the captured forward)")


if __name__ == "__main__":
    main()
