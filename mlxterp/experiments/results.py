"""Results of patching experiments: recoveries with what they were measured on, as data.

Runners return `SweepValues`; `patching_sweep` and `attribution_patching` wrap them in a
`PatchingResult`, which tables and plots (`mlxterp.presentation`) read.

Example:
    >>> result = model.patching_sweep(clean, corrupted, over=("layer", "position"), metric="kl")
    >>> result.grid().shape, result.to_dataframe().head()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxterp.experiments.plan import SweepValues


@dataclass
class PatchingResult:
    """Recoveries of a patching sweep, with what they were measured on.

    `recovery[pair, site]` is in percent; `sites[i]` says which layer / head / position
    site i is; `tokens` holds the prompts' tokens for position labels.
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
    answers: list = field(default_factory=list)  # [answer, wrong_answer] ids for logit_diff
    metric_values: SweepValues | None = None
    # (pairs, sites): percentage points by which float32 noise can move each recovery
    noise: np.ndarray | None = None
    # how the recoveries were found: "exact" (patched forward passes), "atp" or "ig" (estimates)
    method: str = "exact"
    # where each site is, as `Site(**location)` takes it: module, is_input, positions, head, n_heads
    locations: list[dict] = field(default_factory=list)

    @property
    def mean(self) -> np.ndarray:
        """Mean recovery over pairs, one value per site."""
        return self.recovery.mean(axis=0)

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

    def to_dataframe(self):
        """One row per (pair, site): pair, layer, [head], [position, token], recovery."""
        import pandas as pd

        records = []
        for pair in range(self.recovery.shape[0]):
            for site, value in zip(self.sites, self.recovery[pair], strict=True):
                record = {"pair": pair, **site, "recovery": float(value)}
                if "position" in site and self.tokens:
                    record["token"] = self.tokens[pair][site["position"]]
                records.append(record)
        return pd.DataFrame.from_records(records)

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON (written to `path` when given); `from_json` reads it back."""
        data = {
            "recovery": self.recovery.tolist(), "sites": self.sites, "over": list(self.over),
            "component": self.component, "metric": self.metric, "direction": self.direction,
            "baseline": self.baseline.tolist(), "clean": self.clean, "corrupted": self.corrupted,
            "tokens": self.tokens, "is_distance": self.is_distance, "position": self.position,
            "answers": self.answers,
            "noise": None if self.noise is None else self.noise.tolist(),
            "method": self.method, "locations": self.locations,
        }
        text = json.dumps(data, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PatchingResult:
        """Read a result written by `to_json` (JSON text or a file path)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        return cls(
            recovery=np.array(data["recovery"]), sites=data["sites"], over=tuple(data["over"]),
            component=data["component"], metric=data["metric"], direction=data["direction"],
            baseline=np.array(data["baseline"]), clean=data["clean"],
            corrupted=data["corrupted"], tokens=data["tokens"], is_distance=data["is_distance"],
            position=data["position"], answers=data["answers"],
            noise=None if data.get("noise") is None else np.array(data["noise"]),
            method=data.get("method", "exact"), locations=data.get("locations", []),
        )

    def plot(self, path: str | Path | None = None):
        """A bar chart (one axis) or heatmap (two); see mlxterp.presentation.plots."""
        from mlxterp.presentation.plots import plot_result

        return plot_result(self, path)
