"""The IOI circuit of SmolLM2-135M, as docs/circuits.md reports it: every number of that page.

    .venv/bin/python scripts/circuit_study.py [--pairs 64] [--out test-artifacts/circuits]

On the IOI pairs the model answers (logit difference of the indirect object over the subject):
edge scores by EAP and EAP-IG (8 steps); faithfulness curves of both and of random circuits of
the same sizes; the top-200 EAP-IG circuit's heads beside the head detectors (previous-token,
duplicate-token, induction) and each head's attention from the last token to the indirect
object. Writes the scores, curves and circuit as JSON, and a summary (summary.json) the page
quotes. Scores and curves already in the output folder are read back, not computed again.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import mlxterp
from mlxterp import (
    DisconnectedCircuitWarning,
    InterpretableModel,
    PatchingResult,
    answered_pairs,
    ioi_pairs,
    top_circuit,
)

SIZES = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 70651]
CIRCUIT_EDGES = 200


def attention_to_indirect_object(model, pairs) -> np.ndarray:
    """(layers, heads): each head's mean attention from the last token to the indirect object's
    first occurrence (the answer's token in the clean prompt)."""
    layers = len(model.tree.blocks)
    keys = [f"layers.{layer}.self_attn:pattern" for layer in range(layers)]
    total = 0.0
    for pair in pairs:
        ids = model.encode(pair.clean)
        target = ids.index(model.encode(pair.answer)[0])
        with model.trace(pair.clean, capture_attention=True) as trace:
            total = total + np.stack([np.array(trace.activations[key][0, :, -1, target]) for key in keys])
    return total / len(pairs)


def computed(path: Path, compute):
    """The result saved at `path`, or `compute()` saved there."""
    if path.exists():
        return PatchingResult.from_json(path)
    result = compute()
    result.to_json(path, overwrite=True)
    return result


def top_heads(grid: np.ndarray, k: int) -> list[str]:
    order = np.argsort(-grid, axis=None)[:k]
    return [f"L{layer}.H{head}" for layer, head in zip(*np.unravel_index(order, grid.shape), strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("test-artifacts/circuits"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = InterpretableModel(*mlxterp.load("smollm2-135m", dtype="float32"))
    pairs = answered_pairs(model, ioi_pairs(2 * args.pairs, seed=0))[:args.pairs]
    summary = {"pairs": len(pairs), "seconds": {}}  # to compute each result, or to read it back
    scores = {}
    for method, steps in (("eap", 1), ("eap-ig", 8)):
        start = time.perf_counter()
        scores[method] = computed(args.out / f"scores-{method}.json",
                                  lambda m=method, s=steps: model.edge_attribution(
                                      pairs=pairs, metric="logit_diff", method=m, steps=s))
        summary["seconds"][method] = time.perf_counter() - start
    summary["edges"] = len(scores["eap"].sites)
    curves = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedCircuitWarning)  # small random circuits: 0 %
        for name, seed in (("eap", None), ("eap-ig", None), ("random", 0)):
            start = time.perf_counter()
            source = scores["eap-ig" if name == "random" else name]
            curves[name] = computed(args.out / f"curve-{name}.json", lambda s=source, r=seed:
                                    model.faithfulness_curve(s, SIZES, random_seed=r))
            summary["seconds"][f"curve {name}"] = time.perf_counter() - start
    summary["curves"] = {name: {"sizes": SIZES, "kept": [site["kept"] for site in curve.sites],
                                "faithfulness": curve.mean.round(2).tolist(),
                                "standard_error": curve.standard_error.round(2).tolist()}
                         for name, curve in curves.items()}
    circuit = top_circuit(scores["eap-ig"], edges=CIRCUIT_EDGES)
    circuit.to_json(args.out / "circuit-eap-ig-200.json", overwrite=True)
    circuit.plot(args.out / "circuit-eap-ig-200.png", overwrite=True)
    heads = [node for node in circuit.nodes if ".H" in node]
    detectors = model.detect_heads()
    grids = {kind: detectors.scores[detectors.kinds.index(kind)] for kind in detectors.kinds}
    grids["attention_to_io"] = attention_to_indirect_object(model, pairs[:16])
    summary["circuit"] = {
        "edges": len(circuit.edges), "nodes": len(circuit.nodes), "top_edges": list(circuit.edges[:15]),
        "heads": {head: {kind: round(float(grid[int(head.split(".")[0][1:]), int(head.split(".")[1][1:])]), 3)
                         for kind, grid in grids.items()}
                  for head in heads},
        # each detector's top 10 heads of the whole model, and which of them the circuit has
        "top_10_of_the_model": {kind: {"heads": top_heads(grid, 10),
                                       "in_circuit": [h for h in top_heads(grid, 10) if h in heads]}
                                for kind, grid in grids.items()},
    }
    summary["exact_check"] = {}
    top = [name for name, _ in scores["eap-ig"].top(10)]
    exact = model.edge_patching(pairs=pairs, metric="logit_diff", edges=top)
    for i, edge in enumerate(top):
        index = scores["eap"].sites.index({"edge": edge})
        summary["exact_check"][edge] = {"exact": round(float(exact.mean[i]), 2),
                                        "eap": round(float(scores["eap"].mean[index]), 2),
                                        "eap-ig": round(float(scores["eap-ig"].mean[index]), 2)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
