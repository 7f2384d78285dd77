"""Activation patching: sweeps described as sites, run by the engine, returned as a result.

Example:
    >>> result = patching_sweep(model, "Paris is the capital of France",
    ...                         "London is the capital of France", component="mlp",
    ...                         over=("layer", "position"), metric="kl")
    >>> result.top(3)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxterp.errors import InputTypeError
from mlxterp.experiments.engine import SweepValues, run_engine, run_naive
from mlxterp.experiments.metrics import MetricError, MetricFn, get_metric
from mlxterp.experiments.sites import PatchSite, check_sites, is_index, sweep_sites
from mlxterp.tracing.inputs import InputError, equal_length_rows


@dataclass
class PatchingResult:
    """Recoveries of a patching sweep, with what they were measured on.

    `recovery[pair, site]` is in percent; `sites[i].labels` says which layer / head / position
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

    def label(self, site: dict) -> str:
        parts = [f"L{site['layer']}"]
        if "head" in site:
            parts.append(f"H{site['head']}")
        if "position" in site:
            token = self.tokens[0][site["position"]] if self.tokens else ""
            parts.append(f"pos {site['position']} {token!r}")
        return " ".join(parts)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most important sites, as (label, recovery), highest recovery first (in both
        directions: how far the patch moves the receiving run toward the donor's output)."""
        order = np.argsort(-self.mean, kind="stable")[:k]
        return [(self.label(self.sites[i]), float(self.mean[i])) for i in order]

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
        )

    def plot(self, path: str | Path | None = None):
        """A bar chart (one axis) or heatmap (two); see mlxterp.presentation.plots."""
        from mlxterp.presentation.plots import plot_result

        return plot_result(self, path)


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise InputTypeError(f"prompts {prompts!r}: give a string, or a list of strings (one per pair).")
    if not prompts or not all(prompts):
        raise InputError("give the prompts as non-empty strings (one, or a list of pairs).")
    return list(prompts)


def _prompt_tokens(model, clean: list[str], corrupted: list[str]) -> tuple[mx.array, mx.array]:
    if len(clean) != len(corrupted):
        raise InputError(
            f"{len(clean)} clean prompts but {len(corrupted)} corrupted ones; give them in pairs."
        )
    texts = clean + corrupted
    rows = [model.encode(text) for text in texts]
    if any(not row for row in rows):
        raise InputError("a prompt gives no tokens; give non-empty prompts.")
    try:
        tokens = equal_length_rows(rows, texts, model.tokenizer)
    except InputError as err:
        raise InputError(
            f"{err}\nPatching compares position by position, so clean and corrupted prompts "
            "must tokenise to the same length (mlxterp does not align them silently)."
        ) from None
    return tokens[: len(clean)], tokens[len(clean):]


def _check_option_types(metric, position, naive, progress) -> None:
    if not isinstance(metric, str) and not callable(metric):
        raise InputTypeError(f"metric={metric!r}: give a name such as 'kl' or a callable.")
    if not is_index(position):
        raise InputTypeError(f"position={position!r}: give a token position as a whole number.")
    if not isinstance(naive, bool):
        raise InputTypeError(f"naive={naive!r}: give True or False.")
    if progress is not None and not isinstance(progress, bool):
        raise InputTypeError(f"progress={progress!r}: give True, False or None (automatic).")


def _token_id(model, token: str | int, what: str) -> int:
    if not isinstance(token, str) and not is_index(token):
        raise InputTypeError(f"{what}={token!r}: give one token as a string (' Paris') or an id.")
    if is_index(token):
        token = int(token)
        if not 0 <= token < model.vocab_size:
            raise InputError(f"{what} id {token} is outside the vocabulary [0, {model.vocab_size}).")
        return token
    ids = list(model.tokenizer.encode(token, add_special_tokens=False))
    if len(ids) != 1:
        raise InputError(
            f"{what} {token!r} is {len(ids)} tokens {model.to_str_tokens(ids)}; it must be one "
            "token (mind the leading space: ' Paris' and 'Paris' differ)."
        )
    return ids[0]


