"""How well attribution patching estimates exact activation patching on SmolLM2-135M: every
number quoted in docs/attribution.md.

    .venv/bin/python scripts/attribution_docs_numbers.py
    .venv/bin/python scripts/attribution_docs_numbers.py --save out/attribution   # also the JSONs

For three prompt pairs (a capital, the IOI name swap, a pronoun / gender pair), four
granularities (mlp x layer, block input x layer x position, self_attn x layer x head, self_attn x
layer x head x position) and two metrics (logit_diff, kl) it runs the exact sweep
(`model.patching_sweep`) and the AtP estimate (`model.attribution_patching`) with the same
arguments, and compares the two per site: Pearson and Spearman correlation of the mean
recoveries, the recall of the exact top 10 among the estimate's top 20 (ranked as `result.top`
ranks: highest recovery first), the sign flips among sites whose exact |recovery| exceeds 5
points, and the three sites where the estimate is furthest from the exact value. It then runs
integrated gradients (`method="ig", steps=16`) on the IOI pair, and AtP in the noising direction
on the mlp x layer sweep of every pair. Each row prints its timing.

Runs in about 10 minutes on a 2-core CPU (float32, OpenBLAS).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlxterp
from mlxterp import InterpretableModel
from mlxterp.presentation.tables import site_label

try:
    from scipy.stats import pearsonr, spearmanr
except ImportError:  # scipy is optional: the same statistics from numpy
    pearsonr = spearmanr = None


@dataclass(frozen=True)
class Pair:
    name: str
    clean: str
    corrupted: str
    answer: str  # the clean prompt's answer
    wrong_answer: str  # the corrupted prompt's answer


PAIRS = (
    Pair("capital", "The capital of France is", "The capital of Italy is", " Paris", " Rome"),
    Pair("IOI", "When Mary and John went to the store, John gave a drink to",
         "When John and Mary went to the store, Mary gave a drink to", " Mary", " John"),
    Pair("gender", "She is a woman. He is a", "He is a man. She is a", " man", " woman"),
)
GRANULARITIES = (
    ("mlp", ("layer",)),
    ("input", ("layer", "position")),
    ("self_attn", ("layer", "head")),
    ("self_attn", ("layer", "head", "position")),
)
METRICS = ("logit_diff", "kl")
IG_GRANULARITIES = (("mlp", ("layer",)), ("self_attn", ("layer", "head")), ("input", ("layer", "position")))
ALPHAS = (0.1, 0.25, 0.5, 0.75, 1.0)
# block-input sites where AtP is far off: (pair, layer, position, metric)
ALONG = (("IOI", 29, 13, "kl"), ("IOI", 29, 13, "logit_diff"), ("IOI", 0, 9, "logit_diff"),
         ("IOI", 0, 3, "logit_diff"), ("IOI", 7, 3, "kl"), ("gender", 22, 5, "logit_diff"))
BIG = 5.0  # points: the sites whose sign must agree
COLUMNS = ("pair", "granularity", "metric", "method", "sites", "Pearson", "Spearman",
           "Pearson w/o L0", "top-10 in top-20", "sign flips", "exact s", "estimate s")


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if pearsonr is not None:
        return float(pearsonr(a, b)[0])
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if spearmanr is not None:
        return float(spearmanr(a, b)[0])
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def compare(exact, estimate) -> dict:
    """The agreement of an estimate with the exact result of the same sweep."""
    x, e = exact.mean, estimate.mean
    not_l0 = np.array([s["layer"] != 0 for s in exact.sites])
    top_exact = set(np.argsort(-x, kind="stable")[:10].tolist())
    top_estimate = set(np.argsort(-e, kind="stable")[:20].tolist())
    big = np.abs(x) > BIG
    flips = int(np.sum(big & (np.sign(e) != np.sign(x))))
    worst = np.argsort(-np.abs(e - x), kind="stable")[:3]
    return {
        "sites": len(x),
        "Pearson": pearson(x, e), "Spearman": spearman(x, e),
        "Pearson w/o L0": pearson(x[not_l0], e[not_l0]),
        "recall": len(top_exact & top_estimate) / len(top_exact),
        "flips": flips, "big": int(big.sum()),
        "worst": [(site_label(exact, exact.sites[i]), float(x[i]), float(e[i])) for i in worst],
    }


def check(model: InterpretableModel, prompt: str, answer: str) -> bool:
    """Print the model's top next tokens for `prompt`; True when the first is `answer`."""
    with model.trace(prompt) as trace:
        logits = trace.output[0, -1].astype(mx.float32)
    probs = mx.softmax(logits)
    order = mx.argsort(-logits)[:3].tolist()
    tops = ", ".join(f"{model.tokenizer.decode([i])!r} {probs[i].item():.3f}" for i in order)
    ok = model.tokenizer.decode([order[0]]) == answer
    print(f"  {prompt!r} ({len(model.encode(prompt))} tokens) -> {tops}  "
          f"[{'ok' if ok else 'NOT'} {answer!r}]")
    return ok


