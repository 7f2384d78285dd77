"""Text tables of patching results, for the command line and notebooks."""

from __future__ import annotations


def summary(result) -> str:
    """What was swept, and the baseline the recoveries are fractions of."""
    pairs = len(result.clean)
    name = result.metric
    donor, receiver = ("clean", "corrupted") if result.direction == "denoise" else ("corrupted", "clean")
    what = f"d({receiver}, {donor})" if result.is_distance else f"{name}({donor}) - {name}({receiver})"
    lines = [
        f"clean:     {result.clean[0]!r}" + (f" (+{pairs - 1} more pairs)" if pairs > 1 else ""),
        f"corrupted: {result.corrupted[0]!r}",
        f"patching {result.component} over {' x '.join(result.over)} ({result.direction}), "
        f"{len(result.sites)} sites",
        f"baseline {result.metric}: {what} = "
        + ", ".join(f"{b:.4g}" for b in result.baseline),
    ]
    if result.noise is not None:
        lines.append(f"float32 noise: each recovery within {result.noise.max():.2g} points")
    return "\n".join(lines)


def ranking(result, top: int = 10) -> str:
    """The `top` sites by mean recovery, as an aligned table."""
    rows = result.top(top)
    width = max(len(label) for label, _ in rows)
    lines = [f"{'rank':>4}  {'site':<{width}}  recovery"]
    lines += [f"{rank:>4}  {label:<{width}}  {value:7.1f}%" for rank, (label, value) in enumerate(rows, 1)]
    return "\n".join(lines)