def patching_sweep(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    component: str = "mlp",
    over: Sequence[str] = ("layer",),
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sites: Sequence[PatchSite] | None = None,
    metric: str | MetricFn = "l2",
    answer: str | int | None = None,
    wrong_answer: str | int | None = None,
    position: int = -1,
    direction: str = "denoise",
    naive: bool = False,
    max_batch: int | None = None,
    progress: bool | None = None,
) -> PatchingResult:
    """Patch every site of a sweep and measure how much of the clean behaviour each recovers.

    Args:
        model: an `InterpretableModel` with a tokenizer.
        clean, corrupted: a prompt each, or equal-length lists of prompt pairs.
        component: 'mlp', 'self_attn' ('attn'), a sub-module ('mlp.down_proj', ...), 'input'
            (residual stream entering the block) or 'output' (leaving it).
        over: ('layer',), ('layer', 'position'), ('layer', 'head') or ('layer', 'head',
            'position'). Heads are query heads (slices of o_proj's input); for k_proj / v_proj,
            key/value heads.
        layers, positions, heads: restrict the sweep (None: all).
        sites: an explicit list of `PatchSite`s instead of a sweep.
        metric: 'l2', 'cosine', 'mse', 'kl', 'logit_diff' (with answer / wrong_answer), or a
            batched callable fn(logits (N, V), clean (V,)) -> distances (N,).
        position: the token position whose logits are measured (default: the last).
        direction: 'denoise' (clean activations into the corrupted run) or 'noise'.
        naive: run the reference procedure (one forward per site) instead of the engine.
        max_batch: patched rows per forward (default: from an estimate of a 2 GiB activation
            budget).

    Example:
        >>> r = patching_sweep(model, clean, corrupted, component="self_attn",
        ...                    over=("layer", "head"), metric="logit_diff",
        ...                    answer=" Mary", wrong_answer=" John")
    """
    if model.tokenizer is None:
        raise InputError("patching prompts needs a tokenizer: InterpretableModel(m, tokenizer).")
    _check_option_types(metric=metric, position=position, naive=naive, progress=progress)
    clean_list, corrupted_list = _as_list(clean), _as_list(corrupted)
    clean_ids, corrupted_ids = _prompt_tokens(model, clean_list, corrupted_list)
    seq_len = clean_ids.shape[1]
    if metric != "logit_diff" and (answer is not None or wrong_answer is not None):
        raise MetricError(f"answer= and wrong_answer= apply to metric='logit_diff', not {metric!r}.")
    answers = [None if answer is None else _token_id(model, answer, "answer"),
               None if wrong_answer is None else _token_id(model, wrong_answer, "wrong_answer")]
    chosen = get_metric(metric, *answers)
    explicit = sites is not None
    if explicit:
        sites = check_sites(model, sites)
        component, over = "sites", tuple(sites[0].labels)
    else:
        sites = sweep_sites(model, component, over, seq_len, layers, positions, heads)
    run = run_naive if naive else run_engine
    options = {} if naive else {"max_batch": max_batch, "progress": progress}
    values = run(model, clean_ids, corrupted_ids, list(sites), chosen, position, direction, **options)
    # The baseline is reported as a positive gap for distances: d(receiver, donor).
    gap = values.gap(direction)  # above the noise floor: the runners check each pair first
    return PatchingResult(
        recovery=values.recovery(direction),
        sites=[dict(s.labels) for s in sites],
        over=tuple(over),
        component=component, metric=chosen.name, direction=direction,
        baseline=-gap if chosen.is_distance else gap, clean=clean_list, corrupted=corrupted_list,
        tokens=[model.to_str_tokens(row) for row in clean_ids.tolist()],
        is_distance=chosen.is_distance, position=position % seq_len,
        answers=answers if metric == "logit_diff" else [],
        metric_values=values, noise=values.recovery_noise(direction),
    )


def activation_patching(
    model,
    clean_text: str,
    corrupted_text: str,
    component: str = "mlp",
    layers: Sequence[int] | None = None,
    metric: str | MetricFn = "l2",
    plot: bool = False,
    **options,
) -> dict[int, float]:
    """The guide's helper: `{layer: recovery %}` for patching `component` layer by layer.

    Options are those of `patching_sweep` (answer, wrong_answer, position, direction, naive,
    max_batch, progress). With `plot=True` a bar chart is shown (notebook) or saved (script).

    Example:
        >>> results = model.activation_patching("Paris is the capital of France",
        ...                                     "London is the capital of France")
        >>> max(results, key=results.get)
    """
    if not isinstance(plot, bool):
        raise InputTypeError(f"plot={plot!r}: give True or False.")
    result = patching_sweep(model, clean_text, corrupted_text, component=component,
                            over=("layer",), layers=layers, metric=metric, **options)
    if plot:
        result.plot()
    return result.to_dict()
