"""Measure how much SmolLM2's float32 logits move between batch layouts on this CPU's BLAS kernel.

The numbers behind `mlxterp.experiments.pipeline.metrics.LOGIT_NOISE`: the same prompt run alone, as one
of 8 identical rows, and as one of 31, compared element by element at the last position.
Relative to max |logit|; run it under each kernel to see them all:

    for k in SkylakeX Haswell Zen Sandybridge; do
        OPENBLAS_CORETYPE=$k .venv/bin/python scripts/measure_noise_floor.py
    done
    MLXTERP_NO_BLAS=1 .venv/bin/python scripts/measure_noise_floor.py      # reference BLAS
"""

import os

import mlx.core as mx

import mlxterp

PROMPTS = ["Paris is the capital of France",
           "When Mary and John went to the store, John gave a drink to"]


def main() -> None:
    base, tokenizer = mlxterp.load("smollm2-135m")
    worst_max = worst_rms = 0.0
    for prompt in PROMPTS:
        ids = mx.array([tokenizer.encode(prompt)])
        alone = base(ids)[0, -1]
        scale = mx.max(mx.abs(alone)).item()
        for rows in (8, 31):
            batch = base(mx.repeat(ids, rows, axis=0))[:, -1]
            diff = batch - alone
            worst_max = max(worst_max, mx.max(mx.abs(diff)).item() / scale)
            worst_rms = max(worst_rms, mx.sqrt(mx.mean(diff * diff)).item() / scale)
    kernel = os.environ.get("OPENBLAS_CORETYPE") or ("reference" if os.environ.get("MLXTERP_NO_BLAS")
                                                     else "default")
    print(f"{kernel:>12}: max |diff| / max|logit| = {worst_max:.2e}, rms = {worst_rms:.2e}")


if __name__ == "__main__":
    main()
