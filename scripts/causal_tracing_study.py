"""Causal tracing over the known-facts set (tests/fixtures/facts.json): the paper's summary
(Meng et al. 2022, fig. 2) for a bundled model, with 95 % intervals over facts.

For each fact the model answers (its greedy next token), trace the three kinds of state (hidden,
MLP and attention windows of 10 layers) with 10 noise samples, keeping each result as JSON
(a run that stops resumes where it was), then summarise each kind by token class x layer
(`token_class_summary`) and draw the three panels.

    .venv/bin/python scripts/causal_tracing_study.py --model smollm2-135m --samples 10

Writes the results under --work, and docs/img/causal-tracing-<model>.png and .json (the summary).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlxterp
from mlxterp import InterpretableModel, Noise, PatchingResult, answered_facts, load_facts, token_class_summary
from mlxterp.experiments.analyses.causal_tracing import KINDS
from mlxterp.presentation.plots import plot_token_classes

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "tests" / "fixtures" / "facts.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (the paper: 10)")
    parser.add_argument("--work", type=Path, default=ROOT / "test-artifacts" / "causal-tracing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    model = InterpretableModel(*mlxterp.load(args.model))
    facts = load_facts(json.loads(FACTS.read_text(encoding="utf-8")))
    kept = answered_facts(model, facts)
    print(f"{args.model}: {len(kept)} of {len(facts)} facts answered", flush=True)
    folder = args.work / f"{args.model}-{args.samples}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, list[PatchingResult]] = {kind: [] for kind in KINDS}
    for n, fact in enumerate(kept):
        for kind in KINDS:
            path = folder / f"fact-{facts.index(fact):03d}-{kind}.json"
            if path.exists():
                result = PatchingResult.from_json(path)
            else:
                result = model.causal_trace(fact.prompt, Noise(fact.subject, samples=args.samples),
                                            answer=fact.answer, kind=kind)
                result.to_json(path)
            results[kind].append(result)
        print(f"  {n + 1}/{len(kept)} {fact.prompt!r} ({time.perf_counter() - started:.0f} s)", flush=True)
    summaries = [token_class_summary(results[kind]) for kind in KINDS]
    for summary in summaries:
        print(f"\n{summary}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"causal-tracing-{args.model}"
    plot_token_classes(summaries, stem.with_suffix(".png"), overwrite=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"model": args.model, "samples": args.samples, "facts": len(kept),
         "summaries": [json.loads(summary.to_json()) for summary in summaries]}, indent=1))
    print(f"\nwrote {stem.with_suffix('.png')} and {stem.with_suffix('.json')} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
