"""Steering SmolLM2 toward weddings: the measured effect of a CAA vector by layer and alpha.

A steering vector per layer is the mean difference of the block output at the last token over
8 prompt pairs (wedding vs. a matched non-wedding sentence). For each (layer, alpha) the model
continues each of 20 neutral prompts greedily, steered at every position, and the script
measures:

- topic share: the share of the generated words that are in a wedding word list (WORDS);
- perplexity of the steered text under the unsteered model (exp of the mean negative
  log-likelihood of the generated tokens given everything before them): where steering starts
  to break the text, this rises far above the unsteered text's;
- distinct: the share of distinct words among the generated ones (repetition lowers it).

    .venv/bin/python scripts/steering_study.py

Prints the table as Markdown, and a few generations, and writes docs/img/steering-study.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp import InterpretableModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img" / "steering-study.json"

PAIRS = [
    ("I love weddings", "I love meetings"),
    ("We are going to a wedding", "We are going to a meeting"),
    ("She is getting married next week", "She is getting promoted next week"),
    ("The wedding ceremony was beautiful", "The business meeting was productive"),
    ("The groom kissed the bride", "The driver parked the car"),
    ("They planned their wedding reception", "They planned their office party"),
    ("He proposed to her and she said yes", "He asked her a question and she said yes"),
    ("The bride wore a white dress", "The nurse wore a white coat"),
]
WORDS = {"wedding", "weddings", "bride", "brides", "bridal", "groom", "grooms", "bridesmaid",
         "bridesmaids", "married", "marry", "marrying", "marriage", "marriages", "wed", "newlyweds",
         "ceremony", "ceremonies", "vows", "vow", "honeymoon", "engaged", "engagement", "fiance",
         "fiancee", "reception", "spouse", "husband", "wife", "proposal", "proposed"}
PROMPTS = [
    "I went to the", "Yesterday my friend and I", "The best thing about this weekend is",
    "She opened the door and saw", "My favourite memory is", "The town was busy because",
    "We spent the afternoon", "He wrote a letter about", "The news this morning was about",
    "Last summer we", "The photo shows", "Everyone was talking about the", "Today I am going to",
    "The story begins with", "In the evening they", "My sister called to tell me about",
    "The room was full of", "I will never forget the day", "The plan for Saturday is",
    "At the park, the children",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def perplexity(model: InterpretableModel, prompt: list[int], generated: list[int]) -> float:
    """exp(mean NLL) of `generated` after `prompt` under the model as it is (unsteered)."""
    logits = model([prompt + generated])[0, len(prompt) - 1:-1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, mx.array(generated)[:, None], axis=-1)
    return float(mx.exp(-mx.mean(chosen)).item())


def measure(model, vector, alpha: float, tokens: int) -> dict:
    """Topic share, perplexity and distinct-word share over the prompts, and the texts."""
    steer = None if vector is None else vector.interventions(alpha)
    texts, hits, total, distinct, ppl = [], 0, 0, [], []
    for prompt in PROMPTS:
        out = model.generate(prompt, max_tokens=tokens, interventions=steer)
        said = words(out.text)
        hits += sum(w in WORDS for w in said)
        total += len(said)
        distinct.append(len(set(said)) / max(len(said), 1))
        ppl.append(perplexity(model, out.prompt_tokens, out.tokens) if out.tokens else float("nan"))
        texts.append(out.text)
    return {"topic_share": hits / max(total, 1), "perplexity": float(np.nanmedian(ppl)),
            "distinct": float(np.mean(distinct)), "texts": texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per prompt")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 8, 14, 20])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    args = parser.parse_args()
    start = time.perf_counter()
    model = InterpretableModel(*mlxterp.load("smollm2-135m"))
    positive, negative = zip(*PAIRS, strict=True)
    baseline = measure(model, None, 0.0, args.tokens)
    rows = []
    for layer in args.layers:
        vector = model.steering_vector(list(positive), list(negative), layer=layer)
        norm = float(mx.linalg.norm(vector.vector).item())
        for alpha in args.alphas:
            rows.append({"layer": layer, "alpha": alpha, "vector_norm": norm,
                         **measure(model, vector, alpha, args.tokens)})
            print(f"layer {layer} alpha {alpha}: topic {rows[-1]['topic_share']:.3f}, "
                  f"perplexity {rows[-1]['perplexity']:.1f}", flush=True)
    seconds = time.perf_counter() - start

    print(f"\n{len(PROMPTS)} prompts x {args.tokens} tokens, greedy; {seconds:.0f} s on "
          f"{datetime.now(timezone.utc):%Y-%m-%d}")
    print("\n| layer | alpha | alpha x norm | topic share | median perplexity | distinct words |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| - | 0 | 0 | {baseline['topic_share']:.1%} | {baseline['perplexity']:.1f} | "
          f"{baseline['distinct']:.2f} |")
    for row in rows:
        print(f"| {row['layer']} | {row['alpha']:g} | {row['alpha'] * row['vector_norm']:.0f} | "
              f"{row['topic_share']:.1%} | {row['perplexity']:.1f} | {row['distinct']:.2f} |")
    print("\nGenerations (first 3 prompts):")
    shown = [("unsteered", baseline)] + [(f"layer {r['layer']}, alpha {r['alpha']:g}", r) for r in rows]
    for label, result in shown:
        for prompt, text in list(zip(PROMPTS, result["texts"], strict=True))[:3]:
            print(f"- {label}: {prompt!r} -> {text!r}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"tokens": args.tokens, "prompts": PROMPTS, "pairs": PAIRS,
                               "words": sorted(WORDS), "seconds": seconds, "baseline": baseline,
                               "rows": rows}, indent=1))
    print(f"\nwritten {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
