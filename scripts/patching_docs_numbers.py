"""Print every number quoted in docs/patching.md, from the bundled models.

    .venv/bin/python scripts/patching_docs_numbers.py
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp import InterpretableModel

PARIS = ("Paris is the capital of France", "London is the capital of France")
NAMES = ("When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to")


def understanding_results(model: InterpretableModel) -> None:
    print("== MLP sweep, Paris/London, three metrics ==")
    rows = {}
    for metric, extra in (("l2", {}), ("kl", {}),
                          ("logit_diff", {"answer": " Paris", "wrong_answer": " London"})):
        result = model.patching_sweep(*PARIS, component="mlp", metric=metric, **extra)
        rows[metric] = result.mean
        print(f"{metric:>10}: baseline {result.baseline[0]:.4g}; top {result.top(3)}")
    print("layer      l2      kl  logit_diff")
    for layer in range(30):
        l2, kl, ld = (rows[m][layer] for m in ("l2", "kl", "logit_diff"))
        print(f"{layer:>5} {l2:7.1f} {kl:7.1f} {ld:11.1f}")


def l2_versus_signal(model: InterpretableModel) -> None:
    print("== names pair: heads, and block input x position ==")
    by_metric = {}
    for metric, extra in (("l2", {}), ("kl", {}),
                          ("logit_diff", {"answer": " Mary", "wrong_answer": " John"})):
        heads = model.patching_sweep(*NAMES, component="self_attn", over=("layer", "head"),
                                     layers=[23], metric=metric, **extra)
        grid = model.patching_sweep(*NAMES, component="input", over=("layer", "position"),
                                    metric=metric, **extra)
        by_metric[metric] = grid.mean
        print(f"{metric:>10}: L23 heads {np.round(heads.mean, 1).tolist()}")
    ld = by_metric["logit_diff"]
    for metric in ("l2", "kl"):
        r = np.corrcoef(by_metric[metric], ld)[0, 1]
        gap = np.abs(by_metric[metric] - ld)
        print(f"block input x position: corr({metric}, logit_diff) = {r:.3f}; "
              f"mean |difference| {gap.mean():.1f} points, max {gap.max():.1f}")


def large_vocabulary() -> None:
    print("== gemma3-270m (262,144 tokens): metrics in half precision ==")
    for dtype in ("bfloat16", "float16"):
        base, tokenizer = mlxterp.load("gemma3-270m", dtype=dtype)
        model = InterpretableModel(base, tokenizer)
        with model.trace(PARIS[0]) as trace:
            clean = trace.output[0, -1]
        with model.trace(PARIS[1]) as trace:
            corrupted = trace.output[0, -1]
        naive_sum = mx.sum((corrupted - clean) ** 2).item()  # in the model's dtype
        naive_kl = mx.sum(mx.softmax(clean) * (mx.log(mx.softmax(clean))
                                               - mx.log(mx.softmax(corrupted)))).item()
        print(f"{dtype}: sum of squared differences in {dtype}: {naive_sum}; "
              f"KL via log(softmax) in {dtype}: {naive_kl}")
        for metric in ("l2", "cosine", "mse", "kl"):
            result = model.patching_sweep(*PARIS, component="mlp", metric=metric, layers=[0, 5, 17])
            print(f"  {metric:>6}: baseline {result.baseline[0]:.6g}, recoveries "
                  f"{np.round(result.mean, 2).tolist()} (finite: {np.isfinite(result.recovery).all()})")


def main() -> None:
    model = InterpretableModel(*mlxterp.load("smollm2-135m"))
    understanding_results(model)
    l2_versus_signal(model)
    large_vocabulary()


if __name__ == "__main__":
    main()
