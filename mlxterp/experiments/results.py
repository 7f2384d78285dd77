"""Results of patching experiments: recoveries with what they were measured on, as data.

Runners return `SweepValues`; `patching_sweep` and `attribution_patching` wrap them in a
`PatchingResult`, which tables and plots (`mlxterp.presentation`) read.

Example:
    >>> result = model.patching_sweep(clean, corrupted, over=("layer", "position"), metric="kl")
    >>> result.grid().shape, result.to_dataframe().head()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from mlxterp.errors import MlxterpError
from mlxterp.experiments.datasets import PromptPair
from mlxterp.experiments.plan import SweepValues
from mlxterp.paths import output_path

# Of the JSON. 3: answers per pair, and resources; 2 (answers for all pairs) and 1 (mlxterp 0.1,
# before provenance) are read too.
FORMAT = 3


class ResultFormatError(MlxterpError, ValueError):
    """A saved result this version of mlxterp cannot read."""


@dataclass
class PatchingResult:
    """Recoveries of a patching sweep, with what they were measured on and what made them.

    `recovery[pair, site]` is in percent; `sites[i]` says which layer / head / position site i
    is; `tokens` and `corrupted_tokens` hold each pair's prompts as token strings;
    `provenance` the model (name, sha256 of its weights, dtype) and the mlxterp and MLX versions.
    """

    recovery: np.ndarray  # (pairs, sites), percent
    sites: list[dict]  # labels of each site: {"layer": 3, "position": 5, ...}
    over: tuple[str, ...]
    component: str
    metric: str
    direction: str
    # (pairs,): d(receiver, donor) for distances, s(donor) - s(receiver) for scores
    baseline: np.ndarray
    clean: list[str]
    corrupted: list[str]
    tokens: list[list[str]] = field(default_factory=list)  # clean tokens, per pair
    is_distance: bool = True  # False for scores such as logit_diff
    position: int = -1  # the measured position
    # per pair, [answer, wrong_answer] ids of the metrics that take them (logit_diff; prob: [id, None])
    answers: list = field(default_factory=list)
    answer_tokens: list = field(default_factory=list)  # the same as text
    metric_values: SweepValues | None = None
    # (pairs, sites): percentage points by which float32 noise can move each recovery
    noise: np.ndarray | None = None
    # how the recoveries were found: "exact" (patched forward passes), "atp" or "ig" (estimates)
    method: str = "exact"
    # where each site is, as `Site(**location)` takes it: module, is_input, positions, head, n_heads
    locations: list[dict] = field(default_factory=list)
    corrupted_tokens: list[list[str]] = field(default_factory=list)  # per pair
    provenance: dict = field(default_factory=dict)  # model, model_sha256, dtype, mlxterp, mlx
    # how the corrupted run was made when not by a prompt: {"kind": "noise", "scale", "seed",
    # "positions", "module"} (causal tracing) or {"kind": "zero" | "mean", ...}
    corruption: dict = field(default_factory=dict)
    # what the run took: {"ranks", "peak_memory_bytes" (mx.get_peak_memory, the largest of any
    # rank), "seconds"}
    resources: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        """Mean recovery over pairs, one value per site."""
        return self.recovery.mean(axis=0)

    @property
    def effect(self) -> np.ndarray:
        """(pairs, sites): how far each patch moved the metric, patched - receiving run, in the
        metric's own units (causal tracing's indirect effect for metric "prob")."""
        if self.metric_values is None:
            raise MlxterpError("this result has no metric values (an mlxterp 0.1 file); run it again.")
        values = self.metric_values
        receiver = values.corrupted if self.direction == "denoise" else values.clean
        return values.patched - receiver[:, None]

    @property
    def standard_error(self) -> np.ndarray:
        """Standard error of the mean recovery over pairs, one value per site (0 for one pair)."""
        pairs = self.recovery.shape[0]
        return self.recovery.std(axis=0, ddof=1) / np.sqrt(pairs) if pairs > 1 else np.zeros(len(self.sites))

    def interval(self, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
        """(2, sites): a bootstrap percentile interval of the mean recovery over pairs (pairs
        resampled with replacement); for one pair, the mean itself.

        Example:
            >>> low, high = result.interval(0.95)
        """
        if not 0 < confidence < 1:
            raise MlxterpError(f"confidence={confidence!r}: give a fraction between 0 and 1, e.g. 0.95.")
        pairs = self.recovery.shape[0]
        draws = np.random.default_rng(seed).integers(0, pairs, size=(resamples, pairs))
        means = self.recovery[draws].mean(axis=1)  # (resamples, sites)
        tail = (1 - confidence) / 2 * 100
        return np.percentile(means, [tail, 100 - tail], axis=0)

    def prompt_pairs(self) -> list:
        """The pairs this result was measured on, as `PromptPair`s (with their answer ids)."""
        answers = self.answers or [[None, None]] * len(self.clean)
        return [PromptPair(clean, corrupted, *pair_answers) for clean, corrupted, pair_answers
                in zip(self.clean, self.corrupted, answers, strict=True)]

    def to_dict(self) -> dict:
        """`{layer: recovery}` for a layer sweep; `{(layer, head, ...): recovery}` otherwise."""
        keys = [s["layer"] if self.over == ("layer",) else tuple(s[a] for a in self.over)
                for s in self.sites]
        return {k: float(v) for k, v in zip(keys, self.mean, strict=True)}

    def grid(self) -> np.ndarray:
        """Mean recoveries shaped by `over` (e.g. (layers, positions)); NaN where not swept."""
        axes = [sorted({s[a] for s in self.sites}) for a in self.over]
        grid = np.full([len(a) for a in axes], np.nan)
        for site, value in zip(self.sites, self.mean, strict=True):
            grid[tuple(ax.index(site[a]) for ax, a in zip(axes, self.over, strict=True))] = value
        return grid

    def axis_values(self, axis: str) -> list:
        return sorted({s[axis] for s in self.sites})

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most important sites, as (label, recovery), highest recovery first; see
        `mlxterp.presentation.tables.top`."""
        from mlxterp.presentation.tables import top

        return top(self, k)

    def __repr__(self) -> str:
        pairs = self.recovery.shape[0]
        top = ", ".join(f"{label} {value:.1f}%" for label, value in self.top(5))
        if pairs > 1:
            top += " (mean over pairs)"
        model = self.provenance.get("model", "unknown model")
        return (f"PatchingResult({self.component} over {' x '.join(self.over)}, {self.metric}, "
                f"{self.direction}, {self.method}; {len(self.sites)} sites, {pairs} "
                f"pair{'s' if pairs > 1 else ''}, {model})\n  top: {top}")

    def to_dataframe(self):
        """One row per (pair, site): pair, the prompts, the site's labels, [the clean and
        corrupted token at its position], recovery, noise. `attrs` holds what made the result.

        Example:
            >>> result.to_dataframe().groupby("layer").recovery.mean()
        """
        import pandas as pd

        records = []
        for pair in range(self.recovery.shape[0]):
            for i, site in enumerate(self.sites):
                record = {"pair": pair, "clean": self.clean[pair], "corrupted": self.corrupted[pair],
                          **site, "recovery": float(self.recovery[pair, i])}
                if isinstance(site.get("position"), int) and self.tokens:
                    record["token"] = self.tokens[pair][site["position"]]
                    if self.corrupted_tokens:
                        record["corrupted_token"] = self.corrupted_tokens[pair][site["position"]]
                if self.noise is not None:
                    record["noise"] = float(self.noise[pair, i])
                records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame.attrs = {"component": self.component, "over": self.over, "metric": self.metric,
                       "direction": self.direction, "method": self.method,
                       "position": self.position, "answers": self.answers, **self.provenance}
        return frame

    ARRAYS = {"recovery": np.float64, "baseline": np.float64, "noise": np.float64}

    def to_json(self, path: str | Path | None = None, overwrite: bool = False) -> str:
        """The result as JSON (written to `path` when given; an existing file only with
        `overwrite=True`); `from_json` reads it back exactly."""
        return write_json(self, path, overwrite)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PatchingResult:
        """Read a result written by `to_json` (JSON text or a file path), of this format or an
        older one.

        Example:
            >>> PatchingResult.from_json("out/patch-smollm2-135m-mlp-layer-kl.json").top(3)
        """
        result = read_json(cls, text_or_path)
        if result.answers and not isinstance(result.answers[0], list):  # format 2: one for all pairs
            result.answers = [result.answers] * len(result.clean)
            result.answer_tokens = [result.answer_tokens] * len(result.clean)
        if result.metric_values is not None:
            result.metric_values = SweepValues(**{k: np.array(v, dtype=np.float64)
                                                  for k, v in result.metric_values.items()})
        result.over = tuple(result.over)
        return result

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """A bar chart (one axis), heatmap (two) or heatmaps faceted by head (three); for a
        causal trace the paper's figure; see mlxterp.presentation.plots. PNG, PDF or SVG by the
        path's extension."""
        from mlxterp.presentation.plots import plot_causal_trace, plot_result

        if self.metric == "prob" and self.corruption and self.over == ("layer", "position"):
            return plot_causal_trace([self], path, overwrite=overwrite)
        return plot_result(self, path, overwrite=overwrite)

    def to_html(self, path: str | Path, overwrite: bool = False) -> Path:
        """One self-contained interactive HTML page (no network needed to view it): the grid or
        bars, hover for site, tokens, recovery and raw values, a ranking view; see
        `mlxterp.presentation.report`.

        Example:
            >>> result.to_html("ioi-heads.html")
        """
        from mlxterp.presentation.report import write_html

        return write_html(self, path, overwrite=overwrite)


def write_json(result, path: str | Path | None, overwrite: bool) -> str:
    """A result dataclass as JSON text, written to `path` (.json) when given."""
    data = {"format": FORMAT}
    for name, value in vars(result).items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, SweepValues):
            value = {key: array.tolist() for key, array in vars(value).items()}
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    text = json.dumps(data, indent=1)
    if path is not None:
        output_path(path, {".json"}, overwrite).write_text(text)
    return text


def read_json(cls, text_or_path: str | Path):
    """A `cls` from JSON text or a file written by `write_json`, its `cls.ARRAYS` as numpy."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text_or_path).read_text()
    data = json.loads(text)
    written = data.pop("format", 1)
    if written > FORMAT:
        raise ResultFormatError(
            f"this result is in format {written}, written by mlxterp "
            f"{data.get('provenance', {}).get('mlxterp', '(a newer version)')}; this mlxterp "
            f"reads formats 1 to {FORMAT}. Upgrade mlxterp to read it."
        )
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ResultFormatError(f"not a {cls.__name__}: unknown fields {sorted(unknown)}.")
    for name, dtype in cls.ARRAYS.items():
        if data.get(name) is not None:
            data[name] = np.array(data[name], dtype=dtype)
    return cls(**data)
