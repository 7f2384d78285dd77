"""Causal tracing over the known-facts set (tests/fixtures/facts.json): the paper's average
figure (Meng et al. 2022, fig. 2) for a bundled model.

For each fact the model answers correctly (greedy next token), trace the three kinds of state
(hidden, MLP and attention windows of 10 layers), then average each fact's indirect effect by
the paper's token categories x layer. Tokens before the subject (and Gemma's <bos>) belong to
no category, as in the paper, whose prompts start with the subject. A one-token subject counts
as both the first and the last subject token; where the first subsequent token is the last
token, it counts as the last token.

    .venv/bin/python scripts/causal_tracing_study.py --model smollm2-135m --samples 3
    .venv/bin/python scripts/causal_tracing_study.py --model gemma3-270m --samples 3

Writes docs/img/causal-tracing-<model>.png and .json (the averages), and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp import InterpretableModel, Noise
from mlxterp.experiments.analyses.causal_tracing import KINDS
from mlxterp.experiments.data.corruption import subject_positions
from mlxterp.presentation.plots import effect_panels

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "tests" / "fixtures" / "facts.json"
CATEGORIES = ["first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token"]


def categories(subject: tuple[int, ...], seq_len: int) -> dict[str, list[int]]:
    """The token positions of each of the paper's categories."""
    last = seq_len - 1
    after = list(range(subject[-1] + 1, last))
    return {"first subject token": [subject[0]], "middle subject tokens": list(subject[1:-1]),
            "last subject token": [subject[-1]], "first subsequent token": after[:1],
            "further tokens": after[1:], "last token": [last]}


def known(model, facts: list[dict]) -> list[dict]:
    """The facts whose answer is one token and the model's greedy next token."""
    kept = []
    for fact in facts:
        subject_positions(model, fact["prompt"], fact["subject"])  # raises if malformed
        answer = model.tokenizer.encode(fact["answer"], add_special_tokens=False)
        assert len(answer) == 1, f"answer {fact['answer']!r} is {len(answer)} tokens"
        logits = model.model(mx.array([model.encode(fact["prompt"])]))[0, -1]
        if int(mx.argmax(logits).item()) == answer[0]:
            kept.append(fact)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=3, help="noise samples per fact")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    model = InterpretableModel(*mlxterp.load(args.model))
    facts = json.loads(FACTS.read_text(encoding="utf-8"))
    kept = known(model, facts)
    print(f"{args.model}: {len(kept)} of {len(facts)} facts answered correctly")
    n_layers = len(model.tree.blocks)
    # sums[kind][category] (layers,) of per-fact means; counts of facts with that category
    sums = {kind: {c: np.zeros(n_layers) for c in CATEGORIES} for kind in KINDS}
    counts = {c: 0 for c in CATEGORIES}
    clean, corrupted = [], []
    started = time.perf_counter()
    for n, fact in enumerate(kept):
        for kind in KINDS:
            result = model.causal_trace(fact["prompt"], Noise(fact["subject"], samples=args.samples),
                                        answer=fact["answer"], kind=kind)
            effect = result.effect.mean(axis=0)
            grid = np.zeros((n_layers, len(result.tokens[0])))
            for site, value in zip(result.sites, effect, strict=True):
                grid[site["layer"], site["position"]] = value
            groups = categories(tuple(result.corruption["positions"]), grid.shape[1])
            for category, positions in groups.items():
                if positions:
                    sums[kind][category] += grid[:, positions].mean(axis=1)
                    counts[category] += kind == "hidden"
        clean.append(result.metric_values.clean.mean())
        corrupted.append(result.metric_values.corrupted.mean())
        print(f"  {n + 1}/{len(kept)} {fact['prompt']!r}: P(answer) clean {clean[-1]:.3f}, "
              f"corrupted {corrupted[-1]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    averages = {kind: np.array([sums[kind][c] / max(counts[c], 1) for c in CATEGORIES]) for kind in KINDS}
    print(f"\nmean P(answer): clean {np.mean(clean):.3f}, corrupted {np.mean(corrupted):.3f}; facts per "
          f"category: {counts}")
    for kind in KINDS:
        grid = averages[kind]
        print(f"\n{kind}: average indirect effect, by category (rows) x layer; peak per row")
        for category, row in zip(CATEGORIES, grid, strict=True):
            print(f"  {category:<24} peak {row.max():.3f} at layer {int(row.argmax()):>2}   "
                  + " ".join(f"{v:.2f}" for v in row))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"causal-tracing-{args.model}"
    text = (f"Causal tracing, {args.model}: mean indirect effect on P(answer) over {len(kept)} known facts "
            f"({args.samples} noise sample{'s' if args.samples > 1 else ''} each); "
            f"clean {np.mean(clean):.3f}, corrupted {np.mean(corrupted):.3f}")
    panels = [(kind if kind == "hidden" else f"{kind} (window 10)", averages[kind]) for kind in KINDS]
    fig = effect_panels(panels, CATEGORIES, [c.endswith("subject token") or c.endswith("subject tokens")
                                             for c in CATEGORIES], list(range(n_layers)), text,
                        "average indirect effect")
    fig.savefig(stem.with_suffix(".png"), dpi=130)
    stem.with_suffix(".json").write_text(json.dumps({
        "model": args.model, "samples": args.samples, "facts": len(kept), "counts": counts,
        "clean": float(np.mean(clean)), "corrupted": float(np.mean(corrupted)), "categories": CATEGORIES,
        "effect": {kind: averages[kind].round(5).tolist() for kind in KINDS}}, indent=1))
    print(f"\nwrote {stem.with_suffix('.png')} and {stem.with_suffix('.json')} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
