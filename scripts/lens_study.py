"""The numbers and figures of docs/lenses.md, on SmolLM2-135M (float32, CPU).

Usage: python scripts/lens_study.py [--steps 60] [--held-out 16] [--out docs/img]

1. Trains a tuned lens on the Python reference (pydoc_data.topics, 3 topics in 4) as
   `mlxterp train-lens` does, and measures the paper's curve on the held-out topics: mean
   KL(final || lens) per layer for the logit lens and the tuned lens.
2. The logit-lens and tuned-lens grids of one prompt.
3. Head detection (previous-token, duplicate, induction).
4. Is L23H3 a name mover? Its attention from the last token of IOI prompts to the indirect
   object, the subject's two mentions and the rest, beside the heads that attend most to the
   indirect object.

Writes figures and `lens-study.json` into --out and prints every number the doc quotes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlxterp  # noqa: E402
from mlxterp import InterpretableModel  # noqa: E402
from mlxterp.experiments.analyses.tuned_lens import (  # noqa: E402
    kl_per_layer,
    python_reference_text,
    train_tuned_lens,
)
from mlxterp.experiments.data.corpus import token_windows  # noqa: E402
from mlxterp.presentation.plots import _figure  # noqa: E402
from mlxterp.tracing.attention import attention_layouts  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
# (indirect object, subject): single tokens with a leading space in SmolLM2's vocabulary
NAMES = [("Mary", "John"), ("Alice", "Bob"), ("Sarah", "Tom"), ("Anna", "James"), ("Emma", "David"),
         ("Lisa", "Mark"), ("Kate", "Paul"), ("Laura", "Peter")]
TEMPLATES = ["When {io} and {s} went to the store, {s} gave a drink to",
             "When {io} and {s} went to the park, {s} gave a ball to",
             "After {io} and {s} met at the office, {s} handed a letter to"]


def kl_curve(model, steps: int, held_out_windows: int, out: Path) -> dict:
    training, held_out = python_reference_text()
    mx.reset_peak_memory()
    lens = train_tuned_lens(model, training, steps=steps)
    peak = mx.get_peak_memory() / 2**30
    windows = token_windows(model, held_out, 64)[:held_out_windows]
    logit, tuned = (kl_per_layer(model, chosen, windows) for chosen in (None, lens))
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    ax.plot(logit, "o-", label="logit lens", color="#c53030")
    ax.plot(tuned, "o-", label="tuned lens", color="#2b6cb0")
    ax.set_xlabel("layer (residual after the block)")
    ax.set_ylabel("KL(final || lens), nats")
    ax.set_title(f"SmolLM2-135M, {held_out_windows} held-out windows of 64 tokens "
                 f"(Python reference)", fontsize=8)
    ax.legend()
    fig.savefig(out / "smollm2-tuned-lens-kl.png", dpi=130)
    return {"logit": logit.tolist(), "tuned": tuned.tolist(), "trained_on": lens.trained_on,
            "peak_memory_gib": round(peak, 2),
            "tuned_lower_at": [int(i) for i in np.flatnonzero(tuned < logit)], "lens": lens}


def name_movers(model) -> dict:
    """Mean attention from the last token to the indirect object (IO), the subject's first and
    second mention (S1, S2) and everything else, per head."""
    layouts = attention_layouts(model.tree)
    to_io, parts = [], {"IO": [], "S1": [], "S2": []}
    for template in TEMPLATES:
        for io, s in NAMES:
            text = template.format(io=io, s=s)
            ids = model.encode(text)
            words = model.to_str_tokens(ids)
            io_at = words.index(f" {io}")
            s1, s2 = [i for i, word in enumerate(words) if word == f" {s}"]
            with model.trace(text, capture=[layout.key for layout in layouts]) as trace:
                last = np.stack([np.array(trace.activations[layout.key][0, :, -1]) for layout in layouts])
            to_io.append(last[:, :, io_at])  # (layers, heads)
            for name, position in (("IO", io_at), ("S1", s1), ("S2", s2)):
                parts[name].append(last[23, 3, position])
    grid = np.mean(to_io, axis=0)
    order = np.argsort(-grid, axis=None)[:5]
    l23h3 = {name: float(np.mean(values)) for name, values in parts.items()}
    l23h3["rest"] = 1 - sum(l23h3.values())
    return {"prompts": len(to_io), "L23H3": l23h3,
            "L23H3_io_is_largest": int(np.sum(np.array(parts["IO"]) > np.maximum(parts["S1"], parts["S2"]))),
            "top_heads_to_io": [(f"L{layer}H{head}", float(grid[layer, head]))
                                for layer, head in zip(*np.unravel_index(order, grid.shape), strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = InterpretableModel(*mlxterp.load("smollm2-135m"))

    started = time.perf_counter()
    curve = kl_curve(model, args.steps, args.held_out, out)
    lens = curve.pop("lens")
    print(f"tuned lens: {curve['trained_on']}, peak memory {curve['peak_memory_gib']} GiB")
    print("layer  logit   tuned")
    for layer, (a, b) in enumerate(zip(curve["logit"], curve["tuned"], strict=True)):
        print(f"{layer:>5} {a:6.2f}  {b:6.2f}")
    print(f"tuned lens lower at {len(curve['tuned_lower_at'])} of {len(curve['logit'])} layers")

    for chosen, name in ((None, "logit"), (lens, "tuned")):
        result = model.logit_lens(PROMPT, target=" Paris", lens=chosen)
        result.plot(out / f"smollm2-{name}-lens.png", overwrite=True)
        ranks = result.target_rank[:, -1]
        first = int(result.layers[int(np.argmax(ranks == 0))]) if (ranks == 0).any() else None
        curve[f"{name}_lens_paris_first_top_layer"] = first
        print(f"{name} lens: ' Paris' first the top token at the last position at layer {first}")

    heads = model.detect_heads()
    heads.plot(out / "smollm2-heads.png", overwrite=True)
    heads.to_json(out / "smollm2-heads.json", overwrite=True)
    print(heads)
    movers = name_movers(model)
    print(json.dumps(movers, indent=1))
    curve["heads_top"] = {kind: heads.top(kind, 5) for kind in heads.kinds}
    curve["name_movers"] = movers
    curve["seconds"] = round(time.perf_counter() - started, 1)
    curve["date"] = time.strftime("%Y-%m-%d")
    (out / "lens-study.json").write_text(json.dumps(curve, indent=1))
    print(f"done in {curve['seconds']} s")


if __name__ == "__main__":
    main()
