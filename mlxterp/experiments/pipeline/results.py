"""Results of patching experiments: per-site records with what they were measured on, as data.

Runners return `SweepValues`; `sweep_result` wraps them in a `PatchingResult`: one record per
site (its labels and its location) and the metric values of every run. Recoveries, their noise,
the baseline and the ranking are computed from those values, never stored beside them. Tables
and plots (`mlxterp.presentation`) read results; results never import them.

Example:
    >>> result = model.patching_sweep(clean, corrupted, over=("layer", "position"), metric="kl")
    >>> result.grid().shape, result.to_dataframe().head()
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputError, ResultFormatError
from mlxterp.experiments.data.pairs import PromptPair
from mlxterp.experiments.pipeline.plan import SweepValues
from mlxterp.models.identity import fingerprint, model_name
from mlxterp.paths import output_path, write_atomically
from mlxterp.version import __version__

# Of the JSON. 4: one record per site (labels and "location"), recoveries computed from the
# metric values; 3 (answers per pair, and resources), 2 (answers for all pairs) and 1 (mlxterp
# 0.1, before provenance) are read too.
FORMAT = 4

# How results are drawn: the presentation layer registers its functions here ("patching",
# "html", "lens", "heads") when mlxterp is imported, so that results stay data and never import
# what draws them.
VIEWS: dict[str, Callable] = {}


def draw(view: str, result, path: str | Path | None, overwrite: bool):
    """`result` drawn by the presentation function registered as `view`."""
    return VIEWS[view](result, path, overwrite=overwrite)


def provenance(module) -> dict:
    """What made a result: the model (name, sha256 of its weights, dtype), mlxterp and MLX."""
    sha256, dtype = fingerprint(module)
    return {"model": model_name(module), "model_sha256": sha256, "dtype": dtype,
            "mlxterp": __version__, "mlx": mx.__version__}


def site_label(result, site: dict) -> str:
    """A site's short name: `L3`, `L3 H2`, `L8 F1234` (an SAE feature), `L8 SAE error`, `L12 E5` (an expert),
    `L3 pos 5 ' to'` (the clean token at the position), an edge's name, or a circuit's size."""
    if "edge" in site:
        return site["edge"]
    if "edges" in site:
        return f"{site['edges']} edges"
    parts = [f"L{site['layer']}"]
    if "head" in site:
        parts.append(f"H{site['head']}")
    if "feature" in site:
        parts.append(f"F{site['feature']}")
    if "expert" in site:
        parts.append(f"E{site['expert']}")
    if site.get("component", "").endswith("sae.error"):
        parts.append("SAE error")
    if "position" in site:
        token = result.tokens[0][site["position"]] if result.tokens else ""
        parts.append(f"pos {site['position']} {token!r}")
    return " ".join(parts)


@dataclass
class PatchingResult:
    """Recoveries of a patching sweep, with what they were measured on and what made them.

    `sites[i]` is site i's record: its labels (layer, head, position, component) and its
    `location`, which `site_at` turns back into the `Site` that was patched. `metric_values`
    holds the metric of every run; `recovery[pair, site]` (percent), `noise`, `baseline` and
    `mean` are computed from it. `tokens` and `corrupted_tokens` hold each pair's prompts as
    token strings; `provenance` the model (name, sha256 of its weights, dtype) and the mlxterp
    and MLX versions.
    """

    sites: list[dict]  # one record per site: {"layer": 3, "position": 5, ..., "location": {...}}
    over: tuple[str, ...]
    component: str
    metric: str
    direction: str
    metric_values: SweepValues
    clean: list[str]
    corrupted: list[str]
    tokens: list[list[str]] = field(default_factory=list)  # clean tokens, per pair
    corrupted_tokens: list[list[str]] = field(default_factory=list)  # per pair
    is_distance: bool = True  # False for scores such as logit_diff
    position: int = -1  # the measured position
    # per pair, [answer, wrong_answer] ids of the metrics that take them (logit_diff; prob: [id, None])
    answers: list = field(default_factory=list)
    answer_tokens: list = field(default_factory=list)  # the same as text
    # how the recoveries were found: "exact" (patched forward passes), "atp" or "ig" (estimates)
    method: str = "exact"
    provenance: dict = field(default_factory=dict)  # model, model_sha256, dtype, mlxterp, mlx
    # how the corrupted run was made when not by a prompt: {"kind": "noise", "scale", "seed",
    # "positions", "module"} (causal tracing) or {"kind": "zero" | "mean", ...}
    corruption: dict = field(default_factory=dict)
    # what the run took: {"ranks", "peak_memory_bytes" (mx.get_peak_memory, the largest of any
    # rank), "seconds"}
    resources: dict = field(default_factory=dict)

    @property
    def recovery(self) -> np.ndarray:
        """(pairs, sites) percent: how far each patch moved the receiving run toward the donor."""
        return self.metric_values.recovery(self.direction)

    @property
    def noise(self) -> np.ndarray:
        """(pairs, sites): percentage points by which float32 noise can move each recovery."""
        return self.metric_values.recovery_noise(self.direction)

    @property
    def baseline(self) -> np.ndarray:
        """(pairs,): the gap to recover, d(receiver, donor) for distances (positive),
        s(donor) - s(receiver) for scores."""
        gap = self.metric_values.gap(self.direction)
        return -gap if self.is_distance else gap

    @property
    def labels(self) -> list[dict]:
        """Each site's labels, without its location."""
        return [{k: v for k, v in site.items() if k != "location"} for site in self.sites]

    @property
    def mean(self) -> np.ndarray:
        """The summary over pairs, one value per site, in percent: the normalised mean, the mean
        effect of a patch over the mean gap to recover (as IOI papers report), so that no pair
        with a tiny gap can swing it. For one pair, its recovery. The mean of the per-pair
        recoveries is `recovery.mean(axis=0)`."""
        return self.effect.mean(axis=0) / self.metric_values.gap(self.direction).mean() * 100

    @property
    def effect(self) -> np.ndarray:
        """(pairs, sites): how far each patch moved the metric, patched - receiving run, in the
        metric's own units (causal tracing's indirect effect for metric "prob")."""
        values = self.metric_values
        receiver = values.corrupted if self.direction == "denoise" else values.clean
        return values.patched - receiver[:, None]

    @property
    def standard_error(self) -> np.ndarray:
        """Standard error of `mean` over pairs, one value per site (0 for one pair), by the delta
        method for a ratio of means: the spread of effect - mean * gap over pairs."""
        pairs = len(self.clean)
        if pairs == 1:
            return np.zeros(len(self.sites))
        gap = self.metric_values.gap(self.direction)
        residual = self.effect - (self.mean / 100) * gap[:, None]
        return 100 * residual.std(axis=0, ddof=1) / np.sqrt(pairs) / abs(gap.mean())

    def interval(self, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
        """(2, sites): a bootstrap percentile interval of `mean` (pairs resampled with
        replacement, the normalised mean of each resample); for one pair, the mean itself.

        Example:
            >>> low, high = result.interval(0.95)
        """
        if not 0 < confidence < 1:
            raise InputError(f"confidence={confidence!r}: give a fraction between 0 and 1, e.g. 0.95.")
        effect, gap = self.effect, self.metric_values.gap(self.direction)
        pairs = len(gap)
        # How often each pair is drawn in each resample: resample means are products, not copies.
        counts = np.random.default_rng(seed).multinomial(pairs, np.full(pairs, 1 / pairs), size=resamples)
        gap_means = counts @ gap
        tail = (1 - confidence) / 2 * 100
        bounds = np.empty((2, effect.shape[1]))
        for start in range(0, effect.shape[1], 256):  # about 20 MB of resampled means at a time
            means = counts @ effect[:, start:start + 256] / gap_means[:, None] * 100
            bounds[:, start:start + 256] = np.percentile(means, [tail, 100 - tail], axis=0)
        return bounds

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
        axes = [self.axis_values(a) for a in self.over]
        grid = np.full([len(a) for a in axes], np.nan)
        for site, value in zip(self.sites, self.mean, strict=True):
            grid[tuple(ax.index(site[a]) for ax, a in zip(axes, self.over, strict=True))] = value
        return grid

    def axis_values(self, axis: str) -> list:
        """The values one label takes over the sites, sorted (e.g. the layers swept)."""
        return sorted({s[axis] for s in self.sites})

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most important sites, as (label, mean recovery), highest first (in both
        directions: how far the patch moves the receiving run toward the donor's output).

        Example:
            >>> result.top(3)
            [('L0', 100.0), ('L7', 32.1), ('L21', 26.3)]
        """
        order = np.argsort(-self.mean, kind="stable")[:k]
        return [(site_label(self, self.sites[i]), float(self.mean[i])) for i in order]

    def __repr__(self) -> str:
        pairs = len(self.clean)
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

        recovery, noise, labels = self.recovery, self.noise, self.labels
        records = []
        for pair in range(recovery.shape[0]):
            for i, site in enumerate(labels):
                record = {"pair": pair, "clean": self.clean[pair], "corrupted": self.corrupted[pair],
                          **site, "recovery": float(recovery[pair, i])}
                if isinstance(site.get("position"), int) and self.tokens:
                    record["token"] = self.tokens[pair][site["position"]]
                    if self.corrupted_tokens:
                        record["corrupted_token"] = self.corrupted_tokens[pair][site["position"]]
                record["noise"] = float(noise[pair, i])
                records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame.attrs = {"component": self.component, "over": self.over, "metric": self.metric,
                       "direction": self.direction, "method": self.method,
                       "position": self.position, "answers": self.answers, **self.provenance}
        return frame

    ARRAYS = {}  # fields read back as numpy arrays (the metric values are read on their own)

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
        result = read_json(cls, text_or_path, upgrade=_upgrade)
        result.metric_values = SweepValues(**{key: np.array(values, dtype=np.float64)
                                              for key, values in result.metric_values.items()})
        result.over = tuple(result.over)
        return result

    def plot(self, path: str | Path | None = None, overwrite: bool = False):
        """A bar chart (one axis), heatmap (two) or heatmaps faceted by head (three); for a
        causal trace the paper's figure; see mlxterp.presentation.plots. PNG, PDF or SVG by the
        path's extension."""
        return draw("patching", self, path, overwrite)

    def to_html(self, path: str | Path, overwrite: bool = False) -> Path:
        """One self-contained interactive HTML page (no network needed to view it): the grid or
        bars, hover for site, tokens, recovery and raw values, a ranking view; see
        `mlxterp.presentation.report`.

        Example:
            >>> result.to_html("ioi-heads.html")
        """
        return draw("html", self, path, overwrite)


def _upgrade(data: dict) -> dict:
    """A result of an older format as this format's fields."""
    recovery = np.array(data.pop("recovery"), dtype=np.float64) if "recovery" in data else None
    baseline = np.array(data.pop("baseline"), dtype=np.float64) if "baseline" in data else None
    locations = data.pop("locations", None) or [None] * len(data["sites"])
    data.pop("noise", None)
    data["sites"] = [site if location is None else {**site, "location": location}
                     for site, location in zip(data["sites"], locations, strict=True)]
    if data.get("answers") and not isinstance(data["answers"][0], list):  # format 2: one for all pairs
        data["answers"] = [data["answers"]] * len(data["clean"])
        data["answer_tokens"] = [data["answer_tokens"]] * len(data["clean"])
    if data.get("metric_values") is None:  # format 1: only recoveries; values that give them back
        gap = baseline * (-1 if data.get("is_distance", True) else 1)
        zeros = np.zeros_like(gap)
        donor, receiver = gap, zeros
        denoise = data.get("direction", "denoise") == "denoise"
        clean, corrupted = (donor, receiver) if denoise else (receiver, donor)
        data["metric_values"] = {"clean": clean, "corrupted": corrupted,
                                 "patched": recovery / 100 * gap[:, None],
                                 "clean_noise": zeros, "corrupted_noise": zeros,
                                 "patched_noise": np.zeros_like(recovery)}
    return data


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
        target = output_path(path, {".json"}, overwrite)
        write_atomically(target, lambda temporary: temporary.write_text(text))
    return text


def read_json(cls, text_or_path: str | Path, upgrade: Callable[[dict], dict] | None = None):
    """A `cls` from JSON text or a file written by `write_json`, its `cls.ARRAYS` as numpy;
    `upgrade` turns the fields of an older format into this one's."""
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
    if upgrade is not None and written < FORMAT:
        data = upgrade(data)
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ResultFormatError(f"not a {cls.__name__}: unknown fields {sorted(unknown)}.")
    for name, dtype in cls.ARRAYS.items():
        if data.get(name) is not None:
            data[name] = np.array(data[name], dtype=dtype)
    return cls(**data)
