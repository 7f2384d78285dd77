"""Activation patching by hand: which layer's MLP makes SmolLM2 answer " Paris", not " Rome"?

The manual procedure of the activation-patching guide, complete, on a pair with an answer: the
model completes "The capital of France is" with " Paris" and "The capital of Italy is" with
" Rome". Run both, patch each layer's clean MLP output into the corrupted run, and measure how
much of the clean behaviour that recovers with the logit difference
LD = logit(" Paris") - logit(" Rome") at the last position, the metric the field prefers when
the behaviour has an answer (docs/patching.md, "Choosing a metric"):

    recovery = (LD(patched) - LD(corrupted)) / (LD(clean) - LD(corrupted)) * 100

Run: python examples/activation_patching_example.py
"""

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel
from mlxterp import interventions as iv

CLEAN = "The capital of France is"
CORRUPTED = "The capital of Italy is"  # same number of tokens (5) as CLEAN
ANSWER, WRONG_ANSWER = " Paris", " Rome"  # the clean and the corrupted run's answers


def main() -> dict[int, float]:
    # The bundled SmolLM2-135M needs no network. With network access, any mlx-lm model works:
    #   from mlx_lm import load
    #   base_model, tokenizer = load("mlx-community/Llama-3.2-1B-Instruct-4bit")
    base_model, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base_model, tokenizer=tokenizer)
    n_layers = len(model.layers)
    # One token each, without BOS: `model.encode` would add the BOS of models that use one.
    answer, wrong = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (ANSWER, WRONG_ANSWER))

    def logit_diff(output: mx.array) -> float:
        last = output[0, -1].astype(mx.float32)
        return (last[answer] - last[wrong]).item()

    # 1. Baseline: clean and corrupted outputs. The clean trace also keeps every layer's MLP
    #    output, so the clean prompt runs once (the guide re-runs it for each layer: same values).
    mlp_keys = [f"layers.{i}.mlp" for i in range(n_layers)]
    with model.trace(CLEAN, capture=mlp_keys) as trace:
        clean_output = model.output.save()
        clean_mlp = [trace.activations[key] for key in mlp_keys]
    with model.trace(CORRUPTED):
        corrupted_output = model.output.save()
    mx.eval(clean_output, corrupted_output, clean_mlp)

    clean_ld, corrupted_ld = logit_diff(clean_output), logit_diff(corrupted_output)
    print(f"Logit difference: clean {clean_ld:.2f}, corrupted {corrupted_ld:.2f}")

    def recovery(patched_output: mx.array) -> float:
        return (logit_diff(patched_output) - corrupted_ld) / (clean_ld - corrupted_ld) * 100

    # 2. Patch each layer's MLP output from the clean run into the corrupted run.
    results = {}
    for layer in range(n_layers):
        patch = {f"layers.{layer}.mlp": iv.replace_with(clean_mlp[layer])}
        with model.trace(CORRUPTED, interventions=patch):
            patched_output = model.output.save()
        results[layer] = recovery(patched_output)
        print(f"Layer {layer:2d}: {results[layer]:6.1f}% recovery")

    # 3. The layers whose clean MLP output recovers the most.
    ranked = sorted(results.items(), key=lambda item: item[1], reverse=True)
    print("\nMost important layers:")
    for layer, value in ranked[:5]:
        print(f"  Layer {layer:2d}: {value:5.1f}% recovery")

    # 4. Patch only the last token's MLP output at layer 10 (the other positions stay corrupted).
    last_only = {"layers.10.mlp": iv.replace_with(clean_mlp[10], positions=[-1])}
    with model.trace(CORRUPTED, interventions=last_only):
        patched_output = model.output.save()
    print(f"\nLayer 10 MLP, last position only: {recovery(patched_output):.1f}% recovery")
    return results


if __name__ == "__main__":
    main()
