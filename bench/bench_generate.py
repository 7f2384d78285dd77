"""Generation speed on SmolLM2-135M (float32): `model.generate`, plain and steered, as ratios to
mlx-lm's own `generate` in the same run.

Usage: python bench/bench_generate.py [--repeats 5] [--tokens 128]

Three variants each write `--tokens` new tokens greedily after the same prompt:

    mlx-lm     mlx_lm.generate(base, tokenizer, prompt, max_tokens=N)
    plain      model.generate(prompt, max_tokens=N)
    steered    model.generate(prompt, max_tokens=N, interventions=vector.interventions(1.0))

Within each repeat the three run back to back in a random order; each variant's time is
divided by the mlx-lm time of the same repeat, and the table shows the median of those ratios
(the machine may be shared and noisy: paired ratios and medians). The steered variant may stop
early at an end-of-sequence token, so its time is per token. Goal: at most 1.1x.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# mlxterp first: importing it arms its OpenBLAS preload before anything loads mlx (what
# mlxterp_blas.pth does at interpreter start when mlxterp is installed; see mlxterp/blas.py).
import mlxterp  # noqa: E402

# isort: split
from mlx_lm.generate import generate as mlx_lm_generate  # noqa: E402
from timing import interleaved  # noqa: E402  (bench/timing.py, beside this script)

from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.blas import blas_status  # noqa: E402

GOAL = 1.1
PROMPT = "The history of the city begins"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    vector = model.steering_vector(["I love weddings"], ["I love meetings"], layer=8)
    steer = vector.interventions(1.0)

    plain = model.generate(PROMPT, max_tokens=args.tokens)
    # mlx-lm's `generate` returns text; it writes plain's tokens (tests/test_generation.py), so
    # with no early end-of-sequence token it writes `--tokens` of them too.
    assert len(plain.tokens) == args.tokens, "the prompt ends early: choose another"

    def mlx_lm() -> int:
        mlx_lm_generate(base, tokenizer, PROMPT, max_tokens=args.tokens)
        return args.tokens

    variants = {
        "mlx-lm": mlx_lm,
        "plain": lambda: len(model.generate(PROMPT, max_tokens=args.tokens).tokens),
        "steered": lambda: len(model.generate(PROMPT, max_tokens=args.tokens, interventions=steer).tokens),
    }

    ratios = {name: [] for name in variants}
    rates = {name: [] for name in variants}
    for timed in interleaved(variants, args.repeats):
        per_token = {name: seconds / tokens for name, (seconds, tokens) in timed.items()}
        for name in variants:
            ratios[name].append(per_token[name] / per_token["mlx-lm"])
            rates[name].append(1 / per_token[name])

    print(f"SmolLM2-135M float32, {args.tokens} new tokens, greedy, {args.repeats} repeats; "
          f"BLAS: {blas_status().kind}")
    print(f"{'variant':<10} {'tokens/s':>9} {'x mlx-lm':>9}")
    for name in variants:
        print(f"{name:<10} {statistics.median(rates[name]):9.1f} {statistics.median(ratios[name]):8.3f}x")
    print(f"goal: plain and steered at most {GOAL}x mlx-lm's time per token")


if __name__ == "__main__":
    main()
