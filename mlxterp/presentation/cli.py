"""The `mlxterp` command line: `mlxterp doctor`, `mlxterp demo`."""

from __future__ import annotations

import argparse
import sys
import time


def doctor(args: argparse.Namespace) -> int:
    """Print what mlxterp runs on, and the fix for anything missing. Exit 1 if something is."""
    import mlx.core as mx

    from mlxterp.blas import blas_status
    from mlxterp.models import BUNDLED, cache_dir

    problems = 0
    print(f"mlx            {mx.__version__}")
    print(f"device         {mx.default_device()}")
    blas = blas_status()
    if blas.platform != "linux":
        print("blas           Accelerate (macOS) / not applicable")
    else:
        print(f"blas           {blas.kind}: {blas.library}")
        if not blas.optimized:
            problems += 1
            print(f"  fix: {blas.fix}")
    print(f"model cache    {cache_dir()}  (set MLXTERP_CACHE to move it)")
    for model in BUNDLED.values():
        if model.is_installed():
            print(f"model          {model.name}: installed")
        else:
            problems += 1
            print(f"model          {model.name}: missing\n  fix: {model.install}")
    return 1 if problems else 0


def demo(args: argparse.Namespace) -> int:
    """Load a model and print its most likely next tokens after a prompt."""
    import mlx.core as mx

    import mlxterp

    start = time.perf_counter()
    model, tokenizer = mlxterp.load(args.model)
    loaded = time.perf_counter() - start
    ids = tokenizer.encode(args.prompt)
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    probs = mx.softmax(logits)
    top = mx.argsort(-logits)[: args.top].tolist()
    print(f"{args.model} loaded in {loaded:.2f}s; prompt {args.prompt!r} ({len(ids)} tokens)")
    print("rank  token            logit    prob")
    for rank, token in enumerate(top, 1):
        text = repr(tokenizer.decode([token]))
        print(f"{rank:>4}  {text:<15} {logits[token].item():7.3f}  {probs[token].item():6.3f}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxterp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="MLX version, device, BLAS, model cache, bundled models")
    demo_parser = commands.add_parser("demo", help="load a model and print its top next tokens")
    demo_parser.add_argument("prompt", nargs="?", default="The capital of France is")
    demo_parser.add_argument("--model", default="smollm2-135m", help="bundled name, .gguf or hub id")
    demo_parser.add_argument("--top", type=int, default=5, help="how many tokens to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"doctor": doctor, "demo": demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
