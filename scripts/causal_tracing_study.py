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

import mlx.core as mx

import mlxterp
from mlxterp import InterpretableModel, Noise, PatchingResult, answered_facts, load_facts, token_class_summary
from mlxterp.experiments.analyses.causal_tracing import KINDS
from mlxterp.presentation.plots import plot_token_classes

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "tests" / "fixtures" / "facts.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a bundled name or a .gguf file")
    parser.add_argument("--name", help="the name results record (default: --model)")
    parser.add_argument("--dtype", default="float32", help="float32 (as on this CPU), bfloat16, float16")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (the paper: 10)")
    parser.add_argument("--work", type=Path, default=ROOT / "test-artifacts" / "causal-tracing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--done-only", action="store_true",
                        help="summarise the facts already traced under --work, trace none")
    args = parser.parse_args()
    base, tokenizer = mlxterp.load(args.model, dtype=args.dtype)
    if args.name:  # a GGUF copied elsewhere (the GPU machine) records the bundled model's name
        object.__setattr__(base, "mlxterp_name", args.name)
    model = InterpretableModel(base, tokenizer)
    print(f"{args.model} ({args.dtype}) on {mx.default_device()}", flush=True)
    facts = load_facts(json.loads(FACTS.read_text(encoding="utf-8")))
    kept = answered_facts(model, facts)
    print(f"{args.model}: {len(kept)} of {len(facts)} facts answered", flush=True)
    folder = args.work / f"{args.name or args.model}-{args.samples}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, list[PatchingResult]] = {kind: [] for kind in KINDS}
    for n, fact in enumerate(kept):
        paths = {kind: folder / f"fact-{facts.index(fact):03d}-{kind}.json" for kind in KINDS}
        if args.done_only and not all(path.exists() for path in paths.values()):
            print(f"summarising the {n} facts traced so far")
            break
        for kind, path in paths.items():
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
    stem = args.out / f"causal-tracing-{args.name or args.model}"
    plot_token_classes(summaries, stem.with_suffix(".png"), overwrite=True)
    stem.with_suffix(".json").write_text(json.dumps(
        {"model": args.name or args.model, "dtype": args.dtype, "device": str(mx.default_device()),
         "samples": args.samples, "facts": len(results["hidden"]), "answered": len(kept),
         "summaries": [json.loads(summary.to_json()) for summary in summaries]}, indent=1))
    print(f"\nwrote {stem.with_suffix('.png')} and {stem.with_suffix('.json')} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
