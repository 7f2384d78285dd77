"""Cost of looking inside SmolLM2-135M (float32): the logit lens, attention capture and tuned-lens
training, as ratios to one plain forward of the same prompt, measured in one run.

Usage: python bench/bench_lenses.py [--repeats 7] [--train-steps 3]

    forward      base(ids), evaluated                              the unit
    lens         model.logit_lens(ids): 30 layers x every position, top 5, KL, a target
    unembedding  the head alone on the 30 x 14 residual rows, log-softmax included: the floor
                 of any lens that reports probabilities over the whole vocabulary
    attention    with model.trace(ids, capture_attention=True): every layer's probabilities,
                 checked against the model's own attention output, evaluated

The variants run back to back in a random order within each repeat; each is divided by the
forward of the same repeat and the median ratio is shown (the machine may be shared). Then a
few tuned-lens training steps give tokens per second and the peak memory.

Goals (issue 10): lens <= 2x, attention capture <= 1.3x one forward.
"""

import argparse
import importlib
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

try:  # preload OpenBLAS before mlx, as mlxterp's start-up hook does (see bench_tracing.py)
    importlib.import_module("_mlxterp_blas_hook")
except ImportError:
    pass

import mlx.core as mx  # noqa: E402
from timing import interleaved  # noqa: E402  (bench/timing.py, beside this script)

import mlxterp  # noqa: E402
from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.blas import blas_status  # noqa: E402
from mlxterp.experiments.analyses.lenses import Unembedding  # noqa: E402
from mlxterp.experiments.analyses.tuned_lens import python_reference_text, train_tuned_lens  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"  # 14 tokens
GOALS = {"lens": 2.0, "attention": 1.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()

    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    ids = mx.array([model.encode(PROMPT)])
    head = Unembedding.of(model)
    rows = mx.random.normal((len(model.tree.blocks), ids.shape[1], 576))

    def attention():
        with model.trace(ids, capture_attention=True, capture=["output"]) as trace:
            mx.eval(trace.output, [trace.activations[k] for k in trace.activations])

    def unembedding():
        logits = head(rows)
        mx.eval(logits - mx.logsumexp(logits, axis=-1, keepdims=True))

    variants = {
        "forward": lambda: mx.eval(base(ids)),
        "lens": lambda: model.logit_lens(ids, target=" Mary"),
        "unembedding": unembedding,
        "attention": attention,
    }
    ratios = {name: [] for name in variants if name != "forward"}
    forward_times = []
    for timed in interleaved(variants, args.repeats):
        forward_times.append(timed["forward"][0])
        for name in ratios:
            ratios[name].append(timed[name][0] / timed["forward"][0])

    print(f"SmolLM2-135M float32, {ids.shape[1]}-token prompt, BLAS {blas_status().kind}, "
          f"{args.repeats} repeats (median)")
    print(f"{'forward':<12} {statistics.median(forward_times) * 1e3:7.1f} ms   1.00x")
    for name, values in ratios.items():
        goal = f"   goal <= {GOALS[name]}x" if name in GOALS else ""
        print(f"{name:<12} {statistics.median(values) * statistics.median(forward_times) * 1e3:7.1f} ms "
              f"{statistics.median(values):6.2f}x{goal}")

    training, _ = python_reference_text()
    mx.reset_peak_memory()
    lens = train_tuned_lens(model, training, steps=args.train_steps, progress=False)
    info = lens.trained_on
    print(f"tuned-lens training: {info['tokens_seen']} tokens in {info['seconds']} s = "
          f"{info['tokens_seen'] / info['seconds']:.1f} tokens/s ({info['batch']} x {info['length']} "
          f"tokens a step, 29 translators); peak memory {mx.get_peak_memory() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
