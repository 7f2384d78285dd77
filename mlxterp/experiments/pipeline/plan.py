"""An experiment as a value, and what its runs measure.

A `Plan` says everything about an activation-patching experiment: the prompt pairs (as tokens),
the sites, the metric, the direction and the measured position. It is checked once, when it is
made. Runners take a plan and return `SweepValues`: the exact batched engine
(`engine.run_engine`), the naive reference (`engine.run_naive`) and the gradient estimates
(`attribution.run_gradient`). The result layer turns values into recoveries.

Example:
    >>> plan = Plan(clean_ids, corrupted_ids, sites, METRICS["kl"])
    >>> values = run_engine(model, plan)
    >>> values.recovery(plan.direction)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from mlxterp.errors import BaselineError, InputError, NoisyBaselineWarning, PairBaselineWarning, SiteError
from mlxterp.experiments.data.corruption import Corruption
from mlxterp.experiments.pipeline.metrics import Metric
from mlxterp.experiments.pipeline.options import DIRECTIONS
from mlxterp.tracing.inputs import is_index
from mlxterp.tracing.names import Site

CLEAN, CORRUPTED = 0, 1  # the two runs of every pair
NOISY_BASELINE_PP = 1.0  # warn when float32 noise moves recoveries by more than this many points


@dataclass(frozen=True)
class Plan:
    """An activation-patching experiment: patch each site of the donor run into the receiving
    run, for each prompt pair, and measure `metric` at token `position`.

    `clean` and `corrupted` are (pairs, seq) token arrays; `direction` 'denoise' patches clean
    activations into the corrupted run, 'noise' the reverse. Making a plan checks it, so a
    runner never starts a forward pass on a plan that cannot work.
    """

    clean: mx.array
    corrupted: mx.array
    sites: tuple[Site, ...]
    metric: Metric
    direction: str = "denoise"
    position: int = -1
    corruption: Corruption | None = None  # None: the corrupted run is the corrupted prompt
    # One metric per pair where they differ (a logit difference over pairs with their own answer
    # tokens); `metric` then names their kind. Empty: `metric` measures every pair.
    pair_metrics: tuple[Metric, ...] = ()
    # Each pair's number among all pairs of the experiment, for messages and for putting values
    # together (a dataset's pairs are split by length and among ranks). Default: 0, 1, ...
    numbers: tuple[int, ...] = ()
    # How many pairs the whole experiment has (0: this plan's). One pair whose runs the metric
    # cannot tell apart is an error; in a dataset such a pair is named in a warning instead.
    total_pairs: int = 0

    def __post_init__(self):
        if not isinstance(self.direction, str) or self.direction not in DIRECTIONS:
            raise InputError(f"direction={self.direction!r}: use 'denoise' or 'noise'.")
        if self.clean.ndim != 2 or self.clean.shape != self.corrupted.shape:
            raise InputError(f"clean {tuple(self.clean.shape)} and corrupted "
                            f"{tuple(self.corrupted.shape)} tokens must be (pairs, seq) of one shape.")
        seq_len = self.clean.shape[1]
        if not is_index(self.position) or not -seq_len <= self.position < seq_len:
            raise InputError(f"position {self.position} is out of range for {seq_len} tokens.")
        if not self.sites:
            raise SiteError("the plan has no sites to patch.")
        object.__setattr__(self, "position", int(self.position) % seq_len)
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "pair_metrics", tuple(self.pair_metrics))
        object.__setattr__(self, "numbers", tuple(self.numbers) or tuple(range(self.pairs)))
        object.__setattr__(self, "total_pairs", self.total_pairs or self.pairs)
        if len(self.numbers) != self.pairs:
            raise InputError(f"numbers: give one number per pair ({self.pairs}), not {len(self.numbers)}.")
        kind = (self.metric.name, self.metric.is_distance)
        if self.pair_metrics and (len(self.pair_metrics) != self.pairs
                                  or any((m.name, m.is_distance) != kind for m in self.pair_metrics)):
            raise InputError(f"pair_metrics: give one {self.metric.name} metric per pair ({self.pairs}).")
        same = np.all(np.array(self.clean) == np.array(self.corrupted), axis=1)
        if self.corruption is not None:
            self._check_corruption(same)
        elif same.any():
            raise BaselineError(
                f"pair {self.numbers[int(np.argmax(same))]}: the clean and corrupted prompts are the same "
                "tokens, so there is nothing to recover. Corrupt the prompt (e.g. swap the subject or "
                "a name)."
            )

    def _check_corruption(self, same: np.ndarray) -> None:
        if not same.all():
            raise InputError("a corruption corrupts the clean prompt itself: give the clean tokens "
                            "as the corrupted ones too.")
        if self.corruption.pairs != self.pairs:
            raise InputError(f"the corruption has values for {self.corruption.pairs} pairs, the plan "
                            f"{self.pairs}; give one per pair (one noise sample per pair).")
        if max(self.corruption.positions) >= self.clean.shape[1]:
            raise InputError(f"corrupted positions {self.corruption.positions} are out of range for "
                            f"{self.clean.shape[1]} tokens.")
        if not self.corruption.replace and not mx.any(self.corruption.values != 0).item():
            raise BaselineError("the corruption adds nothing (noise 0), so the corrupted run is the "
                                "clean run and there is nothing to recover; give noise > 0.")

    @property
    def pairs(self) -> int:
        return self.clean.shape[0]

    @property
    def donor(self) -> int:
        """Which run of a pair (CLEAN or CORRUPTED) gives the patched activations."""
        return CLEAN if self.direction == "denoise" else CORRUPTED

    @property
    def receiver(self) -> int:
        """Which run of a pair receives the patches."""
        return 1 - self.donor

    def metric_of(self, pair: int) -> Metric:
        """The metric that measures pair `pair`."""
        return self.pair_metrics[pair] if self.pair_metrics else self.metric

    def subset(self, pairs: list[int], sites: slice = slice(None)) -> Plan:
        """The same experiment on some of the pairs and a slice of the sites (a shard of it)."""
        rows = mx.array(pairs)
        corruption = self.corruption
        if corruption is not None:
            corruption = replace(corruption, values=corruption.values[rows])
        return replace(self, clean=self.clean[rows], corrupted=self.corrupted[rows],
                       sites=self.sites[sites], corruption=corruption,
                       pair_metrics=tuple(self.pair_metrics[p] for p in pairs) if self.pair_metrics else (),
                       numbers=tuple(self.numbers[p] for p in pairs))

    def first_difference(self, pair: int) -> int:
        """The first position where the pair's clean and corrupted runs can differ."""
        if self.corruption is not None:
            return min(self.corruption.positions)
        differ = (self.clean[pair] != self.corrupted[pair]).tolist()
        return differ.index(True)  # the plan refuses identical token pairs

    def interventions(self, pair: int, run: int) -> dict:
        """The trace interventions that make run `run` (CLEAN or CORRUPTED) of pair `pair`."""
        if run == CORRUPTED and self.corruption is not None:
            return self.corruption.intervention(pair)
        return {}

    def tokens(self, pair: int) -> mx.array:
        """(2, seq): the pair's clean and corrupted rows, in that order."""
        return mx.concatenate([self.clean[pair:pair + 1], self.corrupted[pair:pair + 1]])


