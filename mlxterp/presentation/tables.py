"""Text tables of patching results, for the command line and notebooks."""

from __future__ import annotations

import numpy as np

from mlxterp.experiments.pipeline.results import site_label

METHOD_NAMES = {"exact": "activation patching", "atp": "attribution patching (AtP)",
                "ig": "integrated gradients (IG)", "eap": "edge attribution patching (EAP)",
                "eap-ig": "edge attribution with integrated gradients (EAP-IG)", "random": "random circuits"}


def summary(result) -> str:
    """What was swept, and the baseline the recoveries are fractions of."""
    pairs = len(result.clean)
    name = result.metric
    donor, receiver = ("clean", "corrupted") if result.direction == "denoise" else ("corrupted", "clean")
    what = f"d({receiver}, {donor})" if result.is_distance else f"{name}({donor}) - {name}({receiver})"
    lines = [
        f"clean:     {result.clean[0]!r}" + (
            f" ({pairs} noise samples)" if result.corruption.get("kind") == "noise"
            else f" (+{pairs - 1} more pairs)" if pairs > 1 else ""),
        f"corrupted: {result.corrupted[0]!r}",
        f"{len(result.sites)} edges of the model's graph ({result.direction})"
        if result.component == "edges" else
        f"patching {result.component} over {' x '.join(result.over)} ({result.direction}), "
        f"{len(result.sites)} sites",
        f"baseline {result.metric}: {what} = " + (
            ", ".join(f"{b:.4g}" for b in result.baseline) if pairs <= 8 else
            f"mean {result.baseline.mean():.4g}, from {result.baseline.min():.4g} to "
            f"{result.baseline.max():.4g} over {pairs} pairs"),
    ]
    if result.method in ("atp", "ig"):
        lines.append(f"method: {METHOD_NAMES[result.method]} (estimates; --verify K patches the top "
                     "K exactly)")
    elif result.method != "exact":
        lines.append(f"method: {METHOD_NAMES[result.method]} (estimates)")
    elif result.noise is not None:
        lines.append(f"float32 noise: each recovery within {result.noise.max():.2g} points")
    return "\n".join(lines)


def ranking(result, top: int = 10) -> str:
    """The `top` sites by recovery, as an aligned table; over several pairs by the normalised
    mean (mean effect / mean baseline), with its standard error and a 95 % bootstrap interval."""
    order = np.argsort(-result.mean, kind="stable")[:top]
    ranked = [(rank, site_label(result, result.sites[i]), i) for rank, i in enumerate(order, 1)]
    width = max(len(label) for _, label, _ in ranked)
    if len(result.clean) == 1:
        lines = [f"{'rank':>4}  {'site':<{width}}  recovery"]
        lines += [f"{rank:>4}  {label:<{width}}  {result.mean[i]:7.1f}%" for rank, label, i in ranked]
        return "\n".join(lines)
    error, (low, high) = result.standard_error, result.interval(0.95)
    lines = [f"{'rank':>4}  {'site':<{width}}  normalised mean   s.e.   95% interval"]
    lines += [f"{rank:>4}  {label:<{width}}  {result.mean[i]:14.1f}%  {error[i]:5.1f}  "
              f"[{low[i]:6.1f}, {high[i]:6.1f}]" for rank, label, i in ranked]
    return "\n".join(lines)


def verified(estimate, exact) -> str:
    """The estimate's top sites beside their exact recoveries (from `verify_top`), as a table."""
    rows = estimate.top(len(exact.sites))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'rank':>4}  {'site':<{width}}  estimate     exact"]
    lines += [f"{rank:>4}  {label:<{width}}  {value:7.1f}%  {actual:7.1f}%"
              for rank, ((label, value), actual) in enumerate(zip(rows, exact.mean, strict=True), 1)]
    return "\n".join(lines)


def lens_table(result) -> str:
    """What each layer's lens predicts at the last position it covers: top token and its
    probability, KL to the final distribution, [the target's probability and rank].

    Example:
        >>> print(lens_table(model.logit_lens("The Eiffel Tower is in", target=" Paris")))
    """
    position = len(result.positions) - 1
    token = result.tokens[result.positions[position]]
    lines = [f"{result.lens} lens at position {result.positions[position]} ({token!r}), "
             f"{result.provenance.get('model', '')}",
             "layer  top token        prob     KL" + ("   P(target)  rank" if result.target else "")]
    for i, layer in enumerate(result.layers):
        line = (f"{layer:>5}  {result.top_tokens[i][position][0]!r:<15} "
                f"{result.top_probs[i, position, 0]:5.3f} {result.kl[i, position]:6.2f}")
        if result.target is not None:
            line += f"   {result.target_prob[i, position]:9.4f} {result.target_rank[i, position]:5d}"
        lines.append(line)
    return "\n".join(lines)