def along_the_patch(model: InterpretableModel, pair: Pair, layer: int, position: int, metric: str,
                    atp: float) -> None:
    """Print the exact recovery of moving the block input of `layer` at `position` a fraction
    alpha of the way from the corrupted run's value to the clean run's, beside AtP's straight
    line (alpha x its estimate of the whole patch)."""
    key = f"{model.tree.blocks[layer]}:input"
    answer, wrong = (model.tokenizer.encode(t, add_special_tokens=False)[0]
                     for t in (pair.answer, pair.wrong_answer))
    with model.trace(pair.clean, capture=[key]) as trace:
        donor = trace.activations[key]
        clean = trace.output[0, -1].astype(mx.float32)
    with model.trace(pair.corrupted) as trace:
        corrupted = trace.output[0, -1].astype(mx.float32)
    donor_log_probs = clean - mx.logsumexp(clean)

    def value(logits):
        if metric == "logit_diff":
            return (logits[answer] - logits[wrong]).item()
        log_probs = logits - mx.logsumexp(logits)
        return mx.sum(mx.exp(donor_log_probs) * (donor_log_probs - log_probs)).item()

    start, end = value(corrupted), value(clean)
    mask = (mx.arange(donor.shape[1]) == position)[None, :, None]
    cells = []
    for alpha in ALPHAS:
        def move(x, alpha=alpha):
            return mx.where(mask, x + alpha * (donor - x), x)

        with model.trace(pair.corrupted, interventions={key: move}) as trace:
            patched = trace.output[0, -1].astype(mx.float32)
        recovery = 100 * (value(patched) - start) / (end - start)
        cells.append(f"{recovery:6.1f} / {alpha * atp:6.1f}")
    label = f"{pair.name} L{layer} pos {position} {model.to_str_tokens(model.encode(pair.clean))[position]!r}"
    print(f"| {label} | {metric} | " + " | ".join(cells) + " |")


def arguments(pair: Pair, component: str, over: tuple, metric: str) -> dict:
    extra = {"answer": pair.answer, "wrong_answer": pair.wrong_answer} if metric == "logit_diff" else {}
    return {"component": component, "over": over, "metric": metric, **extra}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def row_text(row: dict) -> str:
    stats = row["stats"]
    return (f"| {row['pair']} | {row['granularity']} | {row['metric']} | {row['method']} | "
            f"{stats['sites']} | {stats['Pearson']:.2f} | {stats['Spearman']:.2f} | "
            f"{stats['Pearson w/o L0']:.2f} | {stats['recall']:.1f} | "
            f"{stats['flips']}/{stats['big']} | {row['exact_s']:.1f} | {row['estimate_s']:.1f} |")