@dataclass
class SweepValues:
    """Metric values of every run of a sweep, for `pairs` prompt pairs and `sites` sites, each
    measured against the donor's logits (distances) or on its own (scores), and beside each value
    how far float32 noise can move it (`metrics.measure`). A gradient runner's `patched` values
    are estimates: the receiver's value plus the estimated effect of each patch."""

    clean: np.ndarray  # (pairs,)
    corrupted: np.ndarray  # (pairs,)
    patched: np.ndarray  # (pairs, sites)
    clean_noise: np.ndarray  # (pairs,)
    corrupted_noise: np.ndarray  # (pairs,)
    patched_noise: np.ndarray  # (pairs, sites)

    @classmethod
    def empty(cls, pairs: int, sites: int) -> SweepValues:
        shapes = [pairs, pairs, (pairs, sites)] * 2  # values, then their noise
        return cls(*(np.zeros(shape) for shape in shapes))

    def place(self, pairs: list[int], sites: slice, part: SweepValues) -> None:
        """Store `part`, the values of `pairs` at a slice of the sites, where they belong."""
        rows = np.array(pairs)
        columns = np.arange(self.patched.shape[1])[sites]
        for name, array in vars(self).items():
            if array.ndim == 1:
                array[rows] = getattr(part, name)
            else:
                array[rows[:, None], columns] = getattr(part, name)

    def subset(self, pairs: list[int], sites: slice = slice(None)) -> SweepValues:
        """The values of `pairs` at a slice of the sites."""
        rows = np.array(pairs)
        return SweepValues(**{name: array[rows] if array.ndim == 1 else array[rows][:, sites]
                              for name, array in vars(self).items()})

    def set_base(self, pair: int, values: np.ndarray, noise: np.ndarray) -> None:
        """Store the clean and corrupted rows' (values, noise), in that order."""
        self.clean[pair], self.corrupted[pair] = values
        self.clean_noise[pair], self.corrupted_noise[pair] = noise

    def _donor_receiver(self, direction: str, noise: bool = False) -> tuple[np.ndarray, np.ndarray]:
        clean, corrupted = (self.clean_noise, self.corrupted_noise) if noise else (self.clean, self.corrupted)
        return (clean, corrupted) if direction == "denoise" else (corrupted, clean)

    def gap(self, direction: str) -> np.ndarray:
        """(pairs,) donor minus receiver value."""
        donor, receiver = self._donor_receiver(direction)
        return donor - receiver

    def baseline_noise(self, direction: str) -> np.ndarray:
        """(pairs,) how far float32 noise can move the gap."""
        return sum(self._donor_receiver(direction, noise=True))

    def recovery(self, direction: str) -> np.ndarray:
        """(pairs, sites) percent: how far each patch moves the receiver toward the donor."""
        receiver = self._donor_receiver(direction)[1]
        return (self.patched - receiver[:, None]) / self.gap(direction)[:, None] * 100

    def recovery_noise(self, direction: str) -> np.ndarray:
        """(pairs, sites) percentage points by which float32 noise can move each recovery:
        the noise of the patched and receiving values, and of the gap scaled by the recovery."""
        receiver_noise = self._donor_receiver(direction, noise=True)[1][:, None]
        gap = np.abs(self.gap(direction))[:, None]
        spread = 100 * (self.patched_noise + receiver_noise)
        return (spread + np.abs(self.recovery(direction)) * self.baseline_noise(direction)[:, None]) / gap

    def check_baseline(self, plan: Plan, pair: int) -> None:
        """Refuse the one pair of an experiment whose gap float32 cannot tell from zero; warn
        when noise moves its recovery by over a point. A dataset's pairs are checked together,
        by `check_pairs`, once all are known."""
        if plan.total_pairs > 1:
            return
        gap, noise = self.gap(plan.direction)[pair], self.baseline_noise(plan.direction)[pair]
        name = plan.metric.name
        if abs(gap) <= noise:
            raise BaselineError(
                f"clean and corrupted prompts give the same {name} to within float32 noise (pair "
                f"{plan.numbers[pair]}: clean {self.clean[pair]:.6g}, corrupted "
                f"{self.corrupted[pair]:.6g}, noise {noise:.2g}): there is nothing to recover. Choose "
                "prompts whose outputs differ at the measured position, or another metric."
            )
        if 100 * noise / abs(gap) > NOISY_BASELINE_PP:
            warnings.warn(
                f"pair {plan.numbers[pair]}: the {name} baseline {abs(gap):.3g} is small; float32 noise "
                f"({noise:.2g}) makes each recovery uncertain by about {100 * noise / abs(gap):.1f} "
                "percentage points.", NoisyBaselineWarning, stacklevel=4)

    def check_pairs(self, direction: str, metric: str) -> None:
        """For a dataset (several pairs): refuse one whose mean gap float32 cannot tell from zero;
        name in a warning the pairs whose gap is within their noise (their own recovery means
        nothing) or of the sign opposite to the mean's (the model gets the clean prompt wrong).
        The summary, the normalised mean, divides by the mean gap, so no one pair can swing it."""
        gap, noise = self.gap(direction), self.baseline_noise(direction)
        if abs(gap.mean()) <= noise.mean():
            raise BaselineError(
                f"over the {len(gap)} pairs, clean and corrupted runs give the same {metric} on average to "
                f"within float32 noise (mean gap {gap.mean():.3g}, noise {noise.mean():.2g}): there is "
                "nothing to recover. Check the answers, or choose another metric."
            )
        reasons = {
            "the baseline is within float32 noise": np.abs(gap) <= noise,
            "the baseline has the sign opposite to the others'": (np.sign(gap) != np.sign(gap.mean()))
                                                                  & (np.abs(gap) > noise),
        }
        if metric == "logit_diff":  # the clean run's own value says whether the model answers
            reasons["the model prefers the wrong answer on the clean prompt"] = self.clean <= 0
        named = {reason: np.flatnonzero(which).tolist() for reason, which in reasons.items() if which.any()}
        if named:
            pairs = sorted(set().union(*named.values()))
            warnings.warn(
                f"pairs {pairs} make their own recoveries unreliable: "
                + "; ".join(f"{reason} ({', '.join(map(str, found))})" for reason, found in named.items())
                + ". The normalised mean (mean effect / mean baseline) is not swung by them; to keep only "
                "the pairs the model answers: answered_pairs(model, pairs).",
                PairBaselineWarning, stacklevel=3)