def print_row(row: dict) -> None:
    print(row_text(row))
    for label, exact, estimate in row["stats"]["worst"]:
        print(f"      worst: {label:<22} exact {exact:7.1f}%  estimate {estimate:7.1f}%")


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + [row_text(row) for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path, help="write every result as JSON into this folder")
    args = parser.parse_args()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, tokenizer = mlxterp.load("smollm2-135m")
    model = InterpretableModel(base, tokenizer)
    print(f"scipy.stats: {'yes' if pearsonr is not None else 'no (numpy ranks)'}")

    print("== the model's answers ==")
    for pair in PAIRS:
        lengths = {len(model.encode(p)) for p in (pair.clean, pair.corrupted)}
        assert len(lengths) == 1, f"{pair.name}: the prompts tokenise to different lengths {lengths}"
        ok = check(model, pair.clean, pair.answer) & check(model, pair.corrupted, pair.wrong_answer)
        print(f"  {pair.name}: {'the model answers both prompts' if ok else 'NOT answered correctly'}")

    def run(pair: Pair, component: str, over: tuple, metric: str, method: str = "atp",
            direction: str = "denoise", exact=None):
        kwargs = {**arguments(pair, component, over, metric), "direction": direction}
        exact_s = 0.0
        if exact is None:
            exact, exact_s = timed(lambda: model.patching_sweep(pair.clean, pair.corrupted,
                                                                progress=False, **kwargs))
        extra = {"steps": 16} if method == "ig" else {}
        estimate, estimate_s = timed(lambda: model.attribution_patching(
            pair.clean, pair.corrupted, method=method, **extra, **kwargs))
        if args.save:
            stem = f"{pair.name}-{component}-{'x'.join(over)}-{metric}-{direction}"
            exact.to_json(args.save / f"{stem}-exact.json")
            estimate.to_json(args.save / f"{stem}-{method}.json")
        row = {"pair": pair.name, "granularity": f"{component} x {' x '.join(over)}",
               "metric": metric + ("" if direction == "denoise" else " (noise)"), "method": method,
               "stats": compare(exact, estimate), "exact_s": exact_s, "estimate_s": estimate_s}
        print_row(row)
        return row, exact

    header = "| " + " | ".join(COLUMNS) + " |"
    print("\n== AtP against exact patching (denoise) ==")
    print(header)
    rows, exacts = [], {}
    for pair in PAIRS:
        for component, over in GRANULARITIES:
            for metric in METRICS:
                row, exact = run(pair, component, over, metric)
                rows.append(row)
                exacts[pair.name, component, over, metric] = exact

    print("\n== integrated gradients (steps=16) on the IOI pair ==")
    print(header)
    ig_rows = []
    ioi = PAIRS[1]
    for component, over in IG_GRANULARITIES:
        for metric in METRICS:
            row, _ = run(ioi, component, over, metric, method="ig",
                         exact=exacts[ioi.name, component, over, metric])
            ig_rows.append(row)

    print("\n== the whole first-block input (layer 0, all positions) of the IOI pair: exact 100% by "
          "construction; IG tends to it as the steps grow ==")
    for metric in METRICS:
        kwargs = {**arguments(ioi, "input", ("layer",), metric), "layers": [0]}
        cells = [f"AtP {model.attribution_patching(ioi.clean, ioi.corrupted, **kwargs).mean[0]:.2f}%"]
        for steps in (1, 4, 16, 64):
            estimate = model.attribution_patching(ioi.clean, ioi.corrupted, method="ig", steps=steps,
                                                  **kwargs)
            cells.append(f"IG {steps} steps {estimate.mean[0]:.2f}%")
        print(f"  {metric:<10} " + ", ".join(cells))

    print("\n== AtP in the noising direction, mlp x layer ==")
    print(header)
    noise_rows = []
    for pair in PAIRS:
        for metric in METRICS:
            row, _ = run(pair, "mlp", ("layer",), metric, direction="noise")
            noise_rows.append(row)

    print("\n== layer 0 (mlp x layer): exact vs AtP ==")
    for pair in PAIRS:
        for metric in METRICS:
            exact = exacts[pair.name, "mlp", ("layer",), metric]
            estimate = model.attribution_patching(pair.clean, pair.corrupted,
                                                  **arguments(pair, "mlp", ("layer",), metric))
            print(f"  {pair.name:<8} {metric:<10} L0: exact {exact.mean[0]:6.1f}%  "
                  f"AtP {estimate.mean[0]:7.1f}%")

    print("\n== the response along the patch: exact recovery / AtP's line (alpha x AtP), block input ==")
    print("| site | metric | " + " | ".join(f"alpha {a}" for a in ALPHAS) + " |")
    print("|---|---|" + "---|" * len(ALPHAS))
    by_name = {pair.name: pair for pair in PAIRS}
    for name, layer, position, metric in ALONG:
        pair = by_name[name]
        estimate = model.attribution_patching(
            pair.clean, pair.corrupted, layers=[layer], positions=[position],
            **arguments(pair, "input", ("layer", "position"), metric))
        along_the_patch(model, pair, layer, position, metric, float(estimate.mean[0]))

    print("\n== KL at the two ends: AtP of a patch that moves the final logits all the way is "
          "100 x (1 + KL(receiver || donor) / KL(donor || receiver)) ==")
    for pair in PAIRS:
        logits = []
        for prompt in (pair.clean, pair.corrupted):
            with model.trace(prompt) as trace:
                z = trace.output[0, -1].astype(mx.float32)
            logits.append(z - mx.logsumexp(z))
        p, q = logits
        forward = mx.sum(mx.exp(p) * (p - q)).item()
        backward = mx.sum(mx.exp(q) * (q - p)).item()
        print(f"  {pair.name:<8} KL(clean || corrupted) {forward:.3f}, "
              f"KL(corrupted || clean) {backward:.3f}: "
              f"{100 * (1 + backward / forward):.1f}%")

    print("\n== the table (exact s / estimate s: seconds of each call; IG rows reuse the exact run) ==")
    print(table(rows + ig_rows + noise_rows))
    print("\nworst sites (exact vs estimate, recovery %):")
    for row in rows + ig_rows + noise_rows:
        worst = "; ".join(f"{label} {exact:.1f} vs {estimate:.1f}"
                          for label, exact, estimate in row["stats"]["worst"])
        print(f"- {row['pair']}, {row['granularity']}, {row['metric']}, {row['method']}: {worst}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
